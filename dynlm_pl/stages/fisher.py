"""Stage `fisher`: diag F of the pretrained LM over the training stream -> `<run_dir>/fisher.pt`.

`python train.py stage=fisher` reads `<run_dir>/lm.ckpt`, runs the chosen estimator (F) and Krause's
`batch_ms` (ms; once if it is the estimator) as Lightning test loops over the frozen LM, and writes the
artifact of `dynlm_pl.fisher` atomically, only once every pass has finished with finite values.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from dynlm_pl import artifacts
from dynlm_pl.config import check_config
from dynlm_pl.data import FisherCut, WikiText2DataModule
from dynlm_pl.errors import DynlmError, require
from dynlm_pl.files import file_sha256
from dynlm_pl.fisher import FisherArtifact, summarize
from dynlm_pl.models import Backbone
from dynlm_pl.runtime import make_datamodule, make_trainer, run_dir, wandb_run
from dynlm_pl.systems.fisher import FisherModule

log = logging.getLogger(__name__)


def _table(fisher: dict[str, Tensor]) -> str:
    lines = [f"  {'tensor':<22} {'shape':>12} {'min':>10} {'median':>10} {'max':>10}"]
    for name, shape, lo, med, hi in summarize(fisher):
        lines.append(f"  {name:<22} {'x'.join(map(str, shape)):>12} {lo:>10.3g} {med:>10.3g} {hi:>10.3g}")
    return "\n".join(lines)


def _one_pass(cfg: DictConfig, out: Path, dm: WikiText2DataModule, model: Backbone,
              est: str) -> tuple[dict[str, Tensor], int, float, int] | None:
    """One estimator over the DataModule's Fisher cut as a Lightning test loop: (F or ms, tokens, seconds, world
    size) on global rank 0, None on the others."""
    partial = out / f".fisher-{est}.partial.pt"  # rank 0's result of one pass, never a fisher.pt
    partial.unlink(missing_ok=True)
    # Gradients inside the test loop: inference mode would forbid them whatever the config says. Full
    # precision whatever trainer.precision says: F sums squared per-example gradients (bf16 would round
    # them, fp16 underflow them), and the written-out forward mixes dtypes under autocast.
    trainer = make_trainer(cfg, stage="fisher", bar={"test": f"Fisher pass ({est})"}, inference_mode=False,
                           precision="32-true")
    t0 = time.time()
    trainer.test(FisherModule(model, est, partial), datamodule=dm, verbose=False)
    if trainer.interrupted:
        raise DynlmError(f"the Fisher pass ({est}) was interrupted; {out / 'fisher.pt'} was left as it was: "
                         "rerun `python train.py stage=fisher`")
    if not trainer.is_global_zero:
        return None
    require(partial.is_file(), f"the Fisher pass ({est}) ended without a result; check "
            "trainer.limit_test_batches and fisher.tokens, then rerun `python train.py stage=fisher`")
    blob = torch.load(partial, weights_only=True)
    partial.unlink()
    return blob["fisher"], blob["tokens"], time.time() - t0, trainer.world_size


def _log_to_wandb(run: Any, fisher: dict[str, Tensor], ms: dict[str, Tensor]) -> None:
    """The stage's W&B run (logger=wandb): per tensor the min/median/max of F and the median RMS (a table), and a
    histogram of log10 F per tensor."""
    import wandb

    rms = {k: med for k, _, _, med, _ in summarize({k: v.clamp_min(0).sqrt() for k, v in ms.items()})}
    rows = [[k, "x".join(map(str, shape)), lo, med, hi, rms.get(k)] for k, shape, lo, med, hi in summarize(fisher)]
    run.log({"fisher/tensors": wandb.Table(columns=["tensor", "shape", "F min", "F median", "F max", "RMS median"],
                                           data=rows),
             **{f"fisher/log10_F/{k}": wandb.Histogram(np_histogram=np.histogram(
                 torch.log10(v.double().clamp_min(1e-30)).reshape(-1).numpy(), bins=64)) for k, v in fisher.items()}})


def run(cfg: DictConfig) -> dict[str, Any]:
    """`python train.py stage=fisher`: F (fisher.estimator) and ms (batch_ms) of lm.ckpt -> fisher.pt."""
    out = run_dir(check_config(cfg))
    fc = cfg.fisher
    lm_path = out / "lm.ckpt"
    model, prov = artifacts.load_lm(lm_path)
    lm_sha = file_sha256(lm_path)
    dm = make_datamodule(cfg)
    corpus = dm.load()
    artifacts.check_same_data(prov, corpus.vocab_hash, f"the LM in {lm_path}")
    require(fc.split in corpus.splits, f"fisher.split must be one of {', '.join(corpus.splits)}, got {fc.split!r}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    passes = {fc.estimator: (fc.batch_size, fc.window) if fc.estimator == "empirical"
              else (fc.ms_batch_size, fc.ms_window)}
    passes.setdefault("batch_ms", (fc.ms_batch_size, fc.ms_window))
    done: dict[str, tuple[dict[str, Tensor], int, float]] = {}
    world = 1
    for est, (batch, window) in passes.items():
        result = _one_pass(cfg, out, dm.use(FisherCut(str(fc.split), fc.tokens or None, batch, window, int(fc.seed))),
                           model, est)
        if result is None:  # under strategy=ddp the other ranks run this too; rank 0 writes
            return {}
        fisher_sq, n_tok, secs, world = result
        done[est] = (fisher_sq, n_tok, secs)

    fisher, n_tok, secs = done[fc.estimator]
    ms, ms_tok, ms_secs = done["batch_ms"]
    for name, d in (("F", fisher), ("ms", ms)):
        bad = [k for k, v in d.items() if not torch.isfinite(v).all()]
        require(not bad, f"{name} is not finite in {', '.join(bad)} (the LM's loss diverges on this data?); "
                f"{out / 'fisher.pt'} was left as it was")
    art = FisherArtifact(
        theta0={k: p.detach().cpu().clone() for k, p in model.named_parameters()},
        fisher=fisher, ms=ms, estimator=fc.estimator, tokens=n_tok, lm_sha256=lm_sha,
        meta={"batch_size": passes[fc.estimator][0], "window": passes[fc.estimator][1],
              "ms_batch_size": fc.ms_batch_size, "ms_window": fc.ms_window, "ms_tokens": ms_tok,
              "requested_tokens": fc.tokens or 0, "split": fc.split, "seed": fc.seed,
              "data_source": corpus.source, "vocab_hash": corpus.vocab_hash, "world_size": world,
              "seconds": secs, "ms_seconds": ms_secs if fc.estimator != "batch_ms" else 0.0,
              "lm_path": str(lm_path), "torch": str(torch.__version__)})
    artifacts.save_fisher(art, out / "fisher.pt")
    if wandb_run() is not None:
        _log_to_wandb(wandb_run(), fisher, ms)
    total = secs + (ms_secs if fc.estimator != "batch_ms" else 0.0)
    log.info(f"[fisher] {fc.estimator} F over {n_tok:,} {fc.split} tokens in {secs:.1f}s"
             + (f", batch_ms over {ms_tok:,} in {ms_secs:.1f}s" if fc.estimator != "batch_ms" else "")
             + f"; wrote {out / 'fisher.pt'}\n{_table(fisher)}")
    return {"estimator": fc.estimator, "tokens": n_tok, "seconds": total, "path": str(out / "fisher.pt")}
