"""What `resume=true` needs: a `last.ckpt` kept current, the RNG state a resumed run continues from, and a
readable checkpoint (refused in one line otherwise)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from dynlm_pl.errors import DynlmError


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
        """Every rank takes part in the save and rank 0 alone writes and renames, so this cannot use
        `files.atomic_write` (which each caller renames itself)."""
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
