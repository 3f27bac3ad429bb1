"""Evaluate a checkpoint: `python eval.py ckpt_path=logs/runs/.../checkpoints/last.ckpt`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from digits.artifacts import discarded_on_error
from digits.cli import run_cli, task
from digits.evaluate import evaluate, load_run, per_class_table


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@task
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.paths.output_dir)
    with discarded_on_error(out_dir, Path(cfg.paths.log_dir)):
        run_cfg, checkpoint = load_run(cfg.ckpt_path, cfg.paths)
        m = evaluate(run_cfg, checkpoint, Path(cfg.ckpt_path), out_dir)
    confused = ", ".join(f"{c['true']}→{c['predicted']} ({c['count']})" for c in m["most_confused"])
    print(
        f"test accuracy {100 * m['test_acc']:.2f} % (error {m['test_error_pct']:.2f} %), loss {m['test_loss']:.4f}, "
        f"MSE {m['test_mse']:.5f} on {m['test_size']} images\nmost confused: {confused}\n"
    )
    print(per_class_table(m["per_class"]) + f"\nwritten to {out_dir}")


if __name__ == "__main__":
    run_cli(main)
