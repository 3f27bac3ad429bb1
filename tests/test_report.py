"""report.py over a real multirun, and explore.py over a real dataset."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_real_png, read_events, train_command
from digits.report import KEPT, natural, verdict


def test_report_of_two_models_by_two_weight_decays_by_two_seeds(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    sweep = train_command(
        "-m",
        "experiment=mlp_8,lab_cnn",
        "data.train_size=256",
        "data.val_size=256",
        "trainer.max_epochs=2",
        "optimizer.weight_decay=1e-6,1e-3",
        "seed=0,1",
        log_dir=log_dir,
        data_dir=data_dir,
    )
    done = subprocess.run(sweep, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    (multirun,) = log_dir.glob("multiruns/*")
    # the swept keys first in every run's name, the keys given to all runs next, the job number last
    runs = [Path(line) for line in (multirun / "runs.txt").read_text().split()]
    assert sorted(run.parent.name for run in runs)[0] == (
        "lab_cnn_wd0.001_seed0_ep2_train_size-256_val_size-256_mnist_cnn_h128-50_k5-3_bs128_adam0.002"
    )
    assert all(run.parent.parent == log_dir / "runs" and run.name.startswith(multirun.name) for run in runs)

    results = tmp_path / "results.md"
    report = [sys.executable, str(ROOT / "scripts" / "report.py"), str(multirun), "--results", str(results)]
    done = subprocess.run(report, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for experiment in ("mlp_8", "lab_cnn"):
        assert_real_png(tmp_path / "figures" / f"{experiment}_MNIST_optimizer.weight_decay.png")
        rows = [line for line in results.read_text().splitlines() if line.startswith(f"| `{experiment}`")]
        assert len(rows) == 2  # one row per weight decay, its two seeds folded into mean ± std
        assert rows[0].startswith(f"| `{experiment}` optimizer.weight_decay=1e-06 | MNIST |") and "| 2 |" in rows[0]

    out = multirun / "report"
    page = (out / "report.md").read_text()
    series = page.split("## Series (seeds folded)")[1].strip().splitlines()
    # the models' recipes differ in much, but each follows from the experiment: four series of two seeds
    assert series[0] == "| experiment | optimizer.weight_decay | seeds | test accuracy % | best val accuracy % |"
    body = [line.split(" | ") for line in series[2:6]]
    assert [(r[0], r[1], r[2]) for r in body] == [
        ("| lab_cnn", "1e-06", "2"), ("| lab_cnn", "0.001", "2"), ("| mlp_8", "1e-06", "2"), ("| mlp_8", "0.001", "2")
    ]  # fmt: skip
    with open(out / "runs.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 8 and {r["seed"] for r in csv_rows} == {"0", "1"}
    for row in body:  # each series' mean is its two runs' mean (%, as in every table)
        accs = [
            float(r["test_acc_pct"]) for r in csv_rows if r["run"].startswith(row[0][2:]) and f"wd{row[1]}" in r["run"]
        ]
        assert len(accs) == 2 and float(row[3].split(" ± ")[0]) == pytest.approx(sum(accs) / 2, abs=0.006)
    lines = results.read_text().splitlines()
    table = [line.split(" | ") for line in lines if line.startswith("| ")]
    column = table[0].index("precision")
    align = lines[lines.index(" | ".join(table[0])) + 1].strip("|").split("|")  # a cell per column, numbers right
    assert len(align) == len(table[0]) and (align[table[0].index("params")], align[column]) == ("---:", "---")
    for experiment, allowed in (("mlp_8", {"32-true"}), ("lab_cnn", {"32-true", "bf16-mixed"})):
        recorded = {r["precision"] for r in csv_rows if r["run"].startswith(f"{experiment}_")}
        shown = {row[column] for row in table if row[0].startswith(f"| `{experiment}`")}
        assert shown == recorded and len(recorded) == 1 and recorded <= allowed  # an MLP's default is fp32
    for key in ("optimizer.weight_decay", "experiment"):
        assert_real_png(out / f"errorbars_{key}.png")
    assert len(list(out.glob("curves_*.png"))) == 8
    images = read_events(out).Tags()["images"]
    assert {"errorbars/optimizer.weight_decay", "errorbars/experiment"} <= set(images)
    assert sum(tag.startswith("curves/") for tag in images) == 8
    curve = next(tag for tag in images if tag.startswith("curves/"))  # TensorBoard holds the PNG itself
    png = (out / f"{curve.replace('/', '_')}.png").read_bytes()
    assert read_events(out).Images(curve)[-1].encoded_image_string == png

    # a run removed since: the next report drops its figure, and only what the last report wrote
    (gone,) = [run for run in runs if run.name.endswith("_7")]
    shutil.rmtree(gone)
    shown = f"curves_{gone.parent.name}_{gone.name}.png"
    assert_real_png(out / shown)
    (out / "mine.png").write_bytes((out / "errorbars_experiment.png").read_bytes())
    # a choice written up by hand below the results page's KEPT line, with a figure of its own
    (tmp_path / "figures" / "choice.png").write_bytes((out / "errorbars_experiment.png").read_bytes())
    by_hand = "\n## A choice, written up by hand\n\n![choice](figures/choice.png)\n"
    results.write_text(results.read_text() + by_hand)
    below = results.read_text().partition(KEPT)[2]
    done = subprocess.run(report, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert results.read_text().count(KEPT) == 1 and results.read_text().partition(KEPT)[2] == below
    assert below.endswith(by_hand)
    assert_real_png(tmp_path / "figures" / "choice.png")
    assert len(list(out.glob("curves_*.png"))) == 7 and not (out / shown).exists()
    assert (out / "mine.png").exists()


def test_report_of_an_empty_dir_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "report.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: no finished run")


def test_explore_writes_its_figures(tmp_path, data_dir):
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "explore.py"),
        "data=fashion",
        f"paths.log_dir={tmp_path}",
        f"paths.data_dir={data_dir}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "explore" / "fashion"
    for name in ("first_200.png", "class_histogram.png", "image_stats.png"):
        assert_real_png(out / name)
    assert set(read_events(out).Tags()["images"]) == {"first_200", "class_histogram", "image_stats"}
    with open(out / "image_stats.csv") as f:
        stats = list(csv.DictReader(f))
    assert len(stats) == 10 and sum(int(r["images"]) for r in stats) == 60_000
    assert all(0 < float(r["entropy"]) <= 8 for r in stats)


def test_verdict_compares_the_mean_with_the_labs_and_the_bar():
    assert verdict(99.07, 98.94, 99.1) == "✓ labs 98.94%, ✗ bar ≥ 99.1%"
    assert verdict(99.6, None, 99.6) == "✓ bar ≥ 99.6%"
    assert verdict(92.6, 92.6, None) == "✗ labs 92.6%"  # a tie does not beat the labs
    assert verdict(97.0, None, None) == ""


def test_runs_are_listed_with_their_numbers_in_order():
    """A hundred seeds or jobs read 0, 1, 2, …, 10, not 0, 1, 10, 11, …, 2."""
    names = ["seed10_mlp/t_p7_10", "seed2_mlp/t_p7_2", "seed1_mlp/t_p7_1", "seed2_mlp/t_p7_12", "seed2_mlp/t_p7_3"]
    ordered = ["seed1_mlp/t_p7_1", "seed2_mlp/t_p7_2", "seed2_mlp/t_p7_3", "seed2_mlp/t_p7_12", "seed10_mlp/t_p7_10"]
    assert sorted(map(Path, names), key=natural) == list(map(Path, ordered))
