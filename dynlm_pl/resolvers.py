"""OmegaConf resolvers the configs use; registered on `import dynlm_pl`, before Hydra composes anything."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf


def job_dirname(overrides: Iterable[str], exclude: Sequence[str] = ()) -> str:
    """A sweep job's directory name from its overrides: `key-value` items, sorted, joined by `_`; brackets, quotes
    and spaces dropped, a list's commas (and any `/`) become `-`. ["unroll=10", "gate.hidden=[8,8]"] ->
    `gate.hidden-8-8_unroll-10`. Why not Hydra's override_dirname (`gate.hidden=[8,8],unroll=10`): its `=` and
    commas cannot appear unquoted in a Hydra override, so `name=smoke/<job>` (how a user addresses one job) would
    need nested quoting, and brackets are shell glob characters."""
    items = []
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in exclude:
            continue
        value = re.sub(r"[\[\]{}()'\" ]", "", value)
        items.append(f"{key}-{re.sub(r'[,/:]', '-', value)}")
    return "_".join(sorted(items))


def _job() -> str:
    """This multirun job's directory name (`job_dirname` of its overrides, less config.yaml's excluded keys)."""
    hc = HydraConfig.get()
    return job_dirname(hc.overrides.task, list(hc.job.config.override_dirname.exclude_keys))


def sweep_subdir() -> str:
    """`/<job_dirname>` inside a Hydra multirun job, '' otherwise (single runs, compose in tests).

    `paths.run_dir` ends with it, so each job of `python train.py -m ... unroll=10,20` gets its own run
    directory (runs/<name>/unroll-10/, ...) instead of all jobs overwriting runs/<name>/, while a single
    run keeps runs/<name>/ whatever it overrides (stage=lm then stage=meta unroll=40 must share it).
    Keys that do not change what a job computes are left out of the name (hydra.job.config in config.yaml).
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    sub = _job()
    return f"/{sub}" if sub else ""


def sweep_job() -> tuple[str, str]:
    """(the sweep's id, this job's `job_dirname`) inside a Hydra multirun job, ('', '') otherwise: what names
    and groups its W&B runs (runtime.wandb_settings). The id is the sweep directory's name (its start time)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return "", ""
    hc = HydraConfig.get()
    return str(hc.sweep.dir).rstrip("/").rsplit("/", 1)[-1], _job()


def register() -> None:
    if not OmegaConf.has_resolver("dynlm.sweep_subdir"):
        OmegaConf.register_new_resolver("dynlm.sweep_subdir", sweep_subdir)
