"""digits used from outside its checkout: a wheel installed (not editable) into a fresh venv, run from an empty
directory, with a user's own config dir, model package and dataset."""

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
CLASSES = [f"{i} - bar {i}" for i in range(10)]

NETS = '''
from torch import nn


class TinyNet(nn.Module):
    """A user's own model: nothing of digits in it."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x):
        return self.layers(x)
'''

DATA = '''
from torchvision.datasets import MNIST


class TinyBars(MNIST):
    """A user's own dataset in MNIST's IDX format: class k is a bright bar on row 2 + 2k."""

    mirrors = ["http://127.0.0.1:9/"]  # nothing to fetch: the files are at hand
    resources = {resources!r}
    classes = {classes!r}
'''


def idx_files(raw: Path, n_train: int = 600, n_test: int = 200) -> list[tuple[str, str]]:
    """Generated IDX files (gzipped, as torchvision expects them), with their md5s."""
    rng = np.random.default_rng(0)
    resources = []
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 60).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label, 4:24] = 255
        header = {"images": np.array([2051, n, 28, 28], ">i4"), "labels": np.array([2049, n], ">i4")}
        for kind, body in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte.gz"
            data = gzip.compress(header[kind.split("-")[0]].tobytes() + body.tobytes(), mtime=0)
            (raw / name).write_bytes(data)
            resources.append((name, hashlib.md5(data).hexdigest()))
    return resources


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding digits as a wheel built from this checkout; its dependencies come from the test's
    own environment (read through a .pth file), so nothing is downloaded."""
    where = tmp_path_factory.mktemp("venv")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", where / "dist", ROOT],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (where / "dist").glob("digits-*.whl")
    subprocess.run([sys.executable, "-m", "venv", where / "venv"], check=True)
    python = where / "venv" / "bin" / "python"
    where_site = [python, "-c", "import site; print(site.getsitepackages()[0])"]
    site = subprocess.run(where_site, capture_output=True, text=True)
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the checkout's editable install is visible through deps.pth, and must not count
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel]
    done = subprocess.run(install, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return where / "venv" / "bin"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir) -> Path:
    """An empty directory but for what a user brings: MNIST's files, a config dir and a package of their own."""
    work = tmp_path_factory.mktemp("work")
    mnist = work / "data" / "MNIST" / "raw"
    shutil.copytree(data_dir / "MNIST" / "raw", mnist, ignore=shutil.ignore_patterns("*ubyte"))
    raw = work / "data" / "TinyBars" / "raw"
    raw.mkdir(parents=True)
    resources = idx_files(raw)
    (work / "mypkg").mkdir()
    (work / "mypkg" / "__init__.py").write_text("")
    (work / "mypkg" / "nets.py").write_text(NETS)
    (work / "mypkg" / "data.py").write_text(DATA.format(resources=resources, classes=CLASSES))
    conf = work / "myconf"
    for group, name, text in [
        ("model", "tiny", "_target_: mypkg.nets.TinyNet\nwidth: 16\n"),
        (
            "data",
            "bars",
            "defaults:\n  - mnist\n  - _self_\n\ndataset: mypkg.data.TinyBars\nmean: 0.14\nstd: 0.2\n"
            "train_pool: 600\nval_size: 100\n",
        ),
        (
            "experiment",
            "mine",
            # the bars' row is their class: no shifts (the default augment=digits_half would move them)
            "# @package _global_\ndefaults:\n  - override /model: tiny\n  - override /data: bars\n"
            "  - override /augment: none\n\ntrainer:\n  max_epochs: 3\n",
        ),
        (
            "hparams_search",
            "tiny_optuna",
            "# @package _global_\ndefaults:\n  - override /hydra/sweeper: digits_optuna\n\nhydra:\n  sweeper:\n"
            "    storage: sqlite:///${hydra.sweep.dir}/optuna.db\n    study_name: tiny\n    n_trials: 2\n"
            "    params:\n      model.width: choice(8, 32)\n",
        ),
    ]:
        (conf / group).mkdir(parents=True, exist_ok=True)
        (conf / group / f"{name}.yaml").write_text(text)
    return work


def run(bin_dir: Path, command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DIGITS_ROOT", "DIGITS_DATA_DIR")}
    env |= {"PYTHONPATH": str(cwd), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([bin_dir / command, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_the_installed_commands_work_from_an_empty_directory(installed, workdir):
    done = run(installed, "digits-train", "debug=fast", "model=mlp", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (workdir / "logs" / "runs").glob("mlp_mnist_*/*")
    assert (run_dir / "train.log").exists() and (run_dir / "metrics.json").exists()
    where = run(installed, "python", "-c", "import digits.entry; print(digits.entry.__file__)", cwd=workdir)
    assert Path(where.stdout.strip()).is_relative_to(installed.parent), "digits runs from the wheel, not the checkout"


def test_a_users_model_dataset_and_experiment_train_evaluate_predict_and_sweep(installed, workdir):
    mine = ["--config-dir", str(workdir / "myconf"), "experiment=mine"]
    done = run(installed, "digits-train", *mine, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics_file,) = (workdir / "logs" / "runs").glob("mine_bars_tiny_*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["data"] == "TinyBars" and metrics["model"] == "TinyNet" and metrics["train_size"] == 500
    assert metrics["test_acc"] > 0.9  # the bars are easy: a model that learnt nothing scores 0.1

    ckpt = workdir / "elsewhere.ckpt"
    shutil.copy(metrics["best_checkpoint"], ckpt)
    done = run(installed, "digits-eval", f"ckpt_path={ckpt}", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = (workdir / "logs" / "eval").glob("*/*/eval.json")
    assert json.loads(result.read_text())["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-6)
    done = run(installed, "digits-predict", f"ckpt_path={ckpt}", "test_index=0:4", "--json", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert all(r["class"] in CLASSES for r in rows) and sum(r["class"] == r["true"] for r in rows) >= 3

    done = run(installed, "digits-train", "-m", *mine, "hparams_search=tiny_optuna", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    (summary,) = (workdir / "logs").glob("multiruns/*/optimization_results.yaml")
    assert "complete: 2" in summary.read_text()


def test_validation_knows_the_users_config_dir(installed, workdir):
    done = run(installed, "digits-train", "--config-dir", str(workdir / "myconf"), "experiment=nope", cwd=workdir)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: experiment='nope' is not allowed; expected one of [") and "'mine'" in line
