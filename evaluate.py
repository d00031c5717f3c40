"""Evaluate the run directory's artifacts: `python evaluate.py [experiment=...] [eval.splits=[test]]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dynlm_pl.cli import cli, main_guard
from dynlm_pl.config import check_config


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # Imported here, not at the top: a bad command line is refused before torch and Lightning load.
    from dynlm_pl.evaluation import run

    main_guard(lambda: run(check_config(cfg)))


if __name__ == "__main__":
    cli(main)  # Hydra's own errors (unknown key, unwritable output) as one line too
