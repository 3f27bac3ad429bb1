"""Runs and checkpoints you can trust: safe loading, self-describing checkpoints, one run per dir, one-line
mistakes that leave nothing behind. Real subprocesses wherever an entry point is the subject."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, run_train, train_command
from digits.artifacts import RECORD, load_checkpoint
from digits.config import check_run, differing_settings, run_settings
from digits.errors import DigitsError
from digits.train import train

QUICK = ("model=mlp", "debug=quick", "logger=none")


def run_script(script: str, *args: str, log_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / script), *args, f"paths.log_dir={log_dir}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The process failed with a single `error: ...` line on stderr and no traceback."""
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr and "Error executing job" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """A finished quick MLP run: (its last.ckpt, its log root)."""
    log_dir = tmp_path_factory.mktemp("trust") / "logs"
    done = run_train(*QUICK, "scheduler=onecycle", log_dir=log_dir, data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    (ckpt,) = log_dir.glob("runs/*/*/checkpoints/last.ckpt")
    return ckpt, log_dir


class Payload:
    """Unpickling this runs a shell command that creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "payload_ran"
    yield path
    assert not path.exists(), "a pickled payload in a checkpoint was executed"


def hidden_payload(ckpt: Path, marker: Path, target: Path) -> Path:
    """A real checkpoint with one extra key whose value runs code when unpickled."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["extra"] = Payload(marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target


def test_our_checkpoints_hold_plain_data_with_their_config(trained):
    ckpt, _ = trained
    checkpoint = load_checkpoint(ckpt)  # weights_only=True: fails on any object outside torch's allow-list
    record = checkpoint[RECORD]
    assert record["dataset"] == "MNIST"
    assert record["config"]["model"]["_target_"] == "digits.models.MLP"
    assert record["config"]["scheduler"]["factory"]["_target_"] == "torch.optim.lr_scheduler.OneCycleLR"
    assert record["data"]["classes"][7] == "7 - seven" and record["data"]["mean"] == pytest.approx(0.1307)
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.parametrize("scheduler", ["cosine", "step"])
def test_checkpoints_of_other_recipes_load_safely(make_cfg, scheduler):
    cfg = make_cfg(*QUICK, "optimizer=sgd", f"scheduler={scheduler}", "data.train_size=500")
    metrics = train(cfg)
    checkpoint = load_checkpoint(metrics["best_checkpoint"])
    assert checkpoint["lr_schedulers"] and checkpoint["optimizer_states"]


def test_a_standalone_pickle_is_refused_by_train(tmp_path, data_dir, marker):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Payload(marker)}, evil)
    done = run_train(*QUICK, f"ckpt_path={evil}", log_dir=tmp_path / "logs", data_dir=data_dir)
    line = one_line_error(done)
    assert "is refused: it holds a pickled posix.system" in line and "nothing in it was run" in line
    assert not list((tmp_path / "logs").glob("runs/*/*"))


def test_a_payload_planted_as_last_ckpt_is_refused_by_resume(trained, tmp_path, data_dir, marker):
    ckpt, _ = trained
    run = tmp_path / "logs" / "runs" / ckpt.parents[2].name / "2026-01-01_00-00-00_p1"
    shutil.copytree(ckpt.parents[1], run)
    (run / "metrics.json").unlink()  # unfinished: what ckpt_path=last looks for
    hidden_payload(ckpt, marker, run / "checkpoints" / "last.ckpt")
    done = run_train(*QUICK, "scheduler=onecycle", "ckpt_path=last", log_dir=tmp_path / "logs", data_dir=data_dir)
    assert "is refused" in one_line_error(done)


@pytest.mark.parametrize("script", ["eval.py", "predict.py"])
def test_a_payload_hidden_in_a_real_run_is_refused_by_eval_and_predict(trained, tmp_path, marker, script):
    ckpt, _ = trained
    run = tmp_path / "run"
    shutil.copytree(ckpt.parents[1], run)
    evil = hidden_payload(ckpt, marker, run / "checkpoints" / "last.ckpt")
    extra = ["test_index=0:3"] if script == "predict.py" else []
    done = run_script(script, f"ckpt_path={evil}", *extra, log_dir=tmp_path / "logs")
    assert "is refused: it holds a pickled posix.system" in one_line_error(done)
    assert not (tmp_path / "logs" / "eval").exists(), "a failed eval leaves no eval dir"


@pytest.mark.parametrize(
    ("script", "key", "node"),
    [
        ("predict.py", "model", {"_target_": "pathlib.Path.unlink", "_args_": ["VICTIM"]}),
        ("eval.py", "optimizer", {"_target_": "torch.load", "f": "VICTIM", "weights_only": False}),
        ("predict.py", "model", {"_target_": "digits.models.MLP", "x": {"_target_": "os.remove", "path": "VICTIM"}}),
        ("eval.py", "data", {"_target_": "torch.nn.Linear", "in_features": 1, "out_features": 1}),
        ("predict.py", "data", {"_target_": "torch.nn.Linear", "in_features": 1, "out_features": 1}),
    ],
)
def test_a_checkpoint_whose_config_names_a_function_is_refused(trained, tmp_path, script, key, node):
    """A checkpoint is plain data, but its config says what eval and predict build: one that names a function
    (here deleting or unpickling a file), nested or not, or a class of another kind builds nothing."""
    ckpt, _ = trained
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint[RECORD]["config"][key] = json.loads(json.dumps(node).replace("VICTIM", str(victim)))
    hostile = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, hostile)
    extra = ["test_index=0:3"] if script == "predict.py" else []
    line = one_line_error(run_script(script, f"ckpt_path={hostile}", *extra, log_dir=tmp_path / "logs"))
    assert f"is refused: its config builds {key} with " in line and "nothing was built from it" in line
    assert victim.read_text() == "still here"


@pytest.mark.parametrize("script", ["predict.py", "eval.py"])
def test_a_checkpoint_that_names_a_huge_net_is_refused_before_building_it(trained, tmp_path, script):
    """A net of 10^8 hidden units (313 GB of weights) named by a small checkpoint's config: compared on the meta
    device, it is refused in one line instead of being allocated first."""
    ckpt, _ = trained
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint[RECORD]["config"]["model"]["hidden_size"] = 10**8
    hostile = tmp_path / "huge.ckpt"
    torch.save(checkpoint, hostile)
    extra = ["test_index=0:3"] if script == "predict.py" else []
    line = one_line_error(run_script(script, f"ckpt_path={hostile}", *extra, log_dir=tmp_path / "logs"))
    assert line.startswith(f"error: ckpt_path='{hostile}' holds a different model than its config's model")
    assert "(10, 100000000)" in line


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        (
            "data",
            "classes",
            "0123456789",
            "its data.classes='0123456789' is not allowed; expected a list of two or more",
        ),
        ("data", "mean", 7.0, "its data.mean=7.0 is not allowed; expected the pixels' mean in [0, 1]"),
        ("config", "frame_box", 99, "its data.frame_box=99 is not allowed; expected a side from 1 to 28 pixels"),
        ("data", "classes", ["a", "b", "c"], "is refused: its model scores 10 classes, its data has 3"),
    ],
)
def test_a_checkpoint_whose_record_misdescribes_its_images_is_refused_by_predict(
    trained, tmp_path, where, key, value, message
):
    """predict.py takes the classes, normalisation and framing from the checkpoint's record: checked, as all of it."""
    ckpt, _ = trained
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    record = checkpoint[RECORD]
    (record["data"] if where == "data" else record["config"]["data"])[key] = value
    hostile = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, hostile)
    image = tmp_path / "blot.png"
    Image.fromarray(np.pad(np.full((8, 4), 255, np.uint8), 10)).save(image)
    line = one_line_error(run_script("predict.py", f"ckpt_path={hostile}", str(image), log_dir=tmp_path / "logs"))
    assert message in line


def test_a_checkpoint_copied_alone_is_evaluated_and_predicted(trained, tmp_path):
    ckpt, _ = trained
    alone = tmp_path / "elsewhere" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(ckpt, alone)
    done = run_script("eval.py", f"ckpt_path={alone}", log_dir=tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = (tmp_path / "logs").glob("eval/model/*/eval.json")  # named after the checkpoint file
    assert json.loads(result.read_text())["test_size"] == 10_000
    done = run_script("predict.py", f"ckpt_path={alone}", "test_index=0:3", "--json", log_dir=tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert [r["true"] for r in rows] == ["7 - seven", "2 - two", "1 - one"]


def test_an_old_checkpoint_without_its_record_still_works_in_its_run_folder(trained, tmp_path):
    ckpt, _ = trained
    run = tmp_path / "old_run"
    shutil.copytree(ckpt.parents[1], run)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["dataset"] = checkpoint.pop(RECORD)["dataset"]  # as checkpoints were written before the record
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    done = run_script("predict.py", f"ckpt_path={run}/checkpoints/last.ckpt", "test_index=0", log_dir=tmp_path)
    assert done.returncode == 0 and "7 - seven" in done.stdout, done.stderr[-2000:]
    alone = tmp_path / "alone.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", alone)
    line = one_line_error(run_script("predict.py", f"ckpt_path={alone}", "test_index=0", log_dir=tmp_path))
    assert "carries no config" in line


def test_two_identical_runs_started_together_get_their_own_dirs(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    cmd = train_command(*QUICK, "data.train_size=500", log_dir=log_dir, data_dir=data_dir)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    runs = sorted(log_dir.glob("runs/*/*"))
    assert len(runs) == 2
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert Path(metrics["best_checkpoint"]).parents[1] == run
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch000.ckpt", "last.ckpt"]


def unfinished_copy(ckpt: Path, log_dir: Path) -> Path:
    """The trained run, copied under `log_dir` as if it had been killed after its last checkpoint."""
    run = log_dir / "runs" / ckpt.parents[2].name / "2026-01-01_00-00-00_p1"
    shutil.copytree(ckpt.parents[1], run)
    (run / "metrics.json").unlink()
    return run


def test_resume_with_a_changed_setting_names_it_and_touches_nothing(trained, tmp_path, data_dir):
    """A key the command line gives is in the run's name: changing it names another run. A setting that
    changed outside the command line (a preset edited since) finds the old run and is refused."""
    ckpt, _ = trained
    run = unfinished_copy(ckpt, tmp_path / "logs")
    for path in (run / "checkpoints").glob("*.ckpt"):  # as if the preset had said tanh when the run started
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["digits"]["config"]["model"]["activation"] = "tanh"
        torch.save(checkpoint, path)
    saved = (run / ".hydra" / "config.yaml").read_text()
    done = run_train(*QUICK, "scheduler=onecycle", "ckpt_path=last", log_dir=tmp_path / "logs", data_dir=data_dir)
    line = one_line_error(done)
    assert f"ckpt_path=last found {run}" in line and "model.activation: tanh → relu" in line
    assert (run / ".hydra" / "config.yaml").read_text() == saved
    assert len(list((tmp_path / "logs").glob("runs/*/*"))) == 1

    changed = run_train(
        *QUICK,
        "scheduler=onecycle",
        "model.activation=elu",
        "ckpt_path=last",
        log_dir=tmp_path / "logs",
        data_dir=data_dir,
    )
    assert changed.returncode == 0, changed.stderr[-2000:]
    (new,) = set((tmp_path / "logs").glob("runs/*/*")) - {run}
    assert (
        new.parent.name.startswith("mlp_activation-elu_onecycle_")
        and (run / ".hydra" / "config.yaml").read_text() == saved
    )


def test_resume_with_the_same_settings_goes_on_in_the_same_dir(trained, tmp_path, data_dir):
    ckpt, _ = trained
    run = unfinished_copy(ckpt, tmp_path / "logs")
    done = run_train(*QUICK, "scheduler=onecycle", "ckpt_path=last", log_dir=tmp_path / "logs", data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "logs").glob("runs/*/*")) == [run] and (run / "metrics.json").exists()


def test_a_run_whose_checkpoint_was_lost_restarts_in_a_new_dir(trained, tmp_path, data_dir):
    ckpt, _ = trained
    run = unfinished_copy(ckpt, tmp_path / "logs")
    (run / "checkpoints" / "last.ckpt").unlink()  # deleted after it was found corrupt
    done = run_train(*QUICK, "scheduler=onecycle", "ckpt_path=last", log_dir=tmp_path / "logs", data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted((tmp_path / "logs").glob("runs/*/*"))
    assert len(runs) == 2 and not (run / "metrics.json").exists() and (runs[1] / "metrics.json").exists()


def test_run_settings_ignore_where_the_data_lives(make_cfg, tmp_path):
    a = run_settings(make_cfg("model=mlp"))
    b = run_settings(make_cfg("model=mlp", f"paths.data_dir={tmp_path}", "data.num_workers=2"))
    c = run_settings(make_cfg("model=mlp", "data.translate=3", "optimizer=sgd"))
    assert differing_settings(a, b) == []
    assert differing_settings(a, c) == [
        "data.translate: 2 → 3",
        "optimizer._target_: torch.optim.Adam → torch.optim.SGD",
        "optimizer.lr: 0.002 → 0.01",
        "optimizer.momentum: (absent) → 0.9",
        "optimizer.nesterov: (absent) → False",
    ]
    assert run_settings(OmegaConf.create(OmegaConf.to_container(make_cfg("model=mlp"), resolve=True))) == a


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=1.5", "trainer.max_epochs=1.5 is not allowed; expected an integer ≥ 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is not allowed"),
        ("trainer.max_epochs=-1", "trainer.max_epochs=-1 is not allowed"),
        ("optimizer.lr=-1", "optimizer.lr=-1 is not allowed; expected a finite number > 0"),
        ("optimizer.lr=0", "optimizer.lr=0 is not allowed"),
        ("optimizer.lr=nan", "optimizer.lr=nan is not allowed"),
        ("seed=-1", "seed=-1 is not allowed; expected an integer from 0 to 2**32 - 1"),
        ("seed=4294967296", "seed=4294967296 is not allowed"),
        ("seed=abc", "seed='abc' is not allowed"),
        ("test=maybe", "test='maybe' is not allowed; expected true or false"),
        ("trainer.devices=64", "trainer.devices=64 is not allowed; expected 'auto' or 1 to"),
        ("trainer.devices=[0,5000]", "trainer.devices=[0, 5000] is not allowed"),
        ("+trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=1.0 is not allowed; expected it unset or 0"),
        ("+trainer.accumulate_grad_batches=4", "trainer.accumulate_grad_batches=4 is not allowed"),
    ],
)
def test_values_lightning_would_take_badly_are_refused(make_cfg, override, message):
    with pytest.raises(DigitsError, match="^" + message.replace("*", r"\*").replace("[", r"\[")):
        check_run(make_cfg("model=mlp", override))


@pytest.mark.parametrize(
    "overrides",
    [
        ("optimizer.lr=nan",),
        ("model.hidden_size=[]",),
        ("trainer=ddp", "trainer.devices=64"),
        ("paths.data_dir=/etc/hostname",),
    ],
)
def test_mistakes_are_one_line_and_leave_no_run_dir(tmp_path, data_dir, overrides):
    done = run_train(*QUICK, *overrides, log_dir=tmp_path / "logs", data_dir=data_dir)
    one_line_error(done)
    assert not list((tmp_path / "logs").glob("runs/*")), "a refused run leaves no dir behind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_trainer_gpu_without_a_gpu_is_one_line_and_leaves_no_run_dir(tmp_path, data_dir):
    done = run_train(*QUICK, "trainer=gpu", log_dir=tmp_path / "logs", data_dir=data_dir)
    assert "this machine has no CUDA GPU" in one_line_error(done)
    assert not list((tmp_path / "logs").glob("runs/*"))


def test_a_corrupt_extracted_data_file_is_one_line(tmp_path, data_dir):
    raw = tmp_path / "data" / "MNIST" / "raw"
    shutil.copytree(data_dir / "MNIST" / "raw", raw)
    extracted = raw / "train-images-idx3-ubyte"
    if not extracted.exists():
        run_train(*QUICK, "debug=fast", log_dir=tmp_path / "first", data_dir=tmp_path / "data")
    with open(extracted, "r+b") as f:
        f.write(b"JUNK")  # a bad magic number
    done = run_train(*QUICK, log_dir=tmp_path / "logs", data_dir=tmp_path / "data")
    line = one_line_error(done)
    assert f"the extracted MNIST files in {raw} cannot be read" in line and "keep the .gz files" in line
    assert not list((tmp_path / "logs").glob("runs/*"))


def test_report_skips_an_unreadable_run_and_refuses_an_empty_dir(trained, tmp_path):
    ckpt, _ = trained
    root = tmp_path / "logs"
    good, empty, corrupt = (root / "runs" / name for name in ("good", "empty", "corrupt"))
    for run in (good, empty, corrupt):
        shutil.copytree(ckpt.parents[1], run)
    (empty / "metrics.json").write_text("")
    (corrupt / "metrics.json").write_text('{"test_acc": 0.5')
    report = [sys.executable, str(ROOT / "scripts" / "report.py"), str(root)]
    done = subprocess.run(report, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for run in (empty, corrupt):
        assert f"warning: skipping {run}: unreadable" in done.stderr
    rows = (root / "report" / "runs.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("runs/good,")

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    done = subprocess.run([*report[:2], str(nothing)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stderr.startswith("error: no finished run")
    assert list(nothing.iterdir()) == []
