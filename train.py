"""Train a stage: `python train.py stage=lm|fisher|meta|all [experiment=smoke|cpu|paper] [key=value ...]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dynlm_pl.cli import cli, main_guard


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Imported here, not at the top: a bad command line is refused before torch and Lightning load.
    from dynlm_pl.pipeline import objective, run_stages

    # the return value is what a sweeper plugin optimises (hydra/sweeper=optuna): validation perplexity, never test
    return main_guard(lambda: objective(run_stages(cfg)))


if __name__ == "__main__":
    cli(main)  # Hydra's own errors (unknown key, unwritable output) as one line too
