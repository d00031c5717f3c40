"""Checking the composed configuration before any stage runs: `stage=all unroll=0` fails in a second with one
line naming the key, not after pretraining and the Fisher pass."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from dynlm_pl.errors import require

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


