"""LightningModules, one per stage: LM pretraining, the Fisher pass, meta-training."""
