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
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from dynlm_pl import artifacts, report
from dynlm_pl.config import check_config
from dynlm_pl.data import UNK, Corpus, encode_file
from dynlm_pl.errors import DynlmError, require
from dynlm_pl.files import atomic_write_bytes, atomic_write_text, file_sha256
from dynlm_pl.fisher import FisherArtifact
from dynlm_pl.meta.rules import RecordingGateRule, Rule, build_rule
from dynlm_pl.meta.scoring import method_losses, static_losses
from dynlm_pl.meta.tuning import init_worker
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.models import Backbone
from dynlm_pl.runtime import (
    finish_wandb,
    flat_config,
    make_datamodule,
    run_dir,
    run_lock,
    tuned_baselines,
    wandb_settings,
)

log = logging.getLogger(__name__)

# The methods every other method's perplexity is compared with: ratio and paired-bootstrap interval (results.json).
BASELINES = ("static", "sgd", "rms", "rms_pt")
TUNED = ("sgd", "rms", "rms_pt")  # tuned on the selection slice (tuned.json)

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
    require(path.is_file(), f"data file {path} does not exist; check data.path")
    corpus = Corpus(vocab, {}, {}, "textfile:" + file_sha256(path))
    require(UNK in corpus.stoi, f"the LM's vocabulary has no {UNK}: it cannot read unseen words in {path}")
    tokens, articles = encode_file(path, corpus)
    require(tokens.numel() >= 2, f"{path} has fewer than 2 tokens; give it some text")
    unk = float((tokens == corpus.stoi[UNK]).float().mean())
    if unk > 0.5:
        log.warning(f"[evaluate] warning: {100 * unk:.0f}% of the tokens of {path} are unknown to the LM ({UNK})")
    return {"text": tokens}, {"text": articles}, corpus


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
        if m in ("rms", "rms_pt") and art is None:
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
        log.info(f"[evaluate] {m}: {why}")
    need_tune = [m for m in TUNED if m in ms.rules]
    if need_tune:  # (a text file has no validation split: the baselines tuned on the LM's own corpus, tuned.json)
        ms.tuned = tuned_baselines(cfg, out, lm, valid, base_dyn, lm_sha, need_tune)
        for m in need_tune:
            ms.rules[m], ms.dyns[m] = build_rule(m, ms.tuned[m]["hparams"], base_dyn), base_dyn
    return ms


@dataclass
class Scored:
    """One method over one split: per-token losses [N-1] (float64, stream order), seconds, ‖θ_t − θ_0‖ at its
    largest and at the end (adaptive methods), and the gate history [n_points, 3, n_tensors] (meta)."""

    losses: np.ndarray
    seconds: float
    drift: tuple[float, float] | None = None
    gates: np.ndarray | None = None
    reused: bool = False


class RunningPpl:
    """The perplexity so far of one method along a split, sent as (tokens read, ppl) every `every` tokens (and at
    the end of the split): what evaluate.py logs live to W&B, with the token position as the x-axis."""

    def __init__(self, send: Callable[[int, float], None], total: int, points: int = 100) -> None:
        self.send, self.total, self.every = send, total, max(1, total // points)
        self.sum, self.n, self.next = 0.0, 0, self.every

    def __call__(self, losses: Tensor) -> None:  # a segment's (or window's) losses [B, t]
        self.sum += float(losses.double().sum())
        self.n += losses.numel()
        if self.n >= self.next or self.n >= self.total:
            self.send(self.n, math.exp(min(self.sum / self.n, 50.0)))
            self.next = (self.n // self.every + 1) * self.every


def _score_method(cfg: DictConfig, lm: Backbone, tokens: Tensor, m: str, rule: Rule | None,
                  dyn: DynamicWeights | None, label: str, running: RunningPpl | None = None) -> Scored:
    """Per-token losses of one method over `tokens` (a progress bar named `label`; `running` gets the losses as they
    come)."""
    e = cfg.eval
    t0, drift, gates = time.time(), None, None
    if rule is None:
        lt = static_losses(lm, tokens, int(cfg.data.bptt), progress=label, streams=int(e.get("streams", 1)),
                           on_window=running)
    else:
        if isinstance(rule, RecordingGateRule):
            rule.history, rule.n = [], 0
        lt, d = method_losses(lm, tokens, rule, int(e.segment), dyn, int(e.get("streams", 1)),
                              bool(e.get("shared_theta", False)), e.get("max_drift"), progress=label,
                              on_segment=running)
        require(all(map(math.isfinite, d)), f"{label} drove the weights to inf/NaN; lower its learning rate")
        drift = (max(d, default=0.0), d[-1] if d else 0.0)
        if m == "meta" and isinstance(rule, RecordingGateRule) and rule.history:
            gates = torch.stack(rule.history).numpy()
    arr = lt.double().cpu().numpy()
    require(np.isfinite(arr).all(), f"{label} produced non-finite losses; lower its learning rate")
    return Scored(arr, time.time() - t0, drift, gates)


# ----------------------------------------------------------------------------------------------------
# Each method's losses kept on disk (eval/<split>-<method>.npz): resume per method, and parallel workers
# ----------------------------------------------------------------------------------------------------


def _method_key(cfg: DictConfig, ms: Methods, m: str, split: str, tokens: Tensor) -> dict[str, Any]:
    """What a method's losses on a split depend on: a cached file is reused only under the same key."""
    e = cfg.eval
    ckpts = {k: v for k, v in ms.hashes.items()
             if k == "lm.ckpt" or (k == "fisher.pt" and m != "static" and m != "sgd") or k == f"{m}.ckpt"}
    return {"method": m, "split": split, "tokens": int(tokens.numel()),
            "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(), "checkpoints": ckpts,
            "hparams": ms.tuned.get(m, {}).get("hparams", {}), "segment": int(e.segment),
            "streams": int(e.get("streams", 1)), "shared_theta": bool(e.get("shared_theta", False)),
            "max_drift": e.get("max_drift"), "static_window": int(cfg.data.bptt),
            "fused_gate": bool(e.get("fused_gate", False))}


def _save_scored(path: Path, key: dict[str, Any], sc: Scored) -> None:
    buf = io.BytesIO()
    info = {"key": key, "seconds": sc.seconds, "drift": sc.drift}
    extra = {} if sc.gates is None else {"gates": sc.gates}
    np.savez(buf, losses=sc.losses, info=np.array(json.dumps(info)), **extra)
    atomic_write_bytes(path, buf.getvalue())


def _load_scored(path: Path, key: dict[str, Any]) -> Scored | None:
    """The kept losses if `path` holds them under `key` (else None: computed anew and replaced)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            info = json.loads(str(z["info"]))
            if info["key"] != json.loads(json.dumps(key)):
                return None
            drift = tuple(info["drift"]) if info["drift"] is not None else None
            gates = z["gates"] if "gates" in z.files else None
            return Scored(z["losses"], float(info["seconds"]), drift, gates, True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def _compute(cfg: DictConfig, lm: Backbone, ms: Methods, split: str, tokens: Tensor, m: str, path: Path,
             key: dict[str, Any], send: Callable[[str, int, float], None] | None = None) -> None:
    """Score method `m` over the split and keep its losses at `path`; `send(m, tokens read, ppl so far)` along it."""
    label = f"{split} {m}"
    running = None if send is None else RunningPpl(functools.partial(send, m), tokens.numel() - 1)
    sc = _score_method(cfg, lm, tokens, m, ms.rules[m], ms.dyns.get(m), label, running)
    _save_scored(path, key, sc)
    log.info(f"[evaluate] {label:>18}: ppl {math.exp(sc.losses.mean()):8.2f}  "
             f"({sc.losses.size / sc.seconds:,.0f} tok/s, {sc.seconds:.0f}s)")


def _in_worker(job: Callable[[], None]) -> None:
    """A forked worker: one thread (the workers share the cores), the job, then exit without running the parent's
    atexit handlers or finalizers; a failure prints its one line and exits 2."""
    code = 0
    try:
        init_worker()
        job()
    except DynlmError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_parallel(jobs: dict[str, Callable[[], None]], workers: int,
                  on_done: Callable[[str], None] = lambda name: None,
                  inbox: tuple[multiprocessing.connection.Connection, Callable[[Any], None]] | None = None) -> None:
    """Run the jobs in forked processes, `workers` at a time (non-daemonic: the compiled gate may start its own
    compile workers); every job runs even if one fails, so what finished is kept; then a failure is one line.
    `on_done(name)` as each job succeeds. `inbox`: (the read end of a pipe the jobs write to, what to do with each
    message), read while they run."""
    ctx = multiprocessing.get_context("fork")
    todo, running, failed = list(jobs.items()), {}, []
    reader, on_message = inbox if inbox is not None else (None, None)

    def drain() -> None:
        while reader is not None and reader.poll():
            on_message(reader.recv())

    while todo or running:
        while todo and len(running) < workers:
            name, job = todo.pop(0)
            p = ctx.Process(target=_in_worker, args=(job,), name=name)
            p.start()
            running[p.sentinel] = p
        ready = multiprocessing.connection.wait([*running, *([reader] if reader is not None else [])])
        drain()
        for sentinel in (s for s in ready if s in running):
            p = running.pop(sentinel)
            p.join()
            if p.exitcode != 0:
                failed.append(f"{p.name} (exit status {p.exitcode})")
            else:
                on_done(p.name)
    drain()
    require(not failed, f"evaluation of {', '.join(failed)} failed in its worker process (its message is above); "
            "the methods that finished are kept under eval/: fix the cause and rerun the same command")


def _running_to(live: Any, split: str, methods: list[str], parallel: bool) -> tuple[Any, Any]:
    """(send, inbox) for `_compute` and `_run_parallel`: each method's running perplexity logged to the W&B run
    `live` as `{split}/{m}/running_ppl` against its own x-axis `{split}/{m}/tokens` (the methods advance at
    different speeds); from forked workers through a pipe the parent reads. (None, None) without a run."""
    if live is None:
        return None, None
    for m in methods:
        live.define_metric(f"{split}/{m}/running_ppl", step_metric=f"{split}/{m}/tokens")

    def log_running(msg: tuple[str, int, float]) -> None:
        m, n, ppl = msg
        live.log({f"{split}/{m}/tokens": n, f"{split}/{m}/running_ppl": ppl})

    if not parallel:
        return lambda m, n, ppl: log_running((m, n, ppl)), None
    reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)  # messages < PIPE_BUF: atomic writes
    return lambda m, n, ppl: writer.send((m, n, ppl)), (reader, log_running)


def _score_split(cfg: DictConfig, out: Path, lm: Backbone, ms: Methods, split: str,
                 tokens: Tensor, live: Any = None) -> dict[str, Scored]:
    """Every method over one split: kept losses are reused, the rest computed (in parallel with eval.workers);
    `live`: a W&B run that gets each method's running perplexity along the split (from the worker processes too)
    and its perplexity as it finishes."""
    (out / "eval").mkdir(exist_ok=True)
    keys = {m: _method_key(cfg, ms, m, split, tokens) for m in ms.rules}
    paths = {m: out / "eval" / f"{split}-{m}.npz" for m in ms.rules}
    todo = [m for m in ms.rules if _load_scored(paths[m], keys[m]) is None]
    reused = [m for m in ms.rules if m not in todo]
    if reused:
        log.info(f"[evaluate] {split}: reusing {', '.join(reused)} from {out / 'eval'}")
    workers = int(cfg.eval.get("workers", 1))
    parallel = workers > 1 and len(todo) > 1
    send, inbox = _running_to(live, split, todo, parallel)
    jobs = {m: functools.partial(_compute, cfg, lm, ms, split, tokens, m, paths[m], keys[m], send) for m in todo}
    finished: list[str] = []

    def done(m: str) -> None:
        finished.append(m)
        sc = _load_scored(paths[m], keys[m]) if live is not None else None
        if sc is not None:
            live.log({f"{split}/{m}/ppl": math.exp(sc.losses.mean()), f"{split}/methods_done": len(finished)})

    if parallel:
        names = {f"{split} {m}": m for m in todo[::-1]}  # meta, the slowest, first
        _run_parallel({n: jobs[m] for n, m in names.items()}, workers, lambda n: done(names[n]), inbox)
    else:
        for m, job in jobs.items():
            job()
            done(m)
    scored: dict[str, Scored] = {}
    for m in ms.rules:
        sc = _load_scored(paths[m], keys[m])
        require(sc is not None, f"{paths[m]} was not written; rerun the same command")
        scored[m] = dataclasses.replace(sc, reused=m in reused)
    return scored


def _evaluate_split(cfg: DictConfig, out: Path, lm: Backbone, ms: Methods, split: str, tokens: Tensor,
                    articles: list[tuple[int, str]], corpus: Corpus, live: Any = None) -> dict[str, Any]:
    """Every method over one split: its results row per method (with the intervals of its ratios to the
    baselines), and the split's files (losses, CSV, plots)."""
    scored = _score_split(cfg, out, lm, ms, split, tokens, live)
    losses = {m: sc.losses for m, sc in scored.items()}
    rows = {m: report.per_article(arr, articles) for m, arr in losses.items()}
    b = cfg.eval.get("bootstrap") or {}
    boot = {"resamples": int(b.get("resamples", 2000)), "seed": int(b.get("seed", 0)),
            "level": float(b.get("level", 0.95))}
    res: dict[str, Any] = {}
    for m, sc in scored.items():
        arr = sc.losses
        res[m] = {"ppl": math.exp(arr.mean()), "loss": float(arr.mean()), "tokens": int(arr.size),
                  "tokens_per_s": arr.size / sc.seconds, "seconds": sc.seconds, "reused": sc.reused,
                  "hparams": ms.tuned.get(m, {}).get("hparams", {}),
                  "vs": {base: report.paired_bootstrap(arr, losses[base], articles, **boot)
                         for base in BASELINES if base in losses and base != m}}
        if sc.drift is not None:
            res[m]["theta_drift_max"], res[m]["theta_drift_final"] = sc.drift
    gates = scored["meta"].gates if "meta" in scored else None
    _write_split(out, out / "plots", split, tokens, corpus.vocab, articles, losses, rows,
                 None if gates is None else torch.from_numpy(gates), ms.dyns.get("meta"),
                 int(cfg.eval.html_articles), int(cfg.eval.smooth))
    for a, bname in (("meta", "rms"), ("meta", "rms_pt")):
        if a in losses and bname in losses:
            report.plot_article_ratio(losses[a], losses[bname], articles, res[a]["vs"][bname], a, bname,
                                      out / "plots" / f"{a}-vs-{bname}-{split}.png")
    return res


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python evaluate.py`: every method of eval.methods over eval.splits -> results.json, results.md and the
    per-split files in the run directory (holding its lock: one writer per run directory)."""
    with run_lock(check_config(cfg), "evaluate"):
        return _run(cfg)


def _run(cfg: DictConfig) -> dict[str, Any]:
    out = run_dir(cfg)
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
                     "max_drift": e.get("max_drift"), "bootstrap": OmegaConf.to_container(e.bootstrap, resolve=True)
                     if e.get("bootstrap") else None},
        "checkpoints": ms.hashes, "data": {"source": corpus.source, "vocab": corpus.vocab_hash},
        "lm": {"tokens_seen": prov.get("tokens_seen")},
        "skipped": ms.notes, "tuning": ms.tuned, "roles": _roles(cfg, out, ms, valid), "splits": {}}
    (out / "plots").mkdir(exist_ok=True)
    live = _open_wandb(cfg, out) if cfg.get("logger") and "wandb" in cfg.logger else None  # methods as they finish
    read: dict[str, list[tuple[int, str]]] = {}  # the articles each split's evaluation read
    for split in splits:
        tokens, arts = splits_t[split], articles[split]
        if limit is not None and tokens.numel() > int(limit):  # a prefix: every method reads the same tokens
            tokens = tokens[: int(limit)]
            arts = [(o, t) for o, t in arts if o < tokens.numel()]
            log.info(f"[evaluate] {split}: first {tokens.numel():,} tokens (eval.max_tokens)")
        results["roles"][f"evaluation ({split})"] = f"{split}[0:{tokens.numel()}]"
        results["splits"][split] = _evaluate_split(cfg, out, lm, ms, split, tokens, arts, corpus, live)
        read[split] = arts
    md = _markdown(results)
    results["markdown"] = md
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.md", md + "\n")
    if ms.tuned:
        atomic_write_text(out / "tuning.md", _tuning_markdown(ms.tuned) + "\n")
    log.info(md)
    if live is not None:
        _to_wandb(live, out, results, read)
    return results


def _roles(cfg: DictConfig, out: Path, ms: Methods, valid: Tensor | None) -> dict[str, str]:
    """Which tokens each role read: the baselines' tuning, and φ's selection and meta-training (from meta.ckpt)."""
    roles: dict[str, str] = {}
    if ms.tuned and valid is not None:
        roles["tuning (sgd, rms, rms_pt)"] = f"valid[0:{min(int(cfg.eval.tune.tokens), valid.numel())}]"
    for m in ("meta", "meta_noflush"):
        if m in ms.rules:
            for role, where in (artifacts.meta_provenance(out / f"{m}.ckpt").get("roles") or {}).items():
                roles[f"{role} ({m})"] = where
    return roles


def _write_split(out: Path, plots: Path, split: str, tokens: Tensor, vocab: list[str],
                 articles: list[tuple[int, str]], losses: dict[str, np.ndarray], rows: dict[str, list[dict]],
                 gates: Tensor | None, dyn: DynamicWeights | None, html_articles: int, window: int) -> None:
    buf32 = io.BytesIO()
    np.savez_compressed(buf32, **{m: v.astype(np.float32) for m, v in losses.items()})
    atomic_write_bytes(out / f"losses-{split}.npz", buf32.getvalue())
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
    report.save_figure(fig, path, dpi=100)


def _ratio(r: dict[str, Any], base: str) -> str:
    """'ratio [lo, hi]' of ppl to `base` from the row's paired bootstrap, or '' when `base` was not evaluated."""
    v = r.get("vs", {}).get(base)
    return f"{v['ratio']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}]" if v else ""


def _hparams(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in hp.items())


def _markdown(results: dict[str, Any]) -> str:
    """One table per split: ppl, the gain over static, and the ratio of ppl to rms and rms_pt with the
    paired-bootstrap interval over articles (below 1: better than that baseline)."""
    out = []
    level = (results["protocol"].get("bootstrap") or {}).get("level", 0.95)
    cols = ["method", "ppl", "vs static", f"÷ rms [{100 * level:.0f}% CI]", f"÷ rms_pt [{100 * level:.0f}% CI]",
            "tokens/s", "seconds", "hyperparameters"]
    for split, res in results["splits"].items():
        rows = []
        for m, r in res.items():
            st = r.get("vs", {}).get("static")
            gain = f"{100 * (1 - st['ratio']):+.1f}% [{100 * (1 - st['hi']):+.1f}, {100 * (1 - st['lo']):+.1f}]" \
                if st else ""
            rows.append({"method": m, "ppl": r["ppl"], "vs static": gain, cols[3]: _ratio(r, "rms"),
                         cols[4]: _ratio(r, "rms_pt"), "tokens/s": f"{r['tokens_per_s']:,.0f}",
                         "seconds": r["seconds"], "hyperparameters": _hparams(r["hparams"])})
        pr = results["protocol"]
        streams = "one stream" if pr["streams"] == 1 else f"{pr['streams']} streams, θ {pr['theta']}"
        n_art = next((v["articles"] for r in res.values() for v in r.get("vs", {}).values()), None)
        out.append(f"**{split}** (segment {pr['segment']}, {streams}, {next(iter(res.values()))['tokens']:,} "
                   f"tokens{f', {n_art} articles' if n_art else ''}, max_drift {pr['max_drift'] or 'off'})\n\n"
                   + report.markdown_table(rows, cols))
    roles = results.get("roles") or {}
    if roles:
        out.append("Data roles: " + "; ".join(f"{k} {v}" for k, v in roles.items()))
    return "\n\n".join(out)


def _tuning_markdown(tuned: dict[str, dict[str, Any]]) -> str:
    """Every trial of the baselines' tuning, in the order run (tuned.json holds the same)."""
    parts = []
    for m, t in tuned.items():
        rows = [{"trial": k, "hyperparameters": _hparams({h: v for h, v in r.items() if h not in ("loss", "seconds")}),
                 "ppl": math.exp(min(r["loss"], 50.0)), "seconds": r.get("seconds", math.nan)}
                for k, r in enumerate(t["trials"])]
        parts.append(f"**{m}**: {len(rows)} trials, chosen {_hparams(t['hparams'])} (ppl "
                     f"{math.exp(min(t['tune_loss'], 50.0)):.2f})\n\n"
                     + report.markdown_table(rows, ["trial", "hyperparameters", "ppl", "seconds"]))
    return "\n\n".join(parts)


def _open_wandb(cfg: DictConfig, out: Path) -> Any:
    """evaluate.py's W&B run (the settings of every stage: runtime.wandb_settings; WANDB_MODE=offline works), opened
    before the methods run: each one's perplexity is logged as it finishes (`_score_split`)."""
    import wandb

    finish_wandb()  # an earlier run in this process (the stages finish theirs; a caller's may be open)
    try:
        return wandb.init(**wandb_settings(cfg, "evaluate"), dir=str(out), config=flat_config(cfg))
    except wandb.errors.UsageError as e:
        raise DynlmError(f"W&B refused to start ({str(e).splitlines()[0]}); run `wandb login` or set "
                         "WANDB_MODE=offline") from None


def _to_wandb(run: Any, out: Path, results: dict[str, Any], articles: dict[str, list[tuple[int, str]]]) -> None:
    """The end of evaluate.py's W&B run (`_open_wandb`): per split a numeric per-article table (ppl per method, gain %
    vs static and vs rms) with a bar chart of meta's gain from it, the gain along the stream, summary metrics
    `{split}/{method}/ppl`, `…/gain_vs_static`, `…/gain_vs_rms` (%, with the bootstrap interval's ends), the plots
    and the token view; results.json, results.md and tuned.json as an artifact (with logger.wandb.log_model, the
    checkpoints too)."""
    import wandb

    for split, arts in articles.items():
        res = results["splits"][split]
        with np.load(out / f"losses-{split}.npz") as z:  # the split's per-token losses, read once for both
            losses = {m: z[m].astype(np.float64) for m in z.files}
        table = _article_table(losses, list(res), arts)
        run.log({f"{split}/articles": table})
        gain = next((c for c in table.columns if c == "gain_vs_static_meta"), None)
        if gain:
            run.log({f"{split}/meta_gain_per_article": wandb.plot.bar(table, "title", gain,
                                                                      title=f"meta's gain over static ({split}, %)")})
        run.summary.update(_summary(split, res))
        series = _gain_series(losses, split, int(run.config["eval.smooth"]))
        if series is not None:
            run.log({f"{split}/gain_along_stream": series})
        for p in sorted((out / "plots").glob(f"*-{split}.png")):
            run.log({f"{split}/{p.stem}": wandb.Image(str(p))})
        html = out / "plots" / f"tokens-{split}.html"
        if html.is_file():
            run.log({f"{split}/tokens": wandb.Html(html.read_text())})
    art = wandb.Artifact(f"{run.config['name']}-results", type="results")
    files = ["results.json", "results.md", "tuned.json"]
    if run.config.get("logger.wandb.log_model"):  # the checkpoints the results are of, too
        files += ["lm.ckpt", "fisher.pt", "meta.ckpt", "meta_noflush.ckpt"]
    for name in files:
        if (out / name).is_file():
            art.add_file(str(out / name))
    run.log_artifact(art)
    run.finish()


def _article_table(losses: dict[str, np.ndarray], methods: list[str], articles: list[tuple[int, str]]) -> Any:
    """A numeric wandb.Table of one split's articles: title, tokens, ppl per method, and each adaptive method's
    gain % (perplexity reduction) vs static and vs rms, from its per-token losses."""
    import wandb

    rows = {m: report.per_article(losses[m], articles) for m in methods if m in losses}
    pairs = [(m, b) for b in ("static", "rms") if b in rows for m in rows if m not in (b, "static")]
    cols = ["article", "title", "tokens", *[f"ppl_{m}" for m in rows], *[f"gain_vs_{b}_{m}" for m, b in pairs]]
    data = []
    for k, r in enumerate(rows[methods[0]]):
        ppl = {m: rows[m][k]["ppl"] for m in rows}
        data.append([k, r["title"], r["tokens"], *ppl.values(),
                     *[100.0 * (1.0 - ppl[m] / ppl[b]) for m, b in pairs]])
    return wandb.Table(columns=cols, data=data)


def _gain_series(losses: dict[str, np.ndarray], split: str, window: int, points: int = 1000) -> Any:
    """W&B line series of each adaptive method's perplexity gain over static along the stream (report.gain_curve,
    the gain plot's curves), at `points` token positions; None without static."""
    import wandb

    if "static" not in losses or len(losses) < 2:
        return None
    n = len(losses["static"])
    at = np.unique(np.linspace(0, n - 1, min(points, n)).astype(int))
    methods = [m for m in losses if m != "static"]
    ys = [report.gain_curve(losses[m], losses["static"], window)[at].tolist() for m in methods]
    return wandb.plot.line_series(xs=at.tolist(), ys=ys, keys=methods, title=f"ppl gain over static ({split})",
                                  xname="token")


def _summary(split: str, res: dict[str, Any]) -> dict[str, float]:
    """`{split}/{method}/ppl` and the gains vs static and rms in % (1 − ratio of perplexities), with the paired
    bootstrap interval's ends (`…_lo`, `…_hi`)."""
    out: dict[str, float] = {}
    for m, r in res.items():
        out[f"{split}/{m}/ppl"] = r["ppl"]
        for base, v in r["vs"].items():
            if base in ("static", "rms"):
                key = f"{split}/{m}/gain_vs_{base}"
                out[key] = 100.0 * (1.0 - v["ratio"])
                out[key + "_lo"], out[key + "_hi"] = 100.0 * (1.0 - v["hi"]), 100.0 * (1.0 - v["lo"])
    return out

