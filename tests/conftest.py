"""Shared fixtures: the real MNIST / Fashion-MNIST files, composed configs, subprocess runs of train.py, events."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from digits.config import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]  # the checkout
SHARED_DATA = ROOT.parent / "shared" / "data"
DATASETS = ("MNIST", "FashionMNIST")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The project's data dir, holding the official .gz files (copied from ../shared/data when missing)."""
    target = Path(os.environ.get("DIGITS_DATA_DIR", ROOT / "data"))
    for name in DATASETS:
        raw = target / name / "raw"
        if not any(raw.glob("*.gz")):
            if not (SHARED_DATA / name / "raw").is_dir():
                pytest.fail(f"no {name} files in {raw} and no {SHARED_DATA} to copy them from")
            shutil.copytree(SHARED_DATA / name / "raw", raw, dirs_exist_ok=True)
            for f in raw.iterdir():
                f.chmod(0o644)
    return target


@pytest.fixture
def make_cfg(data_dir: Path, tmp_path: Path):
    """Compose conf/train.yaml with overrides, pointed at the test data and a temporary log root."""

    def _make(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            base = [f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path}"]
            cfg = compose("train", overrides=[*base, *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
        return cfg

    yield _make
    GlobalHydra.instance().clear()


def train_command(*overrides: str, log_dir: Path, data_dir: Path) -> list[str]:
    """`python train.py` with the test's log and data dirs; `-m` and `--flags` go first, as argparse wants."""
    flags = [o for o in overrides if o.startswith("-")]
    rest = [o for o in overrides if not o.startswith("-")]
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *flags,
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={data_dir}",
        *rest,
    ]


def run_train(
    *overrides: str, log_dir: Path, data_dir: Path, timeout: int = 600, python_warnings: str = "ignore"
) -> subprocess.CompletedProcess:
    """`python train.py ...` in a subprocess from a foreign working directory, as a user would."""
    cmd = train_command(*overrides, log_dir=log_dir, data_dir=data_dir)
    env = {**os.environ, "HYDRA_FULL_ERROR": "", "PYTHONWARNINGS": python_warnings}
    return subprocess.run(cmd, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=timeout, env=env)


def read_events(log_dir: Path) -> EventAccumulator:
    """Every scalar, image and tensor of the TensorBoard event files in `log_dir`, read back by TensorBoard."""
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def assert_real_png(path: Path) -> None:
    """A valid PNG of a readable size that is not a blank canvas."""
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200
        assert len(set(image.convert("L").getdata())) > 10
