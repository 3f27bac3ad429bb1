"""Look at a dataset as the labs did: `python scripts/explore.py data=mnist|fashion`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from digits.cli import run_cli, task
from digits.config import CONF_DIR, build
from digits.explore import explore


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="explore")
@task
def main(cfg: DictConfig) -> None:
    for path in explore(build(cfg.data, "data"), Path(cfg.paths.output_dir)):
        print(path)


if __name__ == "__main__":
    run_cli(main)
