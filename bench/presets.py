"""The shipped presets as plain dicts, composed by Hydra from conf/ as train.py composes them, so that a benchmark
measures what `model=...` and `gate=...` ship instead of a hand-made copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
# bench_gate.py's --params name the parametrization; the preset that ships each
GATE_OF_PARAM = {"paper": "paper", "krause": "krause_init", "rational": "krause_fast"}


def preset(group: str, name: str) -> dict[str, Any]:
    """`conf/<group>/<name>.yaml` with its defaults applied, without Hydra's keys (`_target_`)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={name}"])
    return {k: v for k, v in OmegaConf.to_container(cfg[group], resolve=True).items() if not k.startswith("_")}
