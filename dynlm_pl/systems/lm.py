"""LM pretraining (θ*, the long-term memory's mean) as a LightningModule."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from torch.optim.swa_utils import AveragedModel
from torchmetrics import MeanMetric

from dynlm_pl.errors import require
from dynlm_pl.models import Backbone, build_model, lm_loss
from dynlm_pl.resume import get_rng_state, set_rng_state

log = logging.getLogger(__name__)


class LMPretrainModule(L.LightningModule):
    """Token-weighted cross-entropy plus AR/TAR, truncated BPTT with a carried hidden state.

    Optimizers: `sgd` with AWD-LSTM's non-monotone trigger (NT-ASGD: after `nonmono` validations
    without a new best, keep plain SGD steps but start averaging the iterates, which is what ASGD with
    t0=0, lambd=0 does; validation and the exported model use the average), or `adam`. The learning
    rate is scaled by window length / bptt so randomized short windows do not take full-size steps.

    `model`: the backbone's spec, a `conf/model/*.yaml` group as a dict (`_target_` and its settings).
    """

    def __init__(self, vocab_size: int, model: dict[str, Any], optimizer: str = "sgd", lr: float = 30.0,
                 weight_decay: float = 1.2e-6, clip: float = 0.25, alpha: float = 2.0, beta: float = 1.0,
                 bptt: int = 70, nonmono: int = 5, asgd: bool = True, data_source: str = "",
                 vocab_hash: str = "") -> None:
        super().__init__()
        require(optimizer in ("sgd", "adam"), f"lm.optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = build_model(model, vocab_size)
        # The iterate average of NT-ASGD; `n_averaged == 0` means averaging has not started.
        self.swa = AveragedModel(self.model)
        self.swa.requires_grad_(False)
        self.val_history: list[float] = []
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self._hidden: dict[str, Any | None] = {"train": None, "val": None, "test": None}
        # Resume state: windows trained on in this epoch, and the RNG state (dropout masks) to continue from.
        self._epoch_batches = 0
        self._pending: dict[str, Any] | None = None  # RNG state from on_load_checkpoint, applied at the next step
        # Training tokens read so far, over all ranks: the pretraining budget a result is quoted with (lm.ckpt).
        self.tokens_seen = 0

    # -- the model other stages use ------------------------------------------------------------------
    @property
    def averaging(self) -> bool:
        return bool(self.swa.n_averaged.item() > 0)

    def eval_model(self) -> Backbone:
        """θ*: the averaged iterate once NT-ASGD has triggered, else the current weights."""
        return self.swa.module if self.averaging else self.model

    # -- training --------------------------------------------------------------------------------------
    def _carry(self, key: str, x: Tensor, net: Backbone) -> Any:
        h = self._hidden[key]
        if h is None or h[0][0].size(0) != x.size(0):
            h = net.init_hidden(x.size(0))
        return h

    def on_train_epoch_start(self) -> None:
        self._hidden["train"] = None
        self._epoch_batches = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # [B, T]
        if self._pending is not None:  # first step after a resume: the dropout masks the killed run drew next
            set_rng_state(self._pending["rng"])
            self._pending = None
            h = self._hidden["train"]  # restored on the CPU (or reset by on_train_epoch_start in a new epoch)
            self._hidden["train"] = None if h is None else [(a.to(x.device), b.to(x.device)) for a, b in h]
        out = self.model(x, self._carry("train", x, self.model))
        self._hidden["train"] = self.model.detach_state(out.hidden)
        ce = lm_loss(out.logits, y)
        hp = self.hparams
        # AR on the dropped output of the last layer; TAR on its raw output (differences along time).
        loss = ce + hp.alpha * out.output.pow(2).mean() \
            + hp.beta * (out.raw_output[:, 1:] - out.raw_output[:, :-1]).pow(2).mean()
        opt = self.optimizers()
        for g in opt.param_groups:
            g["lr"] = hp.lr * x.size(1) / hp.bptt
        opt.zero_grad()
        self.manual_backward(loss)
        if hp.clip:
            self.clip_gradients(opt, gradient_clip_val=hp.clip, gradient_clip_algorithm="norm")
        opt.step()
        if self.averaging:
            self.swa.update_parameters(self.model)
        self.train_loss.update(ce.detach(), weight=y.numel())
        self.log("train/loss", ce.detach(), prog_bar=True)
        self._epoch_batches += 1
        self.tokens_seen += y.numel() * self.trainer.world_size
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        self.log("train/ppl", torch.exp(self.train_loss.compute()))
        self.train_loss.reset()

    # -- evaluation (hidden state carried across windows, separate per split) ----------------------
    def _eval_step(self, key: str, metric: MeanMetric, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        net = self.eval_model()
        out = net(x, self._carry(key, x, net))
        self._hidden[key] = net.detach_state(out.hidden)
        metric.update(lm_loss(out.logits, y), weight=y.numel())

    def on_validation_epoch_start(self) -> None:
        self._hidden["val"] = None

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step("val", self.val_loss, batch)

    def _log_epoch(self, key: str, metric: MeanMetric, prog_bar: bool = False) -> Tensor:
        """The epoch's token-weighted mean loss of split `key`, logged with its perplexity, and the metric reset."""
        loss = metric.compute()
        metric.reset()
        self.log_dict({f"{key}/loss": loss, f"{key}/ppl": torch.exp(loss)}, prog_bar=prog_bar)
        return loss

    def on_validation_epoch_end(self) -> None:
        loss = self._log_epoch("val", self.val_loss, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        hp = self.hparams
        # NT-ASGD: no new best among the last `nonmono` validations -> start averaging.
        if (hp.optimizer == "sgd" and hp.asgd and not self.averaging and len(self.val_history) > hp.nonmono
                and loss.item() > min(self.val_history[: -hp.nonmono])):
            self.swa.update_parameters(self.model)
            rank_zero_only(log.info)(f"[lm] NT-ASGD: validation stalled for {hp.nonmono} checks, averaging iterates "
                                     "from now on")
        self.val_history.append(loss.item())

    def on_test_epoch_start(self) -> None:
        self._hidden["test"] = None

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step("test", self.test_loss, batch)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_loss)

    # -- optimizer and checkpoint state ---------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_history"] = list(self.val_history)
        checkpoint["tokens_seen"] = self.tokens_seen
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None:  # the vocabulary travels with the weights: evaluate.py reads any text with it
            checkpoint["vocab"] = dm.load().vocab
        # What resume=true needs beyond weights, optimizer and loop counters (which Lightning saves) to continue
        # exactly as an uninterrupted run: the position in the epoch, the carried hidden state, the RNG state
        # and the running training loss.
        checkpoint["resume_state"] = {
            "epoch_batches": self._epoch_batches, "hidden": self._hidden["train"], "rng": get_rng_state(),
            "train_loss": {k: v.detach().clone() for k, v in self.train_loss.metric_state.items()},
            "world_size": self.trainer.world_size if self._trainer is not None else 1}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_history = list(checkpoint.get("val_history", []))
        self.vocab: list[str] | None = checkpoint.get("vocab")
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        if self._trainer is None:  # load_from_checkpoint (load_lm): weights only
            return
        # resume=true: refuse a checkpoint made for other data or another model before its tensors are loaded
        # (a shape mismatch would be a traceback; the same shapes over another vocabulary would go unnoticed).
        old = checkpoint.get("hyper_parameters", {})
        names = {"vocab_hash": "vocabulary (data)", "model": "model", "optimizer": "lm.optim.optimizer"}
        diff = [v for k, v in names.items() if old.get(k) != self.hparams.get(k)]
        require(not diff, f"cannot resume: checkpoints/last.ckpt was trained with different {', '.join(diff)}; "
                "use the settings it was made with, or rerun without resume=true to start over")
        st = checkpoint.get("resume_state")
        if not st:  # a checkpoint without resume state: Lightning restarts the epoch's stream
            return
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "skip_train_batches"):
            dm.skip_train_batches = int(st["epoch_batches"])
        self._epoch_batches = int(st["epoch_batches"])
        for k, v in st["train_loss"].items():
            setattr(self.train_loss, k, v.to(self.device))
        self.train_loss._update_count = max(self.train_loss._update_count, int(st["epoch_batches"]))
        # Any state and RNG are per process: under DDP rank 0's would be wrong for the other ranks' streams.
        if st.get("world_size", 1) == 1 and self.trainer.world_size == 1:
            # Set now, not at the next step: if the checkpoint ended an epoch, on_train_epoch_start resets it.
            self._hidden["train"] = st["hidden"]
            self._pending = {"rng": st["rng"]}
