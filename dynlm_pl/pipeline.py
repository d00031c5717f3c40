"""Running stages by name, each timed: `stage=all` runs the stages listed in `pipeline` (lm -> fisher -> meta ->
evaluate by default; `meta_noflush` is the meta stage with gate.flush=false, the two-level ablation)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dynlm_pl import evaluation
from dynlm_pl.config import check_config
from dynlm_pl.errors import require
from dynlm_pl.runtime import barrier, run_lock, stage_scope
from dynlm_pl.stages import fisher, lm, meta

log = logging.getLogger(__name__)

Stage = Callable[[DictConfig], dict[str, Any]]
STAGES: dict[str, Stage] = {"lm": lm.run, "fisher": fisher.run, "meta": meta.run, "evaluate": evaluation.run}
PIPELINE = ["lm", "fisher", "meta", "evaluate"]  # `pipeline` when a config has none
VARIANTS = {"meta_noflush": ("meta", {"gate.flush": False})}  # a stage run with these settings changed


def stage_fn(name: str) -> Stage:
    base = VARIANTS.get(name, (name, {}))[0]
    require(base in STAGES, f"unknown stage {name!r}; use one of {', '.join([*STAGES, *VARIANTS])} or all")
    return STAGES[base]


def stage_config(cfg: DictConfig, name: str) -> DictConfig:
    """cfg for one stage: a variant's settings applied to a copy."""
    if name not in VARIANTS:
        return cfg
    c = cfg.copy()
    for key, value in VARIANTS[name][1].items():
        OmegaConf.update(c, key, value, merge=False)
    return c


def objective(results: dict[str, Any]) -> float | None:
    """What a Hydra sweeper (Optuna, Ax, Nevergrad) minimises: the last stage's perplexity on held-out validation
    text (`val_ppl`: lm's validation split, meta's selection slice), never a test figure; None when no stage ran
    one (evaluate alone)."""
    vals = [r["val_ppl"] for r in results.values() if isinstance(r, dict) and "val_ppl" in r]
    return float(vals[-1]) if vals else None


def run_stages(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg)
    if os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0") and not cfg.get("resume"):
        # A SLURM job requeued after preemption or its time limit (hydra/launcher=slurm, max_num_timeout) reruns
        # the same command: it continues from last.ckpt instead of starting over.
        log.info(f"[dynlm] SLURM requeued this job ({os.environ['SLURM_RESTART_COUNT']} times): resume=true")
        OmegaConf.update(cfg, "resume", True, force_add=True)
    names = list(cfg.get("pipeline") or PIPELINE) if cfg.stage == "all" else [cfg.stage]
    for n in names:
        stage_fn(n)  # fail on a bad name before any work is done
    results, times = {}, {}
    with run_lock(cfg, "+".join(names)):  # one writer per run directory
        for n in names:
            t0 = time.time()
            with stage_scope(n):  # one W&B run per stage, finished before the next starts
                results[n] = stage_fn(n)(stage_config(cfg, n))
            barrier()
            times[n] = time.time() - t0
            log.info(f"[{n}] stage done in {times[n]:.1f}s")
    if len(names) > 1:
        log.info("stage times: " + ", ".join(f"{n} {t:.1f}s" for n, t in times.items()))
    return results
