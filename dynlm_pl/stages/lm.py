"""Stage `lm`: pretrain the backbone on the training split, keep best and last checkpoints, export `lm.ckpt`."""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from dynlm_pl import artifacts
from dynlm_pl.config import check_config
from dynlm_pl.errors import require
from dynlm_pl.resume import check_resumable
from dynlm_pl.runtime import best_model_score, fit, make_datamodule, make_trainer, model_spec, primitives, run_dir
from dynlm_pl.systems.lm import LMPretrainModule

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """`python train.py stage=lm`: train, keep `checkpoints/{lm-best,last}.ckpt`, export θ* as `lm.ckpt`."""
    out = run_dir(check_config(cfg))
    L.seed_everything(cfg.seed, workers=True)
    dm = make_datamodule(cfg)
    corpus = dm.load()
    module = LMPretrainModule(
        vocab_size=len(corpus.vocab), model=model_spec(cfg.model), bptt=cfg.data.bptt,
        data_source=corpus.source, vocab_hash=corpus.vocab_hash, **primitives(cfg.lm.optim))
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="lm-best", monitor="val/ppl", mode="min",
                           save_last=True, save_top_k=1, enable_version_counter=False)
    trainer = make_trainer(cfg, cfg.lm.get("trainer"), callbacks=[ckpt], stage="lm")
    resume = out / "checkpoints" / "last.ckpt"
    ckpt_path = str(resume) if cfg.get("resume") and resume.is_file() else None
    if ckpt_path:
        check_resumable(resume)
        # The data module skips the windows already trained on (see on_load_checkpoint), which Lightning cannot
        # know: its warning that a mid-epoch resume of a plain loader is unreliable does not apply here.
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
    t0 = time.time()
    fit(trainer, module, dm, ckpt_path, "pretraining")
    if not trainer.is_global_zero:  # under strategy=ddp / torchrun every rank runs this; rank 0 writes
        return {}
    warn_if_cut_short(trainer, module.tokens_seen)
    best = ckpt.best_model_path or ckpt.last_model_path
    require(bool(best), "pretraining ended without a checkpoint (no validation ran); "
            "check lm.trainer.limit_val_batches / val_check_interval")
    export(best, out / "lm.ckpt", corpus.vocab)
    score = best_model_score(ckpt)  # ddp_spawn sends only the best path back to this process
    metrics = {"val_ppl": float(score) if score is not None else math.nan, "seconds": time.time() - t0,
               "tokens_seen": float(module.tokens_seen)}
    log.info(f"[lm] best val ppl {metrics['val_ppl']:.2f} after {module.tokens_seen:,} training tokens "
             f"({trainer.current_epoch} epochs); wrote {out / 'lm.ckpt'} in {metrics['seconds']:.0f}s")
    return metrics


def warn_if_cut_short(trainer: L.Trainer, tokens_seen: int) -> None:
    """The budget is lm.trainer.max_epochs / max_steps; max_time is a safety net, and says so when it binds, since
    an LM cut by the clock depends on what else the machine was doing."""
    epochs_left = trainer.max_epochs is not None and 0 <= trainer.current_epoch < trainer.max_epochs
    steps_left = trainer.max_steps is None or trainer.max_steps < 0 or trainer.global_step < trainer.max_steps
    if trainer.should_stop and epochs_left and steps_left:
        warnings.warn(f"lm.trainer.max_time stopped pretraining after {trainer.current_epoch} of "
                      f"{trainer.max_epochs} epochs ({tokens_seen:,} tokens): the LM depends on the machine's load; "
                      "raise max_time or lower max_epochs for a budget that does not", stacklevel=2)


def export(best: str, path: Path, vocab: list[str]) -> None:
    """θ* of the best Lightning checkpoint (the NT-ASGD average once it has begun) as a plain lm.ckpt."""
    module = LMPretrainModule.load_from_checkpoint(best, map_location="cpu")
    hp = dict(module.hparams, tokens_seen=module.tokens_seen)
    artifacts.save_lm(path, module.eval_model(), hp.pop("model"), vocab, hp)
