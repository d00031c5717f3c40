"""What `resume=true` needs: a `last.ckpt` kept current (and written when SIGTERM or Ctrl-C stops a run), the RNG
state a resumed run continues from, and a readable checkpoint (refused in one line otherwise)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dynlm_pl.errors import DynlmError
from dynlm_pl.files import atomic_write

log = logging.getLogger(__name__)


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
        self._held_stop = False  # a SIGTERM deferred past a validation (see on_train_batch_end)
        self.stopped = False  # last.ckpt was written for a stop by SIGTERM / Ctrl-C
        self._sigint: Any = None

    @property
    def state_key(self) -> str:
        return "ResumeCheckpoint"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run does not rewrite the checkpoint it started from
        if self.path is None and isinstance(trainer.checkpoint_callback, ModelCheckpoint):
            cb = trainer.checkpoint_callback
            self.path = Path(cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST))
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C stops like SIGTERM (Lightning's own stop at the end of the current step), not mid-step as a
            # KeyboardInterrupt would; a second Ctrl-C interrupts at once (last.ckpt stays the previous one, whole).
            self._sigint = signal.signal(signal.SIGINT, _sigint_to_sigterm)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None

    def _safe_point(self, trainer: L.Trainer) -> bool:
        """Whether a checkpoint written now resumes exactly: not right before a validation, nor at the end of an
        epoch (a run restarted there skips that validation / the epoch-start hooks)."""
        loop = trainer.fit_loop.epoch_loop
        # Lightning decides after this hook whether a validation follows; its own test (private, hence the
        # fallback: then only validations write the file) tells it here.
        val_follows = getattr(loop, "_should_check_val_fx", None)
        return not (val_follows is None or loop.batch_progress.is_last_batch
                    or val_follows(trainer.fit_loop._data_fetcher))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.received_sigterm:  # Lightning raises SIGTERMException right after this hook
            if self._safe_point(trainer):
                self._write(trainer)
                self.stopped = True
            else:  # hold the stop until the validation (or the next epoch's first step) is done: see below
                trainer._signal_connector.received_sigterm = False
                self._held_stop = True
            return
        step = trainer.global_step
        if self.every <= 0 or step == self._last_step or step % self.every:
            return
        if self._safe_point(trainer):
            self._write(trainer)  # else on_validation_end (or the next due step) writes it

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":  # not trainer.validate()
            self._write(trainer)
            if self._held_stop:  # last.ckpt is now the state after the validation: stop here
                self._rearm(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._held_stop:  # the epoch ended without a validation: stop after this epoch's first step
            self._rearm(trainer)

    def _rearm(self, trainer: L.Trainer) -> None:
        self._held_stop = False
        self.stopped = True
        trainer._signal_connector.received_sigterm = True

    def _write(self, trainer: L.Trainer) -> None:
        """Every rank takes part in the save (a collective under DDP); rank 0 writes it, atomically
        (`AtomicCheckpointIO`, which make_trainer installs)."""
        if self.path is None:
            return
        self._last_step = trainer.global_step
        trainer.save_checkpoint(self.path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomically: every checkpoint it saves (best, last) goes to a temporary file
    renamed over the old one, so a full disk or a kill mid-save leaves the previous checkpoint whole; a full disk is
    a one-line error (`files.atomic_write`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp,
                                                                                      storage_options))


def _sigint_to_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log.warning("\n[dynlm] Ctrl-C: stopping after the current step (press it again to interrupt at once)")
    os.kill(os.getpid(), signal.SIGTERM)


def stop_message(what: str, resume: Path | None) -> str:
    """The one line a run stopped by a signal ends with: where its state is and how to continue."""
    return (f"{what} stopped by a signal after writing {resume}; rerun the same command with resume=true to "
            "continue where it stopped")


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
