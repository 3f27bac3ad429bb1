"""The commands: `digits-train`, `digits-eval`, `digits-predict`, `digits-explore`, `digits-report` and
`digits-board` once installed; `python train.py`, `eval.py`, `predict.py`, `scripts/explore.py`,
`scripts/report.py` and `scripts/board.py` in a checkout. Each Hydra app composes the configs shipped in
`digits/conf` (plus `--config-dir` and `hydra.searchpath`, like any Hydra app)."""

import argparse
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from digits.cli import exit_without_teardown, run_cli, task
from digits.config import split_args


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@task
def train_app(cfg: DictConfig) -> float:
    from digits.train import run

    return run(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@task
def eval_app(cfg: DictConfig) -> None:
    from digits.artifacts import discarded_on_error, load_run
    from digits.evaluate import evaluate, per_class_table

    out_dir = Path(cfg.paths.output_dir)
    with discarded_on_error(out_dir, Path(cfg.paths.log_dir)):
        run_cfg, checkpoint = load_run(cfg.ckpt_path, cfg.paths)
        m = evaluate(run_cfg, checkpoint, Path(cfg.ckpt_path), out_dir, cfg.robustness)
    confused = ", ".join(f"{c['true']}→{c['predicted']} ({c['count']})" for c in m["most_confused"])
    print(
        f"test accuracy {100 * m['test_acc']:.2f} % (error {m['test_error_pct']:.2f} %), loss {m['test_loss']:.4f}, "
        f"MSE {m['test_mse']:.5f} on {m['test_size']} images\nmost confused: {confused}\n"
    )
    print(per_class_table(m["per_class"]))
    if robust := m.get("robustness"):
        sets = ", ".join(f"{name} {100 * acc:.1f}" for name, acc in robust.items() if name != "mean")
        print(f"robustness {100 * robust['mean']:.2f} % on degraded test images ({sets} %)\n")
    print(f"written to {out_dir}")


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
@task
def predict_app(cfg: DictConfig) -> None:
    from digits.predict import labelled_accuracy, prediction_table, run_predict

    rows = run_predict(cfg, EXTRA_INPUTS)
    if cfg.format == "json":
        print(json.dumps(rows, indent=2))
        if summary := labelled_accuracy(rows):
            print(summary, file=sys.stderr)
    else:
        print(prediction_table(rows))
    if any("error" in r for r in rows):
        sys.exit(1)


@hydra.main(version_base="1.3", config_path="conf", config_name="explore")
@task
def explore_app(cfg: DictConfig) -> None:
    from digits.config import build
    from digits.explore import explore

    for path in explore(build(cfg.data, "data"), Path(cfg.paths.output_dir)):
        print(path)


def train() -> None:
    """Train a model: `digits-train model=cnn data=fashion` (`--help` lists every group and option)."""
    run_cli(train_app)
    exit_without_teardown()


def evaluate() -> None:
    """Evaluate a checkpoint on the test set: `digits-eval ckpt_path=<file>`."""
    run_cli(eval_app)
    exit_without_teardown()


EXTRA_INPUTS: list[str] = []  # predict's bare arguments: image files, directories, globs


def predict() -> None:
    """Predict with a checkpoint: `digits-predict ckpt_path=<file> a.png photos/ 'scans/*.jpg' [--json]`
    (or `inputs=[...]`, `inputs_from=<list file or ->`, `test_index=0:5`)."""
    flags, rest = split_args(sys.argv[1:])
    EXTRA_INPUTS.extend(a for a in rest if "=" not in a)  # not an override: an input, whatever its name holds
    overrides = [a for a in rest if "=" in a]
    sys.argv = [sys.argv[0], *("format=json" if a == "--json" else a for a in flags), *overrides]
    run_cli(predict_app)
    exit_without_teardown()


def explore() -> None:
    """Look at a dataset as the labs did: `digits-explore data=mnist|fashion`."""
    run_cli(explore_app)


def board() -> None:
    """TensorBoard on a log root, its HParams columns written first from every finished run under it:
    `digits-board [logs] [tensorboard flags ...]`."""
    import os

    from digits.config import root_dir
    from digits.report import find_runs, write_experiment

    parser = argparse.ArgumentParser(description=board.__doc__)
    parser.add_argument("logdir", type=Path, nargs="?", default=Path(root_dir()) / "logs", help="default: logs/")
    args, tensorboard_flags = parser.parse_known_args()
    if not args.logdir.is_dir():
        sys.exit(f"error: {args.logdir} is not a directory; expected a log root")
    if runs := find_runs(args.logdir):
        print(f"HParams: {len(runs)} runs in {write_experiment(args.logdir, runs)}")
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir), *tensorboard_flags]
    os.execv(sys.executable, command)


def report() -> None:
    """One table and figures of every finished run below a dir: `digits-report logs/multiruns/<time>`."""
    from digits.report import find_runs, markdown_table, write_report, write_results

    parser = argparse.ArgumentParser(description=report.__doc__)
    parser.add_argument("root", type=Path, help="a log root, multirun dir or sweep dir")
    parser.add_argument("--out", type=Path, help="where to write (default: <root>/report)")
    parser.add_argument("--results", type=Path, help="also write the per-experiment results table here (Markdown)")
    parser.add_argument("--note", default="", help="a paragraph to put under the results table's title")
    args = parser.parse_args()
    if not args.root.is_dir():
        sys.exit(f"error: {args.root} is not a directory; expected a log root or a sweep dir")
    runs = find_runs(args.root)
    if not runs:
        sys.exit(f"error: no finished run (a directory with metrics.json and .hydra/) under {args.root}")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        command = f"digits-report {args.root} --results {args.results}"
        write_results(args.root, args.results, command, f"{args.note}\n\n" if args.note else "")
    result = write_report(args.root, runs, args.out)
    print(markdown_table(result["runs"]))
    print(f"{len(result['figures'])} figures, report.md and runs.csv in {result['out']}")
