"""Evaluate the run directory's artifacts: `python evaluate.py [experiment=...] [eval.splits=[test]]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dynlm_pl.evaluation import run
from dynlm_pl.stages import check_config, cli, main_guard


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    main_guard(lambda: run(check_config(cfg)))


if __name__ == "__main__":
    cli(main)  # Hydra's own errors (unknown key, unwritable output) as one line too
