"""The stages `python train.py stage=...` runs, one module each with `run(cfg) -> dict` (evaluation is
`dynlm_pl.evaluation.run`): each reads its inputs from the run directory, trains or estimates with one of the
LightningModules of `systems/`, and leaves its artifact there for the next stage."""
