"""Tuning the hand-designed rules (sgd, rms) on a validation slice, so that the baselines the learned rule is
compared with are as strong as a search makes them."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor
from tqdm import tqdm

from dynlm_pl.meta.rules import build_rule
from dynlm_pl.meta.scoring import adaptive_eval
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.models import Backbone


def tune(lm: Backbone, tokens: Tensor, dyn: DynamicWeights, segment: int, grid: Mapping[str, Any],
         methods: list[str], max_drift: float | None = None) -> dict[str, dict[str, Any]]:
    """Grid search of `sgd` lr and `rms` (lr, λ) on `tokens` (a validation slice), then a pattern search
    around the grid's best (`grid.refine` rounds): lowest loss wins.

    Why the refinement: a coarse grid whose best sits on its edge or between two points would hand the
    meta-learner, which tunes its rule continuously, an easy win over a baseline nobody tuned properly.
    """
    best: dict[str, dict[str, Any]] = {}
    spaces: dict[str, list[dict[str, float]]] = {}
    if "sgd" in methods:
        spaces["sgd"] = [{"lr": float(lr)} for lr in grid["sgd_lr"]]
    if "rms" in methods and dyn.ms is not None:
        spaces["rms"] = [{"lr": float(a), "lamb": float(b), "eps": float(grid["rms_eps"])}
                         for a, b in itertools.product(grid["rms_lr"], grid["rms_lamb"])]
    for method, space in spaces.items():
        trials: list[dict[str, float]] = []

        def loss_of(hp: dict[str, float], method: str = method, trials: list = trials) -> float:
            for t in trials:  # memoized: the pattern search revisits points
                if all(math.isclose(t[k], v, rel_tol=1e-9) for k, v in hp.items()):
                    return t["loss"]
            rule = build_rule(method, hp, dyn)
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


def pattern_search(hp: dict[str, float], loss_of: Callable[[dict[str, float]], float], keys: list[str], step: float,
                   rounds: int, max_moves: int = 4) -> dict[str, float]:
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
