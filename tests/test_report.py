"""report.py over a real multirun, and explore.py over a real dataset."""

import csv
import shutil
import subprocess
import sys

from conftest import ROOT, assert_real_png, read_events, train_command
from digits.report import verdict


def test_report_of_a_2x2_multirun_with_2_seeds(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    sweep = train_command(
        "-m",
        "experiment=mlp_8",
        "data.train_size=256",
        "data.val_size=256",
        "trainer.max_epochs=2",
        "optimizer.weight_decay=1e-6,1e-3",
        "data.batch_size=32,64",
        "seed=0,1",
        log_dir=log_dir,
        data_dir=data_dir,
    )
    done = subprocess.run(sweep, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    (multirun,) = log_dir.glob("multiruns/*")

    results = tmp_path / "results.md"
    report = [sys.executable, str(ROOT / "scripts" / "report.py"), str(multirun), "--results", str(results)]
    done = subprocess.run(report, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for key in ("data.batch_size", "optimizer.weight_decay"):
        assert_real_png(tmp_path / "figures" / f"mlp_8_MNIST_{key}.png")
        assert f"](figures/mlp_8_MNIST_{key}.png)" in results.read_text()
    table = [line for line in results.read_text().splitlines() if line.startswith("| `mlp_8`")]
    assert len(table) == 4  # one row per swept pair, its two seeds folded into mean ± std
    assert table[0].startswith("| `mlp_8` data.batch_size=32, optimizer.weight_decay=1e-06 | MNIST | 6,370 | 2 |")
    assert table[-1].startswith("| `mlp_8` data.batch_size=64, optimizer.weight_decay=0.001 | MNIST | 6,370 | 2 |")
    out = multirun / "report"
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert {r["weight_decay"] for r in rows} == {"1e-06", "0.001"} and {r["seed"] for r in rows} == {"0", "1"}
    assert all(0 < float(r["test_acc"]) <= 1 and r["model"] == "mlp" for r in rows)
    for key in ("optimizer.weight_decay", "data.batch_size"):
        assert_real_png(out / f"errorbars_{key}.png")
    assert len(list(out.glob("curves_*.png"))) == 8
    assert (out / "report.md").read_text().count("\n| ") == 9  # header and 8 runs
    images = read_events(out).Tags()["images"]
    assert {"errorbars/optimizer.weight_decay", "errorbars/data.batch_size"} <= set(images)
    assert sum(tag.startswith("curves/") for tag in images) == 8

    # a run removed since: the next report drops its figure, and only what the last report wrote
    gone = next(multirun.glob("7_*"))
    shutil.rmtree(gone)
    assert_real_png(out / f"curves_{gone.name}.png")
    (out / "mine.png").write_bytes((out / "errorbars_data.batch_size.png").read_bytes())
    done = subprocess.run(report, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(out.glob("curves_*.png"))) == 7 and not (out / f"curves_{gone.name}.png").exists()
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
