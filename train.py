"""Train a model: `python train.py model=cnn data=fashion` (see README, `python train.py --help`)."""

import sys

import hydra
from omegaconf import DictConfig

from digits.config import check_choices
from digits.errors import DigitsError
from digits.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    try:
        check_choices(sys.argv[1:])
    except DigitsError as err:
        sys.exit(f"error: {err}")
    main()
