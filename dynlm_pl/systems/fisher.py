"""The Fisher pass as a LightningModule: one estimator of `dynlm_pl.fisher` over the frozen LM, run as a test loop."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from dynlm_pl.errors import require
from dynlm_pl.files import atomic_write
from dynlm_pl.fisher import ESTIMATORS, FisherAccumulator
from dynlm_pl.models import Backbone


class FisherModule(L.LightningModule):
    """One estimator over the frozen LM, run with `trainer.test`; no optimizer, nothing trained.

    The DataModule (`FisherCut`) gives each rank its own contiguous block of the global streams; at the end the
    sums are reduced across ranks and global rank 0 writes (F, tokens) to `out_path`, which the caller reads: a
    spawned worker's attributes do not come back to the main process, a file does.
    """

    def __init__(self, model: Backbone, estimator: str, out_path: str | Path) -> None:
        super().__init__()
        require(estimator in ESTIMATORS, f"fisher.estimator must be one of {', '.join(ESTIMATORS)}, "
                f"got {estimator!r}")
        self.model = model.eval().requires_grad_(False)  # read only: gradients are taken functionally
        self.estimator = estimator
        self.out_path = Path(out_path)
        self.acc: FisherAccumulator | None = None

    def on_test_epoch_start(self) -> None:
        self.model.eval()
        self.acc = FisherAccumulator(self.model, self.estimator, world=self.trainer.world_size)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch  # [B / world, T]
        self.acc.step(x, y)

    def on_test_epoch_end(self) -> None:
        fisher, tokens = self.acc.result()  # a collective: every rank calls it
        if self.trainer.is_global_zero:
            blob = {"fisher": {k: v.cpu() for k, v in fisher.items()}, "tokens": tokens}
            atomic_write(self.out_path, lambda tmp: torch.save(blob, tmp))
        self.acc = None
