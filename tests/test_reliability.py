"""Crashes, preemption, reproducibility, distributed training and hostile input, with real processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, run_train, train_command
from digits.artifacts import load_checkpoint
from digits.errors import DigitsError
from digits.train import train

# ~1,500 steps an epoch: long enough to stop a run in the middle of one
SLOW_EPOCHS = ["model=mlp", "data.train_size=6000", "data.val_size=1000", "data.batch_size=4", "trainer.max_epochs=3"]
TIMING = {"train_seconds", "epoch_seconds", "samples_per_second", "best_checkpoint"}


def start_train(log_dir: Path, data_dir: Path, *overrides: str) -> subprocess.Popen:
    cmd = train_command(*overrides, log_dir=log_dir, data_dir=data_dir)
    return subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := sorted(root.glob(path_glob)):
            return found[0]
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    raise TimeoutError(path_glob)


def val_epochs(run_dir: Path) -> list[int]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.step for e in events.Scalars("val/acc")]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_ckpt_path_last_finishes_the_run(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    proc = start_train(log_dir, data_dir, *SLOW_EPOCHS)
    wait_for("runs/*/*/checkpoints/last.ckpt", log_dir, proc)  # epoch 0 is done
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = log_dir.glob("runs/*/*")
    assert not (run_dir / "metrics.json").exists()

    done = run_train(*SLOW_EPOCHS, "ckpt_path=last", log_dir=log_dir, data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(log_dir.glob("runs/*/*")) == [run_dir], "the resumed run went on in the same directory"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    steps = val_epochs(run_dir)
    assert len(steps) == 3 and len(set(steps)) == 3, steps  # no epoch logged twice, none missing


@pytest.mark.slow
def test_sigterm_saves_a_mid_epoch_checkpoint_that_resumes(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    proc = start_train(log_dir, data_dir, *SLOW_EPOCHS)
    wait_for("runs/*/*/checkpoints/epoch000.ckpt", log_dir, proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    (last,) = log_dir.glob("runs/*/*/checkpoints/last.ckpt")
    state = torch.load(last, map_location="cpu", weights_only=True)
    steps_per_epoch = 6000 // 4
    assert state["global_step"] % steps_per_epoch != 0, "saved in the middle of an epoch"
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["batches_trained"] == state["global_step"] % steps_per_epoch

    done = run_train(*SLOW_EPOCHS, "ckpt_path=last", log_dir=log_dir, data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics_file,) = log_dir.glob("runs/*/*/metrics.json")
    assert json.loads(metrics_file.read_text())["epochs"] == 3


def test_same_seed_same_metrics_other_seed_other_metrics(make_cfg):
    quick = ["model=mlp", "debug=quick", "logger=none"]
    a, b, c = (train(make_cfg(*quick, f"seed={s}")) for s in (7, 7, 8))
    assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    assert a["test_acc"] != c["test_acc"] or a["test_loss"] != c["test_loss"]


def test_every_run_saves_its_config_and_package_versions(tmp_path, data_dir):
    done = run_train("model=mlp", "debug=fast", log_dir=tmp_path / "logs", data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "logs").glob("runs/*/*")
    versions = json.loads((run_dir / "versions.json").read_text())
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert {"lightning", "hydra-core", "python"} <= versions.keys()
    assert (run_dir / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    done = run_train(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "model=mlp",
        "augment=shift",  # the floor below is for two epochs of DDP, not for learning MNIST's degradations
        "data.train_size=8000",
        "data.val_size=1000",
        "trainer.max_epochs=2",
        log_dir=log_dir,
        data_dir=data_dir,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics_file,) = log_dir.glob("runs/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["test_acc"] > 0.88
    assert metrics["train_size"] == 8000
    assert len(list(log_dir.glob("runs/*/*/checkpoints/*.ckpt"))) == 2  # best and last, from rank 0 alone


def test_divergence_stops_with_a_clear_message(tmp_path, data_dir):
    done = run_train(
        "model=mlp", "optimizer=sgd", "optimizer.lr=1e30", "debug=quick", log_dir=tmp_path / "logs", data_dir=data_dir
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "error: training diverged: the train loss became" in done.stderr


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory, data_dir) -> Path:
    log_dir = tmp_path_factory.mktemp("ckpt") / "logs"
    done = run_train("model=mlp", "debug=quick", "logger=none", log_dir=log_dir, data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    return next(log_dir.glob("runs/*/*/checkpoints/last.ckpt"))


def hostile(tmp_path: Path, data_dir: Path, *overrides: str) -> str:
    log_dir = tmp_path / "logs"
    done = run_train(*overrides, log_dir=log_dir, data_dir=data_dir)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not list(log_dir.glob("runs/*/*/metrics.json"))
    return done.stderr.strip().splitlines()[-1]


def test_checkpoint_of_another_model_is_refused(tmp_path, data_dir, mlp_checkpoint):
    line = hostile(tmp_path, data_dir, "model=cnn", f"ckpt_path={mlp_checkpoint}", "debug=quick")
    assert line.startswith("error: ckpt_path=") and "holds a different model" in line


def test_truncated_checkpoint_is_refused(tmp_path, data_dir, mlp_checkpoint):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(mlp_checkpoint.read_bytes()[:1000])
    line = hostile(tmp_path, data_dir, "model=mlp", f"ckpt_path={broken}", "debug=quick")
    assert "is not a readable checkpoint" in line


def test_a_file_that_is_no_checkpoint_is_named_so(tmp_path):
    image = tmp_path / "seven.png"  # an image given as ckpt_path: no pickle, and no pickled object in it
    Image.new("L", (28, 28)).save(image)
    with pytest.raises(DigitsError, match=r"is not a readable checkpoint \(not a file torch.save wrote\)$"):
        load_checkpoint(image)


def test_missing_checkpoint_is_refused(tmp_path, data_dir):
    line = hostile(tmp_path, data_dir, f"ckpt_path={tmp_path}/nothing.ckpt", "debug=quick")
    assert "expected an existing checkpoint file" in line


def test_config_with_a_yaml_syntax_error_is_one_line(tmp_path, data_dir):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text("# @package _global_\nmodel:\n  hidden_size: [64, 32\n")
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config-dir",
        str(tmp_path / "conf"),
        "experiment=mine",
        f"paths.log_dir={tmp_path}/logs",
        f"paths.data_dir={data_dir}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "mine.yaml, line 4: not valid YAML" in done.stderr


def test_unwritable_log_dir_is_one_line(tmp_path, data_dir):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    done = run_train("debug=fast", log_dir=blocker / "logs", data_dir=data_dir)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {blocker}/logs")


@pytest.fixture
def tiny_filesystem(tmp_path):
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_full_log_dir_is_one_line_and_leaves_nothing_finished(tmp_path, data_dir, tiny_filesystem):
    done = run_train("model=mlp", "model.hidden_size=512", "debug=quick", log_dir=tiny_filesystem, data_dir=data_dir)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "No space left on device" in done.stderr.strip().splitlines()[-1]
    assert not list(tiny_filesystem.glob("runs/*/*/metrics.json"))


def test_checkpoint_of_another_dataset_is_refused(tmp_path, data_dir, mlp_checkpoint):
    line = hostile(tmp_path, data_dir, "model=mlp", "data=fashion", f"ckpt_path={mlp_checkpoint}", "debug=quick")
    assert "was trained on MNIST; this run's data is FashionMNIST" in line
