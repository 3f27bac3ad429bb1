"""Registers `hydra/sweeper=digits_optuna` (with its sampler and pruner groups) and `hydra/launcher=slurm`."""
