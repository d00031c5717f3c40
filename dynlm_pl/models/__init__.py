"""Pure nn.Modules: language models behind the `Backbone` contract. Nothing here imports the rest of dynlm."""

from __future__ import annotations

import importlib
from typing import Any

from dynlm_pl.models.awd_lstm import AWDLSTM, Hidden, detach_hidden, lm_loss
from dynlm_pl.models.backbone import Backbone, LMOutput

# The model of a spec without `_target_` (lm.ckpt files written before the model group named its class).
DEFAULT_TARGET = "dynlm_pl.models.AWDLSTM"


def build_model(spec: dict[str, Any], vocab_size: int) -> Backbone:
    """The backbone a `conf/model/*.yaml` spec names: `_target_` (a class path) called with the vocabulary size and
    the spec's other keys."""
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    module, _, name = str(spec.get("_target_", DEFAULT_TARGET)).rpartition(".")
    return getattr(importlib.import_module(module), name)(vocab_size, **kwargs)


__all__ = ["AWDLSTM", "DEFAULT_TARGET", "Backbone", "Hidden", "LMOutput", "build_model", "detach_hidden", "lm_loss"]
