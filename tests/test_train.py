import csv
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import read_events, run_train
from digits.robustness import CORRUPTIONS
from digits.train import train


@pytest.mark.parametrize("data", ["mnist", "fashion"])
@pytest.mark.parametrize("model", ["mlp", "cnn", "cnn_bn"])
def test_fast_dev_run_every_model_and_dataset(make_cfg, model, data):
    metrics = train(make_cfg(f"model={model}", f"data={data}", "debug=fast"))
    # one training step from the initial weights on normalised images: near-uniform predictions over the
    # 10 classes (unnormalised pixels, wrong labels or a wrong class count land far from ln 10)
    assert metrics["test_loss"] == pytest.approx(math.log(10), abs=0.5)
    assert metrics["test_mse"] == pytest.approx(0.09, abs=0.02)


def test_torch_dataloader_path_trains(make_cfg):
    augmented = ("data.translate=2", "data.rotate=10", "data.zoom=0.1")
    metrics = train(
        make_cfg("model=mlp", "augment=shift", "data.loader=torch", "debug=quick", "logger=none", *augmented)
    )
    assert metrics["test_acc"] > 0.7 and metrics["train_size"] == 2000  # untrained: 0.1


def test_cli_run_writes_metrics_checkpoints_and_tensorboard(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    done = run_train(
        "model=cnn",
        "data=fashion",
        "debug=quick",
        "trainer.max_epochs=2",
        "cpu_bf16=false",
        log_dir=log_dir,
        data_dir=data_dir,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics_file,) = log_dir.glob("runs/*/*/metrics.json")
    run_dir = metrics_file.parent
    # the command line's keys first (TensorBoard cuts names at the end), then the rest of what the run is
    # (a top-level key by its name and value, a group by its choice)
    assert run_dir.parent.name == "fashion_cnn_ep2_cpu_bf16-False_h120-84_k5_bs128_adam0.002_seed0"
    metrics = json.loads(metrics_file.read_text())
    assert metrics["params"] == 44_426 and metrics["epochs"] == 2 and metrics["data"] == "FashionMNIST"
    assert metrics["test_acc"] > 0.5, metrics
    assert metrics["test_error_pct"] == pytest.approx(100 * (1 - metrics["test_acc"]))
    assert {"device", "precision", "train_seconds", "test_loss", "best_val_acc"} <= metrics.keys()
    assert metrics["precision"] == "32-true" or metrics["device"].startswith("cuda")
    robust = metrics["robustness"]["test"]  # the suite on the tested checkpoint; no font digits for clothes
    assert set(robust) == {*CORRUPTIONS, "mean"} and robust["mean"] == pytest.approx(
        sum(robust[name] for name in CORRUPTIONS) / len(CORRUPTIONS)
    )
    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert {"last.ckpt", Path(metrics["best_checkpoint"]).name} == checkpoints
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert "test accuracy" in done.stdout + done.stderr

    events = read_events(run_dir)
    scalars = events.Tags()["scalars"]
    assert {"val/acc", "val/loss", "val/acc_best", "train/loss", "train/acc", "test/acc", "test/mse"} <= set(scalars)
    assert events.Scalars("robust/mean")[-1].value == pytest.approx(robust["mean"], abs=1e-6)
    assert len(events.Scalars("val/acc")) == 2
    assert events.Scalars("test/acc")[-1].value == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert {"test/confusion_matrix", "test/misclassified"} <= set(events.Tags()["images"])

    assert [s.step for s in events.Scalars("val/acc")] == [0, 1]  # on the epoch axis, not the batch's
    assert [s.step for s in events.Scalars("train/lr")] == [0, 1] and "epoch" not in scalars
    assert not [tag for tag in scalars if tag.startswith("hp/")], "no copies of the scalars under hp/"

    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" not in hparams, "TensorBoard builds the experiment from every run's session"
    session = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["model"].string_value == "cnn"
    assert session.hparams["data.batch_size"].number_value == 128
    assert session.hparams["trainer.max_epochs"].number_value == 2 and "max_epochs" not in session.hparams
    assert session.hparams["model.hidden_size"].string_value == "[120, 84]"


def test_a_runs_console_shows_each_notice_once_and_no_warning_that_does_not_apply(tmp_path, data_dir):
    # bf16 by hand, so that the model summary's warning about it would show on any CPU
    done = run_train("model=cnn", "debug=quick", "trainer.precision=bf16-mixed", "logger=none",
                     log_dir=tmp_path / "logs", data_dir=data_dir, python_warnings="default")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    console = (done.stdout + done.stderr).splitlines()
    assert not [line for line in console if re.search(r"\.py:\d+: |Warning", line)], console  # a warning's origin
    assert sum("GPU available" in line for line in console) == 1, console  # not by Lightning and Hydra both
    assert not [line for line in console if "Tip:" in line], console  # Lightning's cloud advertisement
    (log,) = (tmp_path / "logs").glob("runs/*/*/train.log")
    assert "GPU available" in log.read_text() and "Tip:" not in log.read_text()


def test_csv_logger_beside_tensorboard_gets_the_hparams_and_final_metrics(make_cfg, tmp_path):
    metrics = train(make_cfg("model=mlp", "debug=quick", "logger=many"))
    run_dir = tmp_path / "run"
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["model.hidden_size"] == "128" and hparams["params"] == metrics["params"]
    with open(run_dir / "metrics.csv") as f:
        final = [row for row in csv.DictReader(f) if row["test/acc"]]
    assert len(final) == 1 and float(final[0]["test/acc"]) == pytest.approx(metrics["test_acc"])
    assert float(final[0]["step"]) == 1  # tested after its one epoch


@pytest.mark.slow
def test_mlp_reaches_an_accuracy_floor_on_a_fixed_seed(make_cfg):
    cfg = make_cfg(
        "model=mlp", "augment=none", "data.train_size=5000", "data.val_size=1000", "trainer.max_epochs=2", "seed=0"
    )
    metrics = train(cfg)
    assert metrics["test_acc"] > 0.90, metrics


BAD_INPUTS = {
    "model=foo": "error: model='foo' is not allowed; expected one of ['cnn', 'cnn_bn', 'mlp']",
    "data.batch_size=0": "data.batch_size=0 is not allowed; expected an integer ≥ 1",
    "model.hidden_size=-1": "model.hidden_size=-1 is not allowed; expected a positive integer",
    "model.kernel_size=31": "model.kernel_size=31 is too large; expected 1 to 9",
    "data.val_size=70000": "data.val_size=70000 is not allowed; expected a count from 1 to 59999",
    "optimizer=lbfgs": "error: optimizer='lbfgs' is not allowed; expected one of ['adadelta',",
    "data.flip=sideways": "data.flip='sideways' is not allowed; expected true or false",
    "cpu_bf16=sometimes": "error: cpu_bf16='sometimes' is not allowed; expected true, false or auto",
    "data.zoom=0.9": "data.zoom=0.9 is not allowed; expected a scale range from 0 (off) to 0.5",
    "callbacks.robustness.size=0": "error: callbacks.robustness.size=0 is not allowed; expected a number of images ≥ 1",
    "data=cifar,mnist": "error: data='cifar' is not allowed; expected one of ['fashion', 'mnist']",
}


@pytest.mark.parametrize("override", BAD_INPUTS)
def test_bad_input_is_one_clear_line(tmp_path, data_dir, override):
    log_dir = tmp_path / "logs"
    done = run_train(override, log_dir=log_dir, data_dir=data_dir)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert BAD_INPUTS[override] in done.stderr
    assert not list(log_dir.glob("runs/*")), "a failed run left its directory behind"


@pytest.mark.parametrize("broken", ["corrupt", "missing"])
def test_broken_data_is_one_clear_line(tmp_path, data_dir, broken):
    bad_data = tmp_path / "data"
    raw = bad_data / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (data_dir / "MNIST" / "raw").glob("*.gz"):
        (raw / f.name).write_bytes(f.read_bytes())
    target = raw / "train-labels-idx1-ubyte.gz"
    if broken == "corrupt":
        target.write_bytes(target.read_bytes()[:-10])
    else:
        target.unlink()
    done = run_train("debug=fast", log_dir=tmp_path / "logs", data_dir=bad_data)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "train-labels-idx1-ubyte.gz" in last, done.stderr[-2000:]
    assert not list((tmp_path / "logs").glob("runs/*"))
