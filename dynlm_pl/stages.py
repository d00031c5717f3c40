"""Running stages by name, each timed: `stage=all` is lm -> fisher -> meta -> evaluate."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from dynlm_pl.errors import DynlmError, require

# Each stage module exposes `run(cfg) -> dict` (imported lazily: a stage's deps load only when it runs).
STAGES = {
    "lm": "dynlm_pl.systems.lm",
    "fisher": "dynlm_pl.systems.fisher",
    "meta": "dynlm_pl.systems.meta",
    "evaluate": "dynlm_pl.evaluation",
}
PIPELINE = ["lm", "fisher", "meta", "evaluate"]


def stage_fn(name: str) -> Callable[[DictConfig], dict[str, Any]]:
    require(name in STAGES, f"unknown stage {name!r}; use one of {', '.join(STAGES)} or all")
    return importlib.import_module(STAGES[name]).run


def run_stages(cfg: DictConfig) -> dict[str, Any]:
    names = PIPELINE if cfg.stage == "all" else [cfg.stage]
    for n in names:
        stage_fn(n)  # fail on a bad name before any work is done
    results, times = {}, {}
    for n in names:
        t0 = time.time()
        results[n] = stage_fn(n)(cfg)
        times[n] = time.time() - t0
        print(f"[{n}] stage done in {times[n]:.1f}s", flush=True)
    if len(names) > 1:
        print("stage times: " + ", ".join(f"{n} {t:.1f}s" for n, t in times.items()), flush=True)
    return results


def main_guard(fn: Callable[[], Any]) -> Any:
    """Turn a DynlmError into one line on stderr and exit status 2."""
    try:
        return fn()
    except DynlmError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
