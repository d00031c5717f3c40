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
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from dynlm_pl import artifacts, report
from dynlm_pl.config import check_config
from dynlm_pl.data import UNK, Corpus, article_index, read_lines
from dynlm_pl.errors import DynlmError, require
from dynlm_pl.files import atomic_write_text, file_sha256
from dynlm_pl.fisher import FisherArtifact
from dynlm_pl.meta.rules import RecordingGateRule, Rule, build_rule
from dynlm_pl.meta.scoring import method_losses, static_losses
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.models import Backbone
from dynlm_pl.runtime import make_datamodule, run_dir, tuned_baselines

# ----------------------------------------------------------------------------------------------------
# Building each method's rule
# ----------------------------------------------------------------------------------------------------


def _meta_rule(path: Path, lm: Backbone, lm_sha: str,
               art: FisherArtifact | None) -> tuple[RecordingGateRule, DynamicWeights]:
    meta, dyn = artifacts.load_meta_for(path, lm, lm_sha, art)
    return RecordingGateRule(meta, dyn), dyn


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


@dataclass
class Methods:
    """Each method's rule (None: static) and dynamic weights, the methods skipped and why, the tuned baselines'
    hyperparameters, and the hashes of the artifacts read."""

    rules: dict[str, Rule | None] = field(default_factory=dict)
    dyns: dict[str, DynamicWeights] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)


def _texts(cfg: DictConfig, lm_path: Path,
           prov: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, list], Corpus, list[str], Tensor | None]:
    """(tokens per split, article starts per split, corpus, splits to evaluate, validation split or None)."""
    if cfg.data.source == "textfile":
        require(prov.get("vocab"), f"{lm_path} does not carry its vocabulary; retrain it with this version")
        splits_t, articles, corpus = _textfile(cfg, prov["vocab"])
        return splits_t, articles, corpus, ["text"], None
    corpus = make_datamodule(cfg).load()
    artifacts.check_same_data(prov, corpus.vocab_hash, f"the LM in {lm_path}")
    splits = list(cfg.eval.splits)
    for s in splits:
        require(s in ("valid", "test"), f"eval.splits has {s!r}; use valid and/or test")
    return corpus.splits, corpus.articles, corpus, splits, corpus.splits["valid"]


def _methods(cfg: DictConfig, out: Path, lm: Backbone, lm_sha: str, valid: Tensor | None) -> Methods:
    """The rules of eval.methods: meta.ckpt / meta_noflush.ckpt loaded, sgd and rms tuned (tuned.json)."""
    e, ms = cfg.eval, Methods(hashes={"lm.ckpt": lm_sha})
    art = artifacts.load_fisher_optional(out, lm_sha)
    base_dyn = DynamicWeights.build(lm, fisher_art=art)
    if art is not None:
        ms.hashes["fisher.pt"] = file_sha256(out / "fisher.pt")
    for m in e.methods:
        path = out / f"{m}.ckpt"
        if m == "rms" and art is None:
            ms.notes[m] = "skipped: needs fisher.pt (python train.py stage=fisher)"
        elif m in ("meta", "meta_noflush") and not path.is_file():
            ms.notes[m] = f"skipped: no {path.name} (python train.py stage=meta" + \
                (" gate.flush=false)" if m == "meta_noflush" else ")")
        elif m in ("meta", "meta_noflush"):
            ms.rules[m], ms.dyns[m] = _meta_rule(path, lm, lm_sha, art)
            ms.rules[m].gates.fused = bool(e.get("fused_gate", False))  # one compiled pass over θ per update
            ms.hashes[path.name] = file_sha256(path)
        else:
            ms.rules[m] = None  # static; sgd and rms are built after tuning
    for m, why in ms.notes.items():
        print(f"[evaluate] {m}: {why}")
    need_tune = [m for m in ("sgd", "rms") if m in ms.rules]
    if need_tune:
        require(valid is not None, "tuning sgd/rms needs the validation split: evaluate a text file with "
                "eval.methods=[static,meta] or run on the corpus the LM was trained on first")
        ms.tuned = tuned_baselines(cfg, out, lm, valid, base_dyn, lm_sha, need_tune)
        for m in need_tune:
            ms.rules[m], ms.dyns[m] = build_rule(m, ms.tuned[m]["hparams"], base_dyn), base_dyn
    return ms


def _score_method(cfg: DictConfig, lm: Backbone, tokens: Tensor, m: str, rule: Rule | None,
                  dyn: DynamicWeights | None) -> tuple[np.ndarray, list[float] | None, Tensor | None, float]:
    """Per-token losses of one method over `tokens`, its drift record (None for static), its gate history
    [n_points, 3, n_tensors] (meta only) and the seconds it took."""
    e = cfg.eval
    t0, drift, gates = time.time(), None, None
    if rule is None:
        lt = static_losses(lm, tokens, int(cfg.data.bptt), progress=True, streams=int(e.get("streams", 1)))
    else:
        if isinstance(rule, RecordingGateRule):
            rule.history, rule.n = [], 0
        lt, drift = method_losses(lm, tokens, rule, int(e.segment), dyn, int(e.get("streams", 1)),
                                  bool(e.get("shared_theta", False)), e.get("max_drift"), progress=True)
        if m == "meta" and isinstance(rule, RecordingGateRule) and rule.history:
            gates = torch.stack(rule.history)
    return lt.double().cpu().numpy(), drift, gates, time.time() - t0


def _evaluate_split(cfg: DictConfig, out: Path, lm: Backbone, ms: Methods, split: str, tokens: Tensor,
                    articles: list[tuple[int, str]], corpus: Corpus) -> dict[str, Any]:
    """Every method over one split: its results row per method, and the split's files (losses, CSV, plots)."""
    losses: dict[str, np.ndarray] = {}
    rows: dict[str, list[dict]] = {}
    res: dict[str, Any] = {}
    gates: Tensor | None = None
    for m, rule in ms.rules.items():
        arr, drift, g, sec = _score_method(cfg, lm, tokens, m, rule, ms.dyns.get(m))
        gates = g if g is not None else gates
        require(np.isfinite(arr).all(), f"{m} produced non-finite losses on {split}; lower its learning rate")
        losses[m], rows[m] = arr, report.per_article(arr, articles)
        res[m] = {"ppl": math.exp(arr.mean()), "loss": float(arr.mean()), "tokens": int(arr.size),
                  "tokens_per_s": arr.size / sec, "seconds": sec, "hparams": ms.tuned.get(m, {}).get("hparams", {})}
        if drift is not None:
            require(all(map(math.isfinite, drift)), f"{m} drove the weights to inf/NaN on {split}")
            res[m]["theta_drift_max"], res[m]["theta_drift_final"] = max(drift, default=0.0), \
                (drift[-1] if drift else 0.0)
        print(f"[evaluate] {split} {m:>12}: ppl {res[m]['ppl']:8.2f}  ({arr.size / sec:,.0f} tok/s)", flush=True)
    _write_split(out, out / "plots", split, tokens, corpus.vocab, articles, losses, rows, gates, ms.dyns.get("meta"),
                 int(cfg.eval.html_articles), int(cfg.eval.smooth))
    return res


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python evaluate.py`: every method of eval.methods over eval.splits -> results.json, results.md and the
    per-split files in the run directory."""
    out = run_dir(check_config(cfg))
    e = cfg.eval
    lm_path = out / "lm.ckpt"
    lm, prov = artifacts.load_lm(lm_path)
    lm_sha = file_sha256(lm_path)
    splits_t, articles, corpus, splits, valid = _texts(cfg, lm_path, prov)
    ms = _methods(cfg, out, lm, lm_sha, valid)
    n_streams, limit = int(e.get("streams", 1)), e.get("max_tokens")
    results: dict[str, Any] = {
        "protocol": {"streams": n_streams, "theta": "shared" if e.get("shared_theta") and n_streams > 1
                     else "per stream", "segment": int(e.segment), "order": "score then update", "max_tokens": limit,
                     "ppl": "exp(total loss / tokens scored)", "static_window": int(cfg.data.bptt),
                     "max_drift": e.get("max_drift")},
        "checkpoints": ms.hashes, "data": {"source": corpus.source, "vocab": corpus.vocab_hash},
        "skipped": ms.notes, "splits": {}}
    (out / "plots").mkdir(exist_ok=True)
    for split in splits:
        tokens, arts = splits_t[split], articles[split]
        if limit is not None and tokens.numel() > int(limit):  # a prefix: every method reads the same tokens
            tokens = tokens[: int(limit)]
            arts = [(o, t) for o, t in arts if o < tokens.numel()]
            print(f"[evaluate] {split}: first {tokens.numel():,} tokens (eval.max_tokens)")
        results["splits"][split] = _evaluate_split(cfg, out, lm, ms, split, tokens, arts, corpus)
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

