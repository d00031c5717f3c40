"""Turning the composed Hydra config into running objects: the run directory, the DataModule, the Trainer with its
loggers and checkpoint callbacks, and the baselines tuned for this run. Stages and evaluation start here."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from dynlm_pl import artifacts
from dynlm_pl.data import WikiText2DataModule
from dynlm_pl.errors import DynlmError, Stopped, require
from dynlm_pl.files import RunLock, file_sha256
from dynlm_pl.meta.tuning import tune
from dynlm_pl.meta.weights import DynamicWeights
from dynlm_pl.models import Backbone
from dynlm_pl.resolvers import sweep_job
from dynlm_pl.resume import AtomicCheckpointIO, ResumeCheckpoint, stop_message

log = logging.getLogger(__name__)


def _make_dir(d: Path) -> Path:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DynlmError(f"cannot create the run directory {d} ({e.strerror}); "
                         "set paths.root to a writable directory") from None
    require(os.access(d, os.W_OK), f"run directory {d} is not writable; set paths.root to a writable directory")
    return d


def _global_rank() -> int:
    """This process's rank among a job's processes, from the launcher's environment (0 when not distributed):
    torchrun's RANK, SLURM's SLURM_PROCID, Lightning's ddp launcher's NODE_RANK / LOCAL_RANK."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return int(os.environ.get("NODE_RANK", "0") or 0) + int(os.environ.get("LOCAL_RANK", "0") or 0)


def run_lock(cfg: DictConfig, stage: str) -> contextlib.AbstractContextManager:
    """The run directory's lock (`files.RunLock`) for as long as `stage` writes there, held by the job's rank 0
    (the other ranks of a DDP job share its directory by design)."""
    if _global_rank() != 0:
        return contextlib.nullcontext()
    return RunLock(_make_dir(Path(cfg.paths.run_dir)), stage)


def run_dir(cfg: DictConfig) -> Path:
    """The experiment's stable directory (`runs/<name>/`) where stages leave and find artifacts.

    With `from_run` set, that run's lm.ckpt, fisher.pt and tuned.json are linked in first (see `import_artifacts`).
    """
    d = _make_dir(Path(cfg.paths.run_dir))
    if cfg.get("from_run"):
        artifacts.import_artifacts(Path(cfg.paths.root) / str(cfg.from_run), d)
    return d


def fit(trainer: L.Trainer, module: L.LightningModule, dm: L.LightningDataModule, ckpt_path: str | None,
        what: str) -> None:
    """trainer.fit, with a stop by SIGTERM or Ctrl-C (Lightning's own stop at the end of a step, after which
    `ResumeCheckpoint` has written last.ckpt) ending in one line that says how to continue (`Stopped`)."""
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except SIGTERMException:
        last = next((c.path for c in trainer.callbacks if isinstance(c, ResumeCheckpoint)), None)
        raise Stopped(stop_message(what, last)) from None
    if trainer.interrupted:
        raise DynlmError(f"{what} was interrupted; rerun with resume=true to continue from last.ckpt")


def best_model_score(ckpt: Any) -> float | None:
    """A ModelCheckpoint's best score; under ddp_spawn only the path comes back, so read it from the file."""
    if ckpt.best_model_score is not None:
        return float(ckpt.best_model_score)
    if not ckpt.best_model_path:
        return None
    state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
    return next((float(c["best_model_score"]) for c in state.get("callbacks", {}).values()
                 if isinstance(c, dict) and c.get("best_model_score") is not None), None)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, but a DynlmError raised by the target stays a DynlmError.

    Hydra wraps whatever the target raises in a multi-line InstantiationException, which would turn
    e.g. `data.bptt=-3` into a traceback with exit status 1 instead of our one-line error.
    """
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, DynlmError):
            raise e.__cause__ from None
        raise


def make_datamodule(cfg: DictConfig, **overrides: Any) -> WikiText2DataModule:
    return instantiate(cfg.data, **overrides)


_STAGE: list[str] = []  # the stages being run (`stage_scope`), innermost last: what names a W&B run


@contextlib.contextmanager
def stage_scope(name: str) -> Iterator[None]:
    """While stage `name` runs (pipeline.run_stages): its W&B run is named after it (job_type `name`), and finished
    when the stage ends, so each stage of each job is one W&B run (lm's and meta's curves and config never mix)."""
    _STAGE.append(name)
    try:
        yield
    finally:
        _STAGE.pop()
        finish_wandb()


def wandb_run() -> Any:
    """This process's open W&B run (a stage's, under logger=wandb), else None; W&B is not imported for it."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def finish_wandb() -> None:
    """Finish this process's W&B run, if W&B was ever imported and a run is open."""
    if wandb_run() is not None:
        sys.modules["wandb"].finish()


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as {"meta.optim.lr": 0.01, ...}: a W&B run's config (sweep panels read these keys)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk({k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
          for k, v in cfg.items() if k != "hydra"}, "")  # (a composed config may carry Hydra's own node)
    return out


def wandb_settings(cfg: DictConfig, stage: str | None = None) -> dict[str, Any]:
    """wandb.init's arguments for `stage` of this job (the WandbLogger's and evaluate.py's), from logger.wandb:
    project, entity and mode as set; group = logger.wandb.group, else the experiment's name (a sweep's jobs:
    `<name>-sweep-<sweep id>`); job_type = the stage; name = `<logger.wandb.name>-<stage>[-<the job's overrides>]`;
    tags = logger.wandb.tags plus the experiment, stage, gate and data source. The stage: the pipeline's
    (`stage_scope`: meta_noflush for a variant), else `stage` (a stage's `run` called directly)."""
    w = cfg.logger.wandb
    stage = _STAGE[-1] if _STAGE else (stage or str(cfg.get("stage", "run")))
    sweep, job = sweep_job()
    tags = [*(w.get("tags") or []), str(cfg.name), stage, f"gate={cfg.gate.get('param')}",
            f"data={cfg.data.get('source')}"]
    return {"project": w.get("project"), "entity": w.get("entity"), "mode": w.get("mode"),
            "group": w.get("group") or (f"{cfg.name}-sweep-{sweep}" if sweep else str(cfg.name)),
            "job_type": stage, "name": "-".join(p for p in (str(w.get("name") or cfg.name), stage, job) if p),
            "tags": list(dict.fromkeys(str(t) for t in tags))}


def _stage_run(w: dict[str, Any], save_dir: Path) -> Any:
    """The open W&B run if it is this stage's of this job (same name, group, job type, directory): the stage's
    second trainer logs into it. Any other open run (a caller's, an earlier test's) is finished first."""
    run = wandb_run()
    if run is None:
        return None
    same = (run.name, run.group, run.job_type) == (w["name"], w["group"], w["job_type"]) and \
        Path(run.dir).resolve().is_relative_to(save_dir.resolve())
    if not same:
        finish_wandb()
    return run if same else None


def make_loggers(cfg: DictConfig, stage: str | None = None) -> list[Any]:
    """The loggers of `logger=` for the current stage. W&B: one run per stage and job (`wandb_settings`, opened
    here with the whole resolved config, reused by the stage's later trainers: the Fisher stage's two passes)."""
    if not cfg.get("logger"):
        return []
    loggers = []
    for key, c in cfg.logger.items():
        if c is None or "_target_" not in c:
            continue
        if key != "wandb":
            loggers.append(instantiate(c))
            continue
        w = wandb_settings(cfg, stage)
        run = _stage_run(w, Path(str(c.save_dir)))
        logger = instantiate(c, _convert_="all", **w, **({"experiment": run} if run is not None else {}))
        if run is None:
            logger.log_hyperparams(flat_config(cfg))
        loggers.append(logger)
    return loggers


def command_line_trainer(cfg: DictConfig) -> dict[str, Any]:
    """The `trainer.*` keys the user set on the command line (Hydra's task overrides), as composed: they win over a
    stage's trainer settings (`lm.trainer.max_epochs`), which would otherwise hide `trainer.max_epochs=1` silently.
    {} outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    keys = [o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task]
    return {k[len("trainer."):]: OmegaConf.select(cfg, k) for k in keys if k.startswith("trainer.")}


def labelled_bar(labels: dict[str, str]) -> Any:
    """Lightning's own progress bar (Rich when installed, else tqdm) whose loops are named by `labels` ({"test":
    ..., "validation": ...}) instead of "Testing" / "Validation": the Fisher passes run as test loops, the meta
    stage's validation is φ read over the selection slice."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    base = RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar
    names = {f"{loop}_description": property(lambda self, s=label: s) for loop, label in labels.items()}
    return type("LabelledProgressBar", (base,), names)()


def make_trainer(cfg: DictConfig, overrides: DictConfig | dict | None = None, callbacks: list | None = None,
                 stage: str | None = None, bar: dict[str, str] | None = None, **kwargs: Any) -> L.Trainer:
    """cfg.trainer, with a stage's trainer settings (e.g. `lm.trainer`) merged on top, the command line's
    `trainer.*` over those (`command_line_trainer`), and `kwargs` last: what the stage's code needs (the Fisher
    pass's full precision, the meta stage's steps from meta.steps); a command-line key they override gets a note.

    `bar`: names of the progress bar's loops (`labelled_bar`). `ckpt_every_n_steps` in those settings is
    ours, not Lightning's: when present it adds a ResumeCheckpoint
    writing `last.ckpt` after every validation and every that many steps (0: after validations only).
    """
    overrides = dict(overrides or {})
    every = overrides.pop("ckpt_every_n_steps", None)
    user = command_line_trainer(cfg)
    tcfg = OmegaConf.merge(cfg.trainer, overrides, user)
    for k in sorted(set(user) & set(kwargs)):
        if user[k] != kwargs[k]:
            log.warning(f"[{stage or 'trainer'}] trainer.{k}={user[k]!r} does not apply here: this stage sets {k}="
                        f"{kwargs[k]!r} itself (from its own settings, e.g. meta.steps for max_steps)")
    callbacks = list(callbacks or [])
    if bar is not None and tcfg.get("enable_progress_bar", True):
        callbacks.append(labelled_bar(bar))
    if every is not None:
        require(isinstance(every, int) and every >= 0,
                f"ckpt_every_n_steps must be a number of steps (0: after validations only), got {every!r}")
        callbacks.append(ResumeCheckpoint(every))
    return instantiate(tcfg, callbacks=callbacks, logger=make_loggers(cfg, stage) or False,
                       plugins=[AtomicCheckpointIO()], **kwargs)


def model_spec(cfg_model: DictConfig | dict) -> dict[str, Any]:
    """The model group as primitives, `_target_` included (`models.build_model` instantiates it): what the LM
    module's hyperparameters and lm.ckpt store."""
    return OmegaConf.to_container(cfg_model, resolve=True) if isinstance(cfg_model, DictConfig) else dict(cfg_model)


def primitives(node: DictConfig) -> dict[str, Any]:
    """A config group's settings as a plain dict without Hydra keys, as LightningModules take them."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}


def barrier() -> None:
    """Under torchrun / strategy=ddp every rank runs every stage and only rank 0 writes its artifacts:
    the others wait here before the next stage reads them (lm.ckpt, fisher.pt)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def tuned_baselines(cfg: DictConfig, out: Path, lm: Backbone, valid: torch.Tensor | None, dyn: DynamicWeights,
                    lm_sha: str, methods: list[str]) -> dict[str, dict[str, Any]]:
    """tuned.json for this LM, segment and grid if it exists, else tune now (eval.tune on the selection slice, the
    first eval.tune.tokens of the validation split) and store it. Shared by the meta stage (φ starts at the better
    tuned rule) and evaluate.py (the baselines' rows)."""
    t = cfg.eval.tune
    max_drift = cfg.eval.get("max_drift")
    fisher = out / "fisher.pt"  # Krause's RMS statistics: the rms rule's coordinates depend on them
    grid = {k: v for k, v in OmegaConf.to_container(t, resolve=True).items() if k != "workers"}  # not a result
    key = {"lm_sha256": lm_sha, "fisher_sha256": file_sha256(fisher) if fisher.is_file() else None,
           "segment": int(cfg.eval.segment), "tokens": int(t.tokens), "grid": grid,
           "max_drift": max_drift, "dynamic": OmegaConf.to_container(cfg.meta.dynamic, resolve=True)}
    path = out / "tuned.json"
    best = artifacts.load_tuned(path, key)
    missing = [m for m in methods if m not in best]
    if not missing:
        log.info(f"[tune] reusing tuned {', '.join(methods)} from {path}")
        return {m: best[m] for m in methods}
    require(valid is not None, f"tuning {', '.join(missing)} needs the LM's validation split, and {path} holds no "
            "tuning of them for this LM, segment and grid: run python evaluate.py on the corpus the LM was trained "
            "on first (it keeps tuned.json), or evaluate the text file with eval.methods=[static,meta]")
    t0 = time.time()

    def keep(method: str, result: dict[str, Any]) -> None:  # each method as it finishes: a kill loses one at most
        best[method] = result
        artifacts.save_tuned(path, key, best)

    best.update(tune(lm, valid[: int(t.tokens)], dyn, int(cfg.eval.segment), t, missing, max_drift, known=dict(best),
                     on_done=keep))
    artifacts.save_tuned(path, key, best)
    log.info(f"[tune] {', '.join(missing)} tuned in {time.time() - t0:.0f}s")
    return {m: best[m] for m in methods if m in best}
