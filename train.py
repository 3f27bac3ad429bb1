"""Train a model: `python train.py model=cnn data=fashion` (see README, `python train.py --help`)."""

import hydra
from omegaconf import DictConfig

from digits.cli import run_cli, task
from digits.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@task
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    run_cli(main)
