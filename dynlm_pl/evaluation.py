"""`python evaluate.py`: every method side by side on one LM checkpoint, under one protocol.

Methods (`eval.methods`, any subset):
  static        the LM alone (one level)
  sgd           dynamic evaluation with plain SGD
  rms           Krause et al. 2017: RMS-scaled SGD with decay toward θ_0 (needs fisher.pt's `ms`)
  meta_noflush  LM + a meta-learner trained without FLUSH (`meta_noflush.ckpt`; two levels)
  meta          LM + meta-learner + long-term memory θ_0 (`meta.ckpt`; three levels)
Protocol (Krause's): the split as one stream (batch 1), segments of `eval.segment` tokens, each scored
with θ_{t-1} before the update, hidden state carried; perplexity = exp(total loss / tokens scored).

`sgd` and `rms` are tuned on a slice of the validation split (`eval.tune`), stored in `tuned.json`
and reused on test, so the baselines are as strong as a grid search makes them.

Outputs in the run directory: results.json and results.md, losses-<split>.npz (per-token losses),
articles-<split>.csv, and under plots/: gain curves (the paper's Figure 2, left), per-article gains,
gate statistics, and tokens-<split>.html (Figure 2, right). With `logger=wandb` they also go to W&B.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm import tqdm

from dynlm_pl import report
from dynlm_pl.common import atomic_write_text, file_sha256, make_datamodule, run_dir
from dynlm_pl.data import UNK, Corpus, StreamWindows, article_index, batchify, read_lines
from dynlm_pl.dynamic import DynamicWeights, GateRule, RMSRule, Rule, SGDRule, adaptive_eval, stream_rows
from dynlm_pl.errors import DynlmError, require
from dynlm_pl.models.awd_lstm import AWDLSTM, detach_hidden, lm_loss
from dynlm_pl.systems.lm import check_same_data, load_lm

METHODS = ("static", "sgd", "rms", "meta_noflush", "meta")


@torch.no_grad()
def static_eval(model: AWDLSTM, tokens: Tensor, batch_size: int = 1, bptt: int = 70,
                progress: bool = False) -> tuple[float, int]:
    """Summed loss and tokens scored of `model` (eval mode) over `tokens` [N] read as streams."""
    model.eval()
    streams = batchify(tokens, batch_size)
    hidden, total, n = model.init_hidden(batch_size), 0.0, 0
    for x, y in tqdm(StreamWindows(streams, bptt), disable=not progress, desc="static", leave=False):
        out = model(x, hidden)
        hidden = detach_hidden(out.hidden)
        total += lm_loss(out.logits, y, reduction="sum").item()
        n += y.numel()
    return total, n


@torch.no_grad()
def static_losses(model: AWDLSTM, tokens: Tensor, bptt: int = 70, progress: bool = False,
                  streams: int = 1) -> Tensor:
    """Per-token losses of the static LM over `tokens` read as `streams` rows (`stream_rows`), flat in
    stream order: [N-1] for one stream, the same targets as `adaptive_eval` for B."""
    model.eval()
    rows = stream_rows(tokens, streams)
    hidden, out = model.init_hidden(streams), []
    for x, y in tqdm(StreamWindows(rows, bptt), disable=not progress, desc="static", leave=False):
        o = model(x, hidden)
        hidden = detach_hidden(o.hidden)
        out.append(lm_loss(o.logits, y, reduction="none").view(streams, -1))
    return torch.cat(out, dim=1).reshape(-1)


def method_losses(lm: AWDLSTM, tokens: Tensor, rule: Rule, segment: int, dyn: DynamicWeights, streams: int = 1,
                  shared: bool = False, max_drift: float | None = None,
                  progress: bool = False) -> tuple[Tensor, list[float]]:
    """What `evaluate` runs for one adaptive method: per-token losses [B·n] in stream order, and ‖θ_t − θ_0‖
    after every update (the largest over streams when each keeps its own θ): adaptation must stay bounded."""
    drift: list[float] = []
    lt = adaptive_eval(lm, tokens, rule, segment, dyn, batch_size=streams, shared=shared, max_drift=max_drift,
                       progress=progress, drift=drift).view(-1)
    return lt, drift


class RecordingGateRule(GateRule):
    """GateRule that also keeps, every `every` segments, the mean f, i, z of each dynamic tensor [n_tensors].

    Why not every segment: under eval.fused_gate the sums cost ~30% of the update (`MetaLearner.fused_apply_`);
    the gate plot needs far fewer points than there are segments (thousands per split).
    """

    def __init__(self, gates: torch.nn.Module, dyn: DynamicWeights, every: int = 10) -> None:
        super().__init__(gates, dyn)
        self.every, self.n = every, 0
        self.history: list[Tensor] = []  # each [3, n_tensors]

    def update(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        f, i, z = self.gates(theta, grad, loss, self.dyn)
        sizes = self.dyn.spec.sizes
        z_ = torch.zeros_like(theta) if z is None else z

        def per_tensor(g: Tensor) -> Tensor:
            return torch.stack([t.mean() for t in g.expand_as(theta).split(sizes, dim=-1)])

        self.history.append(torch.stack([per_tensor(f), per_tensor(i), per_tensor(z_)]).cpu())
        return self.combine(theta, grad, f, i, z)

    def update_(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        # the in-place update returns these very means (segments 0, every, 2·every, ...)
        means = self.apply_(theta, grad, loss, stats=self.n % self.every == 0)
        self.n += 1
        if means is not None:
            self.history.append(means.cpu())
        return theta


# ----------------------------------------------------------------------------------------------------
# Building each method's rule
# ----------------------------------------------------------------------------------------------------


def _load_fisher(out: Path, lm_sha: str) -> Any | None:
    if not (out / "fisher.pt").is_file():
        return None
    from dynlm_pl.fisher import load_fisher

    return load_fisher(out / "fisher.pt", lm_sha256=lm_sha)


def _meta_rule(path: Path, lm: AWDLSTM, lm_sha: str, art: Any | None) -> tuple[RecordingGateRule, DynamicWeights]:
    from dynlm_pl.systems.meta import load_meta

    meta, hp = load_meta(path, lm_sha256=lm_sha)
    # The Fisher/RMS features and Krause's coefficients are read from fisher.pt: φ was trained on one
    fisher_sha = (hp.get("provenance") or {}).get("fisher_sha256")
    now_sha = file_sha256(path.parent / "fisher.pt") if art is not None else None
    require(fisher_sha is None or fisher_sha == now_sha,
            f"{path} was meta-trained with another fisher.pt than {path.parent / 'fisher.pt'} "
            f"({'absent now' if now_sha is None else 'recomputed since'}); rerun `python train.py stage=meta`")
    dyn_cfg = (hp.get("provenance") or {}).get("dynamic") or {"include": ["*"], "exclude": []}
    dyn = DynamicWeights.build(lm, dyn_cfg["include"], dyn_cfg["exclude"], art)
    require(list(dyn.spec.names) == list(hp["dynamic_names"]),
            f"{path} adapts other parameters than this LM has; rerun `python train.py stage=meta`")
    return RecordingGateRule(meta, dyn), dyn


def tune(lm: AWDLSTM, tokens: Tensor, dyn: DynamicWeights, segment: int, grid: DictConfig,
         methods: list[str], max_drift: float | None = None) -> dict[str, dict[str, Any]]:
    """Grid search of `sgd` lr and `rms` (lr, λ) on `tokens` (a validation slice), then a pattern search
    around the grid's best (`grid.refine` rounds): lowest loss wins.

    Why the refinement: a coarse grid whose best sits on its edge or between two points would hand the
    meta-learner, which tunes its rule continuously, an easy win over a baseline nobody tuned properly.
    """
    best: dict[str, dict[str, Any]] = {}
    spaces: dict[str, list[dict[str, float]]] = {}
    if "sgd" in methods:
        spaces["sgd"] = [{"lr": float(lr)} for lr in grid.sgd_lr]
    if "rms" in methods and dyn.ms is not None:
        spaces["rms"] = [{"lr": float(a), "lamb": float(b), "eps": float(grid.rms_eps)}
                         for a, b in itertools.product(grid.rms_lr, grid.rms_lamb)]
    for method, space in spaces.items():
        trials: list[dict[str, float]] = []

        def loss_of(hp: dict[str, float], method: str = method, trials: list = trials) -> float:
            for t in trials:  # memoized: the pattern search revisits points
                if all(math.isclose(t[k], v, rel_tol=1e-9) for k, v in hp.items()):
                    return t["loss"]
            rule = SGDRule(hp["lr"]) if method == "sgd" else RMSRule(dyn, hp["lr"], hp["lamb"], hp["eps"])
            loss = float(adaptive_eval(lm, tokens, rule, segment, dyn, max_drift=max_drift).mean())
            trials.append({**hp, "loss": loss if math.isfinite(loss) else math.inf})
            return trials[-1]["loss"]

        for hp in tqdm(space, desc=f"tune {method}", leave=False):
            loss_of(hp)
        top = min(trials, key=lambda t: t["loss"])
        hp = pattern_search({k: v for k, v in top.items() if k != "loss"}, loss_of,
                            ["lr"] if method == "sgd" else ["lr", "lamb"], float(grid.get("refine_step", 3.0)),
                            int(grid.get("refine", 0)))
        best[method] = {"hparams": hp, "tune_loss": loss_of(hp), "trials": trials}
        print(f"[evaluate] tuned {method} on {tokens.numel()} validation tokens ({len(trials)} trials): "
              f"{best[method]['hparams']} (ppl {math.exp(best[method]['tune_loss']):.2f})")
    return best


def pattern_search(hp: dict[str, float], loss_of: Any, keys: list[str], step: float, rounds: int,
                   max_moves: int = 4) -> dict[str, float]:
    """Coordinate search in log space: move each key by ×step (or ÷step) while the loss falls, up to
    `max_moves` times (past the grid's edge too), then take √step; `rounds` times. Zero stays zero."""
    best, best_loss = dict(hp), loss_of(hp)
    for _ in range(rounds):
        for k in keys:
            if best[k] <= 0:
                continue
            for f in (step, 1.0 / step):
                moved = 0
                while moved < max_moves:
                    cand = {**best, k: best[k] * f}
                    loss = loss_of(cand)
                    if not loss < best_loss:
                        break
                    best, best_loss, moved = cand, loss, moved + 1
                if moved:  # it went this way: the other way was worse already
                    break
        step = math.sqrt(step)
    return best


def tuned_baselines(cfg: DictConfig, out: Path, lm: AWDLSTM, valid: Tensor, dyn: DynamicWeights, lm_sha: str,
                    methods: list[str]) -> dict[str, dict[str, Any]]:
    """tuned.json for this LM, segment and grid if it exists, else tune now and store it."""
    t = cfg.eval.tune
    max_drift = cfg.eval.get("max_drift")
    key = {"lm_sha256": lm_sha, "segment": int(cfg.eval.segment), "tokens": int(t.tokens),
           "grid": OmegaConf.to_container(t, resolve=True), "max_drift": max_drift}
    path = out / "tuned.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == key and all(m in stored["best"] for m in methods):
                print(f"[evaluate] reusing tuned baselines from {path}")
                return stored["best"]
        except (json.JSONDecodeError, KeyError):
            pass  # unreadable: tune again and replace it
    best = tune(lm, valid[: int(t.tokens)], dyn, int(cfg.eval.segment), t, methods, max_drift)
    atomic_write_text(path, json.dumps({"key": key, "best": best}, indent=2))
    return best


# ----------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------


def _textfile(cfg: DictConfig, vocab: list[str]) -> tuple[dict[str, Tensor], dict[str, list], Corpus]:
    """A user's text file read with the LM's vocabulary (unknown words -> <unk>), as split `text`."""
    path = Path(str(cfg.data.path))
    lines = read_lines(path)
    corpus = Corpus(vocab, {}, {}, "textfile:" + file_sha256(path))
    require(UNK in corpus.stoi, f"the LM's vocabulary has no {UNK}: it cannot read unseen words in {path}")
    tokens = corpus.encode_lines(lines)
    require(tokens.numel() >= 2, f"{path} has fewer than 2 tokens; give it some text")
    unk = float((tokens == corpus.stoi[UNK]).float().mean())
    if unk > 0.5:
        print(f"[evaluate] warning: {100 * unk:.0f}% of the tokens of {path} are unknown to the LM ({UNK})")
    return {"text": tokens}, {"text": article_index(lines)}, corpus


def run(cfg: DictConfig) -> dict[str, Any]:
    out = run_dir(cfg)
    e = cfg.eval
    lm_path = out / "lm.ckpt"
    lm, hp = load_lm(lm_path)
    lm_sha = file_sha256(lm_path)
    if cfg.data.source == "textfile":
        require(hp.get("vocab"), f"{lm_path} does not carry its vocabulary; retrain it with this version")
        splits_t, articles, corpus = _textfile(cfg, hp["vocab"])
        splits = ["text"]
        valid = None
    else:
        corpus = make_datamodule(cfg).load()
        check_same_data(hp, corpus.vocab_hash, f"the LM in {lm_path}")
        splits_t, articles, splits = corpus.splits, corpus.articles, list(e.splits)
        for s in splits:
            require(s in ("valid", "test"), f"eval.splits has {s!r}; use valid and/or test")
        valid = corpus.splits["valid"]
    methods = list(e.methods)
    unknown = [m for m in methods if m not in METHODS]
    require(not unknown, f"eval.methods has unknown {unknown}; choose from {', '.join(METHODS)}")
    limit = e.get("max_tokens")
    require(limit is None or int(limit) >= 2, f"eval.max_tokens must be >= 2 (or null for whole splits), got {limit}")
    segment = int(e.segment)
    require(segment >= 1, f"eval.segment must be a positive number of tokens, got {segment}")
    n_streams, shared = int(e.get("streams", 1)), bool(e.get("shared_theta", False))
    require(n_streams >= 1, f"eval.streams must be a positive integer, got {n_streams}")

    art = _load_fisher(out, lm_sha)
    rules: dict[str, Rule | None] = {}
    dyns: dict[str, DynamicWeights] = {}
    notes: dict[str, str] = {}
    base_dyn = DynamicWeights.build(lm, fisher_art=art)
    hashes = {"lm.ckpt": lm_sha}
    if art is not None:
        hashes["fisher.pt"] = file_sha256(out / "fisher.pt")
    for m in methods:
        if m == "static":
            rules[m] = None
        elif m == "rms" and art is None:
            notes[m] = "skipped: needs fisher.pt (python train.py stage=fisher)"
        elif m in ("meta", "meta_noflush"):
            path = out / f"{m}.ckpt"
            if not path.is_file():
                notes[m] = f"skipped: no {path.name} (python train.py stage=meta" + \
                    (" gate.flush=false)" if m == "meta_noflush" else ")")
                continue
            rules[m], dyns[m] = _meta_rule(path, lm, lm_sha, art)
            rules[m].gates.fused = bool(e.get("fused_gate", False))  # one compiled pass over θ per update
            hashes[path.name] = file_sha256(path)
        else:
            rules[m] = None  # built after tuning
    for m, why in notes.items():
        print(f"[evaluate] {m}: {why}")
    tuned: dict[str, dict[str, Any]] = {}
    need_tune = [m for m in ("sgd", "rms") if m in rules]
    if need_tune:
        require(valid is not None, "tuning sgd/rms needs the validation split: evaluate a text file with "
                "eval.methods=[static,meta] or run on the corpus the LM was trained on first")
        tuned = tuned_baselines(cfg, out, lm, valid, base_dyn, lm_sha, need_tune)
        if "sgd" in rules:
            rules["sgd"], dyns["sgd"] = SGDRule(tuned["sgd"]["hparams"]["lr"]), base_dyn
        if "rms" in rules:
            h = tuned["rms"]["hparams"]
            rules["rms"], dyns["rms"] = RMSRule(base_dyn, h["lr"], h["lamb"], h["eps"]), base_dyn

    results: dict[str, Any] = {
        "protocol": {"streams": n_streams, "theta": "shared" if shared and n_streams > 1 else "per stream",
                     "segment": segment, "order": "score then update", "max_tokens": limit,
                     "ppl": "exp(total loss / tokens scored)", "static_window": int(cfg.data.bptt),
                     "max_drift": e.get("max_drift")},
        "checkpoints": hashes, "data": {"source": corpus.source, "vocab": corpus.vocab_hash},
        "skipped": notes, "splits": {}}
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for split in splits:
        tokens = splits_t[split]
        if limit is not None and tokens.numel() > int(limit):  # a prefix: every method reads the same tokens
            tokens = tokens[: int(limit)]
            articles[split] = [(o, t) for o, t in articles[split] if o < tokens.numel()]
            print(f"[evaluate] {split}: first {tokens.numel():,} tokens (eval.max_tokens)")
        losses: dict[str, np.ndarray] = {}
        rows: dict[str, list[dict]] = {}
        res: dict[str, Any] = {}
        gates: Tensor | None = None
        for m, rule in rules.items():
            t0 = time.time()
            if rule is None:
                lt = static_losses(lm, tokens, int(cfg.data.bptt), progress=True, streams=n_streams)
            else:
                if isinstance(rule, RecordingGateRule):
                    rule.history, rule.n = [], 0
                lt, drift = method_losses(lm, tokens, rule, segment, dyns[m], n_streams, shared,
                                          e.get("max_drift"), progress=True)
                if m == "meta" and isinstance(rule, RecordingGateRule) and rule.history:
                    gates = torch.stack(rule.history)  # [n_segments, 3, n_tensors]
            sec = time.time() - t0
            arr = lt.double().cpu().numpy()
            require(np.isfinite(arr).all(), f"{m} produced non-finite losses on {split}; lower its learning rate")
            losses[m] = arr
            rows[m] = report.per_article(arr, articles[split])
            res[m] = {"ppl": math.exp(arr.mean()), "loss": float(arr.mean()), "tokens": int(arr.size),
                      "tokens_per_s": arr.size / sec, "seconds": sec,
                      "hparams": tuned.get(m, {}).get("hparams", {})}
            if rule is not None:
                require(all(map(math.isfinite, drift)), f"{m} drove the weights to inf/NaN on {split}")
                res[m]["theta_drift_max"], res[m]["theta_drift_final"] = max(drift, default=0.0), \
                    (drift[-1] if drift else 0.0)
            print(f"[evaluate] {split} {m:>12}: ppl {res[m]['ppl']:8.2f}  ({arr.size / sec:,.0f} tok/s)", flush=True)
        results["splits"][split] = res
        _write_split(out, plots, split, tokens, corpus.vocab, articles[split], losses, rows, gates,
                     dyns.get("meta"), int(e.html_articles), int(e.smooth))
    md = _markdown(results)
    results["markdown"] = md
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.md", md + "\n")
    print(md)
    if cfg.get("logger") and "wandb" in cfg.logger:
        _to_wandb(cfg, out, results, splits)
    return results


def _write_split(out: Path, plots: Path, split: str, tokens: Tensor, vocab: list[str],
                 articles: list[tuple[int, str]], losses: dict[str, np.ndarray], rows: dict[str, list[dict]],
                 gates: Tensor | None, dyn: DynamicWeights | None, html_articles: int, window: int) -> None:
    np.savez_compressed(out / f"losses-{split}.npz", **{m: v.astype(np.float32) for m, v in losses.items()})
    buf = io.StringIO()
    w = csv.writer(buf)
    methods = list(rows)
    w.writerow(["article", "title", "tokens", *[f"ppl_{m}" for m in methods]])
    first = rows[methods[0]]
    for k, r in enumerate(first):
        w.writerow([k, r["title"], r["tokens"], *[f"{rows[m][k]['ppl']:.4f}" for m in methods]])
    atomic_write_text(out / f"articles-{split}.csv", buf.getvalue())
    curves = {}
    if "meta" in losses and "static" in losses:
        curves["LM + meta-learner vs LM (higher: meta better)"] = (losses["meta"], losses["static"])
    if "meta" in losses and "meta_noflush" in losses:
        curves["3 levels vs 2 levels (meta vs meta_noflush)"] = (losses["meta"], losses["meta_noflush"])
    if "rms" in losses and "static" in losses:
        curves["Krause RMS dynamic eval vs LM"] = (losses["rms"], losses["static"])
    if curves:
        report.plot_gain_curves(curves, articles, plots / f"gain-{split}.png", window=window)
    if "static" in rows and len(rows) > 1:
        report.plot_article_gains(rows, "static", plots / f"articles-{split}.png")
    if gates is not None and dyn is not None:
        every = len(losses["meta"]) / len(gates)  # tokens per recorded point (RecordingGateRule.every segments)
        _plot_gates(gates, dyn, articles, plots / f"gates-{split}.png", tokens_per_point=every)
    best = "meta" if "meta" in losses else next((m for m in ("rms", "sgd") if m in losses), None)
    if best and "static" in losses:
        words = [vocab[i] for i in tokens.tolist()]
        report.token_html(words, losses[best], losses["static"], articles, plots / f"tokens-{split}.html",
                          best, "static", max_articles=html_articles)


def _plot_gates(gates: Tensor, dyn: DynamicWeights, articles: list[tuple[int, str]], path: Path,
                tokens_per_point: float) -> None:
    """Mean f, i, z per dynamic tensor along the stream, and averaged around article starts; gates [S, 3, n_tensors]
    holds one point per `tokens_per_point` tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = gates.numpy()  # [S, 3, n_tensors]
    fig, axes = plt.subplots(2, 3, figsize=(15, 6))
    starts = [int(o / tokens_per_point) for o, _ in articles if 0 < o / tokens_per_point < len(g)]
    k = 20  # points either side of an article start
    x = np.arange(len(g)) * tokens_per_point
    for j, name in enumerate(("f (COPY)", "i (UPDATE)", "z (FLUSH)")):
        for t, tname in enumerate(dyn.spec.names):
            axes[0, j].plot(x, report.smooth(g[:, j, t], 50), lw=0.7, label=tname)
            around = [g[s - k : s + k, j, t] for s in starts if s - k >= 0 and s + k <= len(g)]
            if around:
                axes[1, j].plot(np.arange(-k, k) * tokens_per_point, np.mean(around, axis=0), lw=0.8)
        axes[0, j].set_title(f"mean {name} per tensor")
        axes[1, j].set_title(f"{name} around article starts")
        axes[1, j].axvline(0, color="k", lw=0.5)
        axes[1, j].set_xlabel("tokens from article start")
    axes[0, 0].legend(fontsize=6)
    axes[0, 0].set_xlabel("token")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(results: dict[str, Any]) -> str:
    out = []
    for split, res in results["splits"].items():
        static = res.get("static", {}).get("ppl")
        rows = []
        for m, r in res.items():
            gain = f"{100 * (1 - r['ppl'] / static):+.1f}%" if static else ""
            hp = ", ".join(f"{k}={v:g}" for k, v in r["hparams"].items())
            rows.append({"method": m, "ppl": r["ppl"], "vs static": gain, "tokens/s": f"{r['tokens_per_s']:,.0f}",
                         "seconds": r["seconds"], "hyperparameters": hp})
        pr = results["protocol"]
        streams = "one stream" if pr["streams"] == 1 else f"{pr['streams']} streams, θ {pr['theta']}"
        out.append(f"**{split}** (segment {pr['segment']}, {streams})\n\n"
                   + report.markdown_table(rows, ["method", "ppl", "vs static", "tokens/s", "seconds",
                                                  "hyperparameters"]))
    return "\n\n".join(out)


def _to_wandb(cfg: DictConfig, out: Path, results: dict[str, Any], splits: list[str]) -> None:
    """The per-article table, the gain curves and the plots to a W&B run (WANDB_MODE=offline works)."""
    import wandb

    if wandb.run is not None:  # an earlier stage's WandbLogger run in this process (stage=all): close it first
        wandb.finish()
    try:
        run = wandb.init(project=cfg.logger.wandb.get("project", "dynlm"), name=f"{cfg.name}-evaluate",
                         dir=str(out), config=OmegaConf.to_container(cfg.eval, resolve=True), job_type="evaluate")
    except wandb.errors.UsageError as e:
        raise DynlmError(f"W&B refused to start ({str(e).splitlines()[0]}); run `wandb login` or set "
                         "WANDB_MODE=offline") from None
    for split in splits:
        with open(out / f"articles-{split}.csv") as f:
            rows = list(csv.reader(f))
        run.log({f"{split}/articles": wandb.Table(columns=rows[0], data=rows[1:])})
        for m, r in results["splits"][split].items():
            run.summary[f"{split}/{m}/ppl"] = r["ppl"]
        for p in sorted((out / "plots").glob(f"*-{split}.png")):
            run.log({f"{split}/{p.stem}": wandb.Image(str(p))})
    run.finish()

