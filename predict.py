"""Predict with a checkpoint: `python predict.py ckpt_path=... inputs=[a.png] test_index=0:5 [--json]`."""

import json
import sys

import hydra
from omegaconf import DictConfig

from digits.cli import run_cli, task
from digits.evaluate import prediction_table, run_predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
@task
def main(cfg: DictConfig) -> None:
    rows = run_predict(cfg)
    print(json.dumps(rows, indent=2) if cfg.format == "json" else prediction_table(rows))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    sys.argv = ["format=json" if a == "--json" else a for a in sys.argv]
    run_cli(main)
