"""Checking the composed configuration, in one place, before any stage runs: `stage=all unroll=0` or
`meta.optim.lr=fast` fails in a second with one line naming the key, not after pretraining and the Fisher pass.

Every entry point calls `check_config` (pipeline.run_stages, evaluate.py), and so does each stage's `run`, which
tests and scripts call directly; it is cheap and idempotent.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from dynlm_pl.errors import require

# Sizes that must be positive integers.
POSITIVE_INTS = ("unroll", "meta.segment", "meta.streams", "meta.steps", "meta.val_every", "eval.segment",
                 "eval.streams", "data.bptt", "data.batch_size", "data.eval_batch_size", "data.test_batch_size",
                 "fisher.batch_size", "fisher.window", "fisher.ms_batch_size", "fisher.ms_window", "eval.tune.tokens",
                 "eval.tune.workers", "eval.workers", "eval.bootstrap.resamples")
# Counts and checkpoint intervals: 0 or more (null allowed).
NON_NEGATIVE_INTS = ("lm.trainer.ckpt_every_n_steps", "meta.trainer.ckpt_every_n_steps", "meta.reset_every",
                     "eval.tune.refine", "eval.tune.pt_rounds", "fisher.tokens", "eval.bootstrap.seed")
# Numbers (int or float) >= 0 (null allowed where the key is optional).
NON_NEGATIVE_NUMBERS = ("lm.optim.lr", "lm.optim.weight_decay", "lm.optim.clip", "lm.optim.alpha", "lm.optim.beta",
                        "meta.optim.lr", "meta.optim.weight_decay", "meta.optim.clip", "meta.ewc_lambda",
                        "gate.lr", "gate.lamb", "gate.eps", "gate.lamb0", "gate.clamp", "gate.pull",
                        "eval.tune.rms_eps", "eval.tune.refine_step", "eval.tune.pt_step")
CHOICES = {"meta.order": (1, 2), "meta.data": ("train", "valid"), "fisher.estimator": ("empirical", "batch_ms")}
METHODS = ("static", "sgd", "rms", "rms_pt", "meta_noflush", "meta")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_numbers(cfg: DictConfig) -> None:
    for keys, low, what in ((POSITIVE_INTS, 1, "a positive integer"), (NON_NEGATIVE_INTS, 0, "an integer >= 0")):
        for key in keys:
            v = OmegaConf.select(cfg, key, default=None)
            if v is None and low == 0:
                continue  # optional
            require(_is_int(v) and v >= low, f"{key} must be {what}, got {v!r}")
    for key in NON_NEGATIVE_NUMBERS:
        v = OmegaConf.select(cfg, key, default=None)
        require(v is None or (_is_number(v) and v >= 0), f"{key} must be a number >= 0, got {v!r}")


def _check_eval(cfg: DictConfig) -> None:
    e = cfg.get("eval") or {}
    unknown = [m for m in e.get("methods", []) if m not in METHODS]
    require(not unknown, f"eval.methods has unknown {unknown}; choose from {', '.join(METHODS)}")
    limit = e.get("max_tokens")
    require(limit is None or (_is_int(limit) and limit >= 2),
            f"eval.max_tokens must be an integer >= 2 (or null for whole splits), got {limit!r}")
    v = e.get("max_drift")
    require(v is None or (_is_number(v) and v > 0), f"eval.max_drift must be a positive number or null (no bound), "
            f"got {v!r}")
    for key in ("eval.tune.refine_step", "eval.tune.pt_step"):
        v = OmegaConf.select(cfg, key, default=None)
        require(v is None or v > 1, f"{key} must be a factor > 1, got {v!r}")
    v = OmegaConf.select(cfg, "eval.bootstrap.level", default=None)
    require(v is None or (_is_number(v) and 0 < v < 1), f"eval.bootstrap.level must be in (0, 1), got {v!r}")
    # Data roles: φ is selected on the selection slice, valid[:eval.tune.tokens], where the baselines are tuned.
    n_phi, n_sel = OmegaConf.select(cfg, "meta.val_tokens"), OmegaConf.select(cfg, "eval.tune.tokens")
    require(n_phi is None or n_sel is None or (_is_int(n_phi) and 0 < n_phi <= n_sel),
            f"meta.val_tokens={n_phi} must be at most eval.tune.tokens={n_sel}: φ is selected on the selection "
            "slice where the baselines are tuned, and meta-training reads the validation split only past it")


def check_config(cfg: DictConfig) -> DictConfig:
    """Refuse a value of the wrong type or range with one line naming the key; returns cfg."""
    _check_numbers(cfg)
    for key, allowed in CHOICES.items():
        v = OmegaConf.select(cfg, key, default=None)
        require(v is None or v in allowed, f"{key} must be one of {', '.join(map(str, allowed))}, got {v!r}")
    v = OmegaConf.select(cfg, "meta.checkpoint_group", default=0)
    require(v == "auto" or (_is_int(v) and v >= 0), f"meta.checkpoint_group must be auto or an integer >= 0, "
            f"got {v!r}")
    v = OmegaConf.select(cfg, "meta.reverse_sample", default=1.0)
    require(_is_number(v) and 0 < v <= 1, f"meta.reverse_sample must be a fraction in (0, 1], got {v!r}")
    require(v == 1 or bool(OmegaConf.select(cfg, "meta.fast_first_order", default=False)),
            f"meta.reverse_sample={v} samples the coordinates of the fast first-order reverse pass: set "
            "meta.fast_first_order=true with it, or meta.reverse_sample=1")
    _check_eval(cfg)
    m_seg, e_seg = OmegaConf.select(cfg, "meta.segment"), OmegaConf.select(cfg, "eval.segment")
    require(m_seg is None or e_seg is None or m_seg == e_seg
            or bool(OmegaConf.select(cfg, "meta.allow_segment_mismatch", default=False)),
            f"meta.segment={m_seg} differs from eval.segment={e_seg}, where the baselines φ starts from are tuned and "
            "every method is evaluated; set both to the same value, or meta.allow_segment_mismatch=true")
    return cfg
