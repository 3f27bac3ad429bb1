"""A Hydra Sweeper on Optuna ≥ 4 (ask/tell), configured like the upstream hydra-optuna-sweeper."""
