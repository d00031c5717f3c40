"""Tuning the hand-designed rules (sgd, rms, rms_pt) on the selection slice, Krause et al.'s way, so that the
baselines the learned rule is compared with are as strong as a search makes them.

- sgd: a grid of η, then a compass search around the best.
- rms: Krause's grid (dynamiceval.py --grid: η ∈ {3, 4, 5, 6, 7, 10}·10⁻⁵, λ ∈ {1, 2, 3, 5}·10⁻³, both scaled by
  segment/5) plus λ = 0, then a compass search that can also move λ off zero: whichever tunes best is the baseline.
- rms_pt: Krause's rule with η and λ per group of tensors (`tensor_group`: the embedding, each layer, the biases),
  by coordinate search from the tuned rms rule, one group at a time.

Every trial (hyperparameters, loss, seconds) is kept: tuned.json and results.json report them all. Trials are
independent adaptive evaluations of the slice; with `workers` > 1 each batch of them (a grid, the poll points of a
search step) runs in forked processes of one thread each.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from dynlm_pl.meta.rules import build_rule
from dynlm_pl.meta.scoring import adaptive_eval
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.models import Backbone

log = logging.getLogger(__name__)

KRAUSE_SEGMENT = 5  # the segment length Krause's grids are stated for; they scale with segment / 5

# What a trial needs, set before the worker processes fork so that they inherit it instead of unpickling an LM.
_STATE: dict[str, Any] = {}


def init_worker() -> None:
    """Set up a forked worker process: one thread (the workers share the cores), and torch.compile compiling in
    this process: the parent's compile thread pool (if it compiled, e.g. the meta stage's fused gate) does not
    exist after fork, and a compile waiting on it would wait forever."""
    torch.set_num_threads(1)
    if "torch._inductor.config" in sys.modules:
        sys.modules["torch._inductor.config"].compile_threads = 1


def _trial(method: str, hp: dict[str, float]) -> tuple[float, float]:
    """(mean token loss, seconds) of `method` with `hp` over the tuning slice; inf for a diverged rule."""
    s, t0 = _STATE, time.time()
    rule = build_rule(method, hp, s["dyn"])
    loss = float(adaptive_eval(s["lm"], s["tokens"], rule, s["segment"], s["dyn"], max_drift=s["max_drift"]).mean())
    return (loss if math.isfinite(loss) else math.inf), time.time() - t0


class Trials:
    """Memoized trials of one method: `trials([hp, ...]) -> [loss, ...]`, new points evaluated `workers` at a time."""

    def __init__(self, method: str, pool: Any | None, workers: int = 1) -> None:
        self.method, self.pool, self.workers = method, pool, workers
        self.records: list[dict[str, Any]] = []  # {**hp, "loss", "seconds"} in the order they ran
        # trials run so far, and the best selection ppl: a searches' length is not known in advance
        self.bar = tqdm(desc=f"tune {method}", unit="trial", leave=False)

    def _known(self, hp: dict[str, float]) -> float | None:
        for t in self.records:
            if all(math.isclose(t[k], v, rel_tol=1e-9, abs_tol=0.0) for k, v in hp.items()):
                return t["loss"]
        return None

    def __call__(self, hps: list[dict[str, float]]) -> list[float]:
        new = [hp for k, hp in enumerate(hps) if self._known(hp) is None and hp not in hps[:k]]
        if self.pool is not None and len(new) > 1:
            results = self.pool.starmap(_trial, [(self.method, hp) for hp in new])
        else:
            results = [_trial(self.method, hp) for hp in new]
        for hp, (loss, sec) in zip(new, results, strict=True):
            self.records.append({**hp, "loss": loss, "seconds": sec})
        if new:
            self.bar.update(len(new))
            self.bar.set_postfix(best_ppl=f"{math.exp(min(self.best()['loss'], 50.0)):.2f}")
        return [self._known(hp) for hp in hps]  # type: ignore[misc]

    def best(self) -> dict[str, Any]:
        return min(self.records, key=lambda t: t["loss"])


Evaluate = Callable[[list[dict[str, float]]], list[float]]  # points -> their losses (a `Trials`)


def compass_search(hp: dict[str, float], trials: Evaluate, blocks: list[list[str]], step: float, rounds: int,
                   zero_to: Mapping[str, float], max_moves: int = 4) -> dict[str, float]:
    """Coordinate search in log space, one block of keys at a time: poll every key of the block ×step and ÷step
    (the poll points run in parallel), move to the best point that lowers the loss, up to `max_moves` times, then
    the next block; each round takes √step. A key at 0 polls `zero_to[key]` (the grid's smallest positive value)
    and step times it: zero is a value the search can leave, not a fixed point (and, two points instead of one, a
    poll from zero keeps both of two workers busy)."""
    best, best_loss = dict(hp), trials([hp])[0]
    for _ in range(rounds):
        for keys in blocks:
            for _move in range(max_moves):
                cands = [c for k in keys for c in _poll(best, k, step, zero_to)]
                losses = trials(cands)
                j = min(range(len(cands)), key=losses.__getitem__) if cands else None
                if j is None or not losses[j] < best_loss:
                    break
                best, best_loss = cands[j], losses[j]
        step = math.sqrt(step)
    return best


def _poll(hp: dict[str, float], key: str, step: float, zero_to: Mapping[str, float]) -> list[dict[str, float]]:
    v = hp[key]
    if v <= 0:
        z = float(zero_to.get(key, 0))
        return [{**hp, key: z}, {**hp, key: z * step}] if z > 0 else []
    return [{**hp, key: v * step}, {**hp, key: v / step}]


def krause_grid(grid: Mapping[str, Any], segment: int) -> tuple[list[float], list[float]]:
    """(η values, λ values) of the rms grid, scaled by segment / 5 when `grid.scale_with_segment` (Krause's rule:
    a longer segment takes proportionally larger, rarer steps)."""
    scale = segment / KRAUSE_SEGMENT if grid.get("scale_with_segment", True) else 1.0
    return [float(v) * scale for v in grid["rms_lr"]], [float(v) * scale for v in grid["rms_lamb"]]


def tune(lm: Backbone, tokens: Tensor, dyn: DynamicWeights, segment: int, grid: Mapping[str, Any],
         methods: list[str], max_drift: float | None = None, known: dict[str, dict[str, Any]] | None = None,
         on_done: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """{method: {"hparams", "tune_loss", "trials"}} for each of `methods` (sgd, rms, rms_pt) on `tokens`, the
    selection slice. rms_pt starts from rms's result: `known["rms"]` (tuned.json) or tuned here first.
    `on_done(method, result)` as each method finishes (tuned.json keeps it: a killed tuning loses one method)."""
    _STATE.update(lm=lm, tokens=tokens, dyn=dyn, segment=segment, max_drift=max_drift)
    workers = int(grid.get("workers", 1))
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=init_worker) if workers > 1 else None
    try:
        return _tune(grid, segment, methods, dyn.ms is not None, (pool, workers), tokens.numel(), known or {},
                     on_done or (lambda m, r: None))
    finally:
        if pool is not None:
            pool.terminate()
        _STATE.clear()


def _tune(grid: Mapping[str, Any], segment: int, methods: list[str], has_ms: bool, pool: tuple[Any | None, int],
          n_tokens: int, known: dict[str, dict[str, Any]],
          on_done: Callable[[str, dict[str, Any]], None]) -> dict[str, dict[str, Any]]:
    step, rounds = float(grid.get("refine_step", 3.0)), int(grid.get("refine", 2))
    eps = float(grid["rms_eps"])
    lrs, lambs = krause_grid(grid, segment)
    best: dict[str, dict[str, Any]] = {k: v for k, v in known.items() if k == "rms"}

    def finish(method: str, trials: Trials, hp: dict[str, float]) -> None:
        best[method] = {"hparams": hp, "tune_loss": trials([hp])[0], "trials": trials.records}
        trials.bar.close()
        log.info(f"[tune] {method} on {n_tokens:,} selection tokens ({len(trials.records)} trials, "
                 f"{sum(t['seconds'] for t in trials.records):.0f} trial-seconds): {hp} "
                 f"(ppl {math.exp(min(best[method]['tune_loss'], 50.0)):.2f})")
        on_done(method, best[method])

    if "sgd" in methods:
        trials = Trials("sgd", *pool)
        _grid(trials, [{"lr": float(v)} for v in grid["sgd_lr"]])
        hp = compass_search(_hp(trials.best()), trials, [["lr"]], step, rounds, {})
        finish("sgd", trials, hp)
    zero_to = {"lamb": min((v for v in lambs if v > 0), default=0.0)}
    if has_ms and ("rms" in methods or "rms_pt" in methods) and "rms" not in best:
        trials = Trials("rms", *pool)
        _grid(trials, [{"lr": a, "lamb": b, "eps": eps} for b, a in itertools.product(lambs, lrs)])
        hp = compass_search(_hp(trials.best()), trials, [["lr", "lamb"]], step, rounds, zero_to)
        finish("rms", trials, hp)
    if has_ms and "rms_pt" in methods:
        hp, trials = _tune_per_group(best["rms"], pool, grid, zero_to["lamb"])
        finish("rms_pt", trials, hp)
    return {m: best[m] for m in methods if m in best}


def _tune_per_group(rms_tuned: dict[str, Any], pool: tuple[Any | None, int], grid: Mapping[str, Any],
                    lamb_from_zero: float) -> tuple[dict[str, float], Trials]:
    """rms_pt: from the tuned rms rule (every group at its η, λ), a compass search over each group's (η, λ). The
    starting point is the rms rule itself: its loss is rms's (recorded with 0 seconds), not evaluated again."""
    rms = rms_tuned["hparams"]
    groups = list(dict.fromkeys(_STATE["dyn"].spec.groups))
    hp = {"eps": rms["eps"], **{f"lr@{g}": rms["lr"] for g in groups}, **{f"lamb@{g}": rms["lamb"] for g in groups}}
    trials = Trials("rms_pt", *pool)
    trials.records.append({**hp, "loss": float(rms_tuned["tune_loss"]), "seconds": 0.0})
    blocks = [[f"lr@{g}", f"lamb@{g}"] for g in groups]
    zero_to = {f"lamb@{g}": lamb_from_zero for g in groups}
    hp = compass_search(hp, trials, blocks, float(grid.get("pt_step", 2.0)), int(grid.get("pt_rounds", 1)), zero_to)
    return hp, trials


def _grid(trials: Trials, space: list[dict[str, float]]) -> None:
    """Evaluate a grid, `workers` points at a time."""
    n = trials.workers
    for k in range(0, len(space), n):
        trials(space[k : k + n])


def _hp(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if k not in ("loss", "seconds")}
