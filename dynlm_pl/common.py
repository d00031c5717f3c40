"""What every stage shares: the run directory, atomic artifacts, hashes, and building objects from cfg."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from dynlm_pl.data import WikiText2DataModule
from dynlm_pl.errors import DynlmError, require


def run_dir(cfg: DictConfig) -> Path:
    """The experiment's stable directory (`runs/<name>/`) where stages leave and find artifacts."""
    d = Path(cfg.paths.run_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DynlmError(f"cannot create the run directory {d} ({e.strerror}); "
                         "set paths.root to a writable directory") from None
    require(os.access(d, os.W_OK), f"run directory {d} is not writable; set paths.root to a writable directory")
    return d


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


def make_trainer(cfg: DictConfig, overrides: DictConfig | dict | None = None, callbacks: list | None = None,
                 **kwargs: Any) -> L.Trainer:
    """cfg.trainer, with a stage's own trainer settings (e.g. `lm.trainer`) merged on top."""
    tcfg = OmegaConf.merge(cfg.trainer, overrides or {})
    return instantiate(tcfg, callbacks=callbacks or [], logger=make_loggers(cfg) or False, **kwargs)


def model_kwargs(cfg_model: DictConfig | dict) -> dict[str, Any]:
    """The model group's settings as primitives (no Hydra keys), as LightningModules take them."""
    d = OmegaConf.to_container(cfg_model, resolve=True) if isinstance(cfg_model, DictConfig) else dict(cfg_model)
    return {k: v for k, v in d.items() if not k.startswith("_")}
