"""Running stages by name, each timed: `stage=all` runs the stages listed in `pipeline` (lm -> fisher -> meta ->
evaluate by default; `meta_noflush` is the meta stage with gate.flush=false, the two-level ablation)."""

from __future__ import annotations

import errno
import importlib
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dynlm_pl.errors import DynlmError, require

# Each stage module exposes `run(cfg) -> dict` (imported lazily: a stage's deps load only when it runs).
STAGES = {
    "lm": "dynlm_pl.systems.lm",
    "fisher": "dynlm_pl.systems.fisher",
    "meta": "dynlm_pl.systems.meta",
    "evaluate": "dynlm_pl.evaluation",
}
PIPELINE = ["lm", "fisher", "meta", "evaluate"]  # `pipeline` when a config has none
VARIANTS = {"meta_noflush": ("meta", {"gate.flush": False})}  # a stage run with these settings changed
# Settings that must be positive integers, checked before any stage runs: `stage=all unroll=0` should fail in a
# second, not after pretraining and the Fisher pass.
POSITIVE_INTS = ("unroll", "meta.segment", "meta.streams", "meta.steps", "meta.val_every", "eval.segment",
                 "eval.streams", "data.bptt", "data.batch_size", "data.eval_batch_size", "data.test_batch_size")
# Checkpoint intervals: 0 or more steps.
NON_NEGATIVE_INTS = ("lm.trainer.ckpt_every_n_steps", "meta.trainer.ckpt_every_n_steps")


def check_config(cfg: DictConfig) -> DictConfig:
    """Refuse zero, negative or non-integer sizes with one line naming the key; returns cfg."""
    for keys, low, what in ((POSITIVE_INTS, 1, "a positive integer"), (NON_NEGATIVE_INTS, 0, "an integer >= 0")):
        for key in keys:
            v = OmegaConf.select(cfg, key, default=None)
            if v is None and low == 0:
                continue  # optional
            require(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"{key} must be {what}, got {v!r}")
    v = OmegaConf.select(cfg, "meta.checkpoint_group", default=0)
    require(v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
            f"meta.checkpoint_group must be auto or an integer >= 0, got {v!r}")
    v = OmegaConf.select(cfg, "eval.max_drift", default=None)
    require(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
            f"eval.max_drift must be a positive number or null (no bound), got {v!r}")
    return cfg


def stage_fn(name: str) -> Callable[[DictConfig], dict[str, Any]]:
    base = VARIANTS.get(name, (name, {}))[0]
    require(base in STAGES, f"unknown stage {name!r}; use one of {', '.join([*STAGES, *VARIANTS])} or all")
    return importlib.import_module(STAGES[base]).run


def stage_config(cfg: DictConfig, name: str) -> DictConfig:
    """cfg for one stage: a variant's settings applied to a copy."""
    if name not in VARIANTS:
        return cfg
    c = cfg.copy()
    for key, value in VARIANTS[name][1].items():
        OmegaConf.update(c, key, value, merge=False)
    return c


def run_stages(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg)
    names = list(cfg.get("pipeline") or PIPELINE) if cfg.stage == "all" else [cfg.stage]
    for n in names:
        stage_fn(n)  # fail on a bad name before any work is done
    results, times = {}, {}
    for n in names:
        t0 = time.time()
        results[n] = stage_fn(n)(stage_config(cfg, n))
        _barrier()
        times[n] = time.time() - t0
        print(f"[{n}] stage done in {times[n]:.1f}s", flush=True)
    if len(names) > 1:
        print("stage times: " + ", ".join(f"{n} {t:.1f}s" for n, t in times.items()), flush=True)
    return results


def _barrier() -> None:
    """Under torchrun / strategy=ddp every rank runs every stage and only rank 0 writes its artifacts:
    the others wait here before the next stage reads them (lm.ckpt, fisher.pt)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main_guard(fn: Callable[[], Any]) -> Any:
    """Turn a DynlmError into one line on stderr and exit status 2 (and tune the allocator: `keep_freed_memory`)."""
    from dynlm_pl.common import keep_freed_memory  # torch, lightning: not for `cli`'s fast error paths

    keep_freed_memory()
    try:
        return fn()
    except DynlmError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# Errors a user makes on the command line or with the file system, which Hydra itself reports over several lines
# (exit status 1) before or around our code: shortened to one line, exit status 2, like DynlmError.
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC, errno.EDQUOT}


def _one_line(e: BaseException) -> str:
    """Hydra's multi-line message as one line: options listed on tab-indented lines become a comma list."""
    text = str(e).split("Config search path:")[0]
    text = re.sub(r":\s*\n\t", ": ", text)
    text = re.sub(r"\n\t", ", ", text)
    parts = [t.strip() for t in text.splitlines() if t.strip()]
    line = "".join(t + ("" if i == len(parts) - 1 else " " if t[-1] in ".:;," else "; ") for i, t in enumerate(parts))
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        line += f" ({str(cause).strip().splitlines()[0]})"
    return line


def cli(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` entry point so that every error the user can fix is one line on stderr, exit 2.

    HYDRA_FULL_ERROR=1 makes Hydra raise what it would otherwise print as a multi-line report with exit status 1
    (an unknown key or option, an unparsable override, an output directory it cannot create); those are
    shortened here. Any other exception is a bug and keeps its full traceback.
    """
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as e:
        print(f"error: bad command line: {_one_line(e)}; see `python {os.path.basename(sys.argv[0])} --help`",
              file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            raise
        print(f"error: cannot write {e.filename}: {e.strerror}; set paths.root to a writable directory "
              "with free space", file=sys.stderr, flush=True)
        sys.exit(2)
