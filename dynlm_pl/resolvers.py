"""OmegaConf resolvers the configs use; registered on `import dynlm_pl`, before Hydra composes anything."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf


def sweep_subdir() -> str:
    """`/<override_dirname>` inside a Hydra multirun job, '' otherwise (single runs, compose in tests).

    `paths.run_dir` ends with it, so each job of `python train.py -m ... unroll=10,20` gets its own run
    directory (runs/<name>/unroll=10/, ...) instead of all jobs overwriting runs/<name>/, while a single
    run keeps runs/<name>/ whatever it overrides (stage=lm then stage=meta unroll=40 must share it).
    Keys that do not change what a job computes are left out of the name (hydra.job.config in config.yaml).
    """
    if not HydraConfig.initialized():
        return ""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return ""
    sub = hc.job.override_dirname
    return f"/{sub}" if sub else ""


def sweep_job() -> tuple[str, str]:
    """(the sweep's id, this job's override_dirname) inside a Hydra multirun job, ('', '') otherwise: what names
    and groups its W&B runs (runtime.wandb_settings). The id is the sweep directory's name (its start time)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return "", ""
    hc = HydraConfig.get()
    return str(hc.sweep.dir).rstrip("/").rsplit("/", 1)[-1], hc.job.override_dirname


def register() -> None:
    if not OmegaConf.has_resolver("dynlm.sweep_subdir"):
        OmegaConf.register_new_resolver("dynlm.sweep_subdir", sweep_subdir)
