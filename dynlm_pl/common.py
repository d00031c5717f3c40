"""What every stage shares: the run directory, atomic artifacts, hashes, and building objects from cfg."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from dynlm_pl.data import WikiText2DataModule
from dynlm_pl.errors import DynlmError, require


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS (Linux; a no-op elsewhere).

    Why: glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on
    free, so each parameter-sized temporary of model=small (θ is 43.6 MB: the flat gradient's cat, θ − θ_0, the
    dense embedding gradient) page-faults all its pages in again, every segment (bench/results/
    bench_eval_profile.md; `DYNLM_MALLOC_KEEP=0` for glibc's default). The cost: RSS stays at its peak once
    reached. Called by train.py and evaluate.py (`main_guard`) and the benches; returns whether set.
    """
    if os.environ.get("DYNLM_MALLOC_KEEP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        # no mmap'd chunks (all from the heap), and never trim the heap's top back to the OS
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


# What `from_run=<other run>` brings into this run's directory: the pretrained LM and its Fisher pass.
FROM_RUN_ARTIFACTS = ("lm.ckpt", "fisher.pt")


def run_dir(cfg: DictConfig) -> Path:
    """The experiment's stable directory (`runs/<name>/`) where stages leave and find artifacts.

    With `from_run` set, that run's lm.ckpt and fisher.pt are linked in first (see `import_artifacts`).
    """
    d = Path(cfg.paths.run_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DynlmError(f"cannot create the run directory {d} ({e.strerror}); "
                         "set paths.root to a writable directory") from None
    require(os.access(d, os.W_OK), f"run directory {d} is not writable; set paths.root to a writable directory")
    if cfg.get("from_run"):
        import_artifacts(Path(cfg.paths.root) / str(cfg.from_run), d)
    return d


def import_artifacts(src: Path, dst: Path, names: tuple[str, ...] = FROM_RUN_ARTIFACTS) -> None:
    """Hard-link (else copy) `names` from run directory `src` into `dst`, replacing what `dst` had.

    So each job of a sweep (`-m stage=meta from_run=smoke unroll=10,20`) is a complete run directory that
    the next stages (evaluate) read as usual, and a job never writes into the run it started from.
    A link keeps the file as it was even if `src` is retrained later (stages replace files, never
    rewrite them), so a job's provenance hashes stay true. Safe when every DDP rank does it at once.
    """
    require(src.is_dir() and (src / names[0]).is_file(),
            f"from_run: no {names[0]} in {src}; run `python train.py stage=lm` there first (from_run names a "
            "run under paths.root, or a path)")
    for name in names:
        s, t = src / name, dst / name
        if not s.is_file() or (t.exists() and os.path.samefile(s, t)):
            continue
        tmp = _tmp_beside(t)
        tmp.unlink()
        try:
            os.link(s, tmp)
        except OSError:  # another file system, or links not allowed: a copy
            shutil.copyfile(s, tmp)
        try:
            os.replace(tmp, t)
        finally:
            tmp.unlink(missing_ok=True)


def best_model_score(ckpt: Any) -> float | None:
    """A ModelCheckpoint's best score; under ddp_spawn only the path comes back, so read it from the file."""
    if ckpt.best_model_score is not None:
        return float(ckpt.best_model_score)
    if not ckpt.best_model_path:
        return None
    state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
    return next((float(c["best_model_score"]) for c in state.get("callbacks", {}).values()
                 if isinstance(c, dict) and c.get("best_model_score") is not None), None)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy then rename: readers see the old file or the whole new one, never half of it."""
    dst = Path(dst)
    tmp = _tmp_beside(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, dst: str | Path) -> None:
    dst = Path(dst)
    tmp = _tmp_beside(dst)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(dst: str | Path, text: str) -> None:
    dst = Path(dst)
    tmp = _tmp_beside(dst)
    try:
        tmp.write_text(text)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


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


def make_loggers(cfg: DictConfig) -> list[Any]:
    if not cfg.get("logger"):
        return []
    return [instantiate(c) for c in cfg.logger.values() if c is not None and "_target_" in c]


class ResumeCheckpoint(Checkpoint):
    """Keep `last.ckpt` (beside the run's ModelCheckpoint) current, so resume=true continues where a run stopped.

    Lightning's ModelCheckpoint rewrites `last.ckpt` only when the monitored metric improves, so a killed run
    could fall back to its last improvement, hours earlier. This writes it after every validation and every
    `every` optimizer steps (0: after validations only), but never right before a validation or at the end of an
    epoch: Lightning restarting from such a point skips that validation or the epoch-start hooks, and the resumed
    run would no longer match an uninterrupted one. A `Checkpoint`, so Lightning runs it after ModelCheckpoint
    (whose updated best score the file must hold). Written to a temporary file and renamed: a kill during the
    save leaves the previous `last.ckpt` whole.
    """

    def __init__(self, every: int = 0, path: str | Path | None = None) -> None:
        self.every, self.path = int(every), Path(path) if path else None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return "ResumeCheckpoint"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run does not rewrite the checkpoint it started from
        if self.path is None and isinstance(trainer.checkpoint_callback, ModelCheckpoint):
            cb = trainer.checkpoint_callback
            self.path = Path(cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every <= 0 or step == self._last_step or step % self.every:
            return
        loop = trainer.fit_loop.epoch_loop
        # Lightning decides after this hook whether a validation follows; its own test (private, hence the
        # fallback: then only validations write the file) tells it here.
        val_follows = getattr(loop, "_should_check_val_fx", None)
        if val_follows is None or loop.batch_progress.is_last_batch or val_follows(trainer.fit_loop._data_fetcher):
            return  # on_validation_end (or the next due step) writes it instead
        self._write(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":  # not trainer.validate()
            self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        if self.path is None:
            return
        self._last_step = trainer.global_step
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)


def get_rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA) generator states: a resumed run draws the dropout masks the killed one would have."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def check_resumable(path: str | Path) -> None:
    """A one-line error for a `last.ckpt` that cannot be read, instead of Lightning's traceback mid-restore."""
    try:
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise DynlmError(f"cannot resume: {path} cannot be read ({type(e).__name__}); delete it to start over, "
                         "or rerun without resume=true") from None


def make_trainer(cfg: DictConfig, overrides: DictConfig | dict | None = None, callbacks: list | None = None,
                 **kwargs: Any) -> L.Trainer:
    """cfg.trainer, with a stage's own trainer settings (e.g. `lm.trainer`) merged on top.

    `ckpt_every_n_steps` in those settings is ours, not Lightning's: when present it adds a ResumeCheckpoint
    writing `last.ckpt` after every validation and every that many steps (0: after validations only).
    """
    overrides = dict(overrides or {})
    every = overrides.pop("ckpt_every_n_steps", None)
    tcfg = OmegaConf.merge(cfg.trainer, overrides)
    callbacks = list(callbacks or [])
    if every is not None:
        require(isinstance(every, int) and every >= 0,
                f"ckpt_every_n_steps must be a number of steps (0: after validations only), got {every!r}")
        callbacks.append(ResumeCheckpoint(every))
    return instantiate(tcfg, callbacks=callbacks, logger=make_loggers(cfg) or False, **kwargs)


def model_kwargs(cfg_model: DictConfig | dict) -> dict[str, Any]:
    """The model group's settings as primitives (no Hydra keys), as LightningModules take them."""
    d = OmegaConf.to_container(cfg_model, resolve=True) if isinstance(cfg_model, DictConfig) else dict(cfg_model)
    return {k: v for k, v in d.items() if not k.startswith("_")}
