"""Optuna sweeps end to end: real Hydra multiruns in subprocesses, real storages, tiny data subsets."""

import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import ROOT, assert_real_png, read_events, train_command

TINY = ["model=mlp", "data.train_size=256", "data.val_size=256", "trainer.max_epochs=1"]


def sweep_cmd(log_dir: Path, data_dir: Path, *overrides: str) -> list[str]:
    quiet = [] if any(o.startswith("logger=") for o in overrides) else ["logger=none"]
    return train_command(
        "-m", "hparams_search=mlp_optuna", *TINY, *quiet, *overrides, log_dir=log_dir, data_dir=data_dir
    )


def run_sweep(log_dir: Path, data_dir: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = sweep_cmd(log_dir, data_dir, *overrides)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=log_dir.parent)


def load_study(log_dir: Path, name: str = "mlp_optuna_mnist", storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{log_dir}/sweeps/{name}/optuna.db")


def states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials():
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def results(log_dir: Path, name: str = "mlp_optuna_mnist") -> dict:
    return yaml.safe_load((log_dir / "sweeps" / name / "optimization_results.yaml").read_text())


def test_tpe_sweep_runs_every_trial_with_its_params(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    done = run_sweep(log_dir, data_dir, "hydra.sweeper.n_trials=4", "logger=tensorboard")
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_study(log_dir)
    assert states(study) == {"COMPLETE": 4}
    for trial in study.trials:
        (run_dir,) = log_dir.glob(f"runs/*/*_trial{trial.number}")
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        assert cfg.model.hidden_size == trial.params["model.hidden_size"]
        assert cfg.data.batch_size == trial.params["data.batch_size"]
        assert cfg.optimizer.weight_decay == pytest.approx(trial.params["optimizer.weight_decay"])
        assert cfg.trainer.max_epochs == 1 and cfg.optuna.trial == trial.number
        assert trial.value == pytest.approx(yaml.safe_load((run_dir / "metrics.json").read_text())["best_val_acc"])
        events = EventAccumulator(str(run_dir))
        events.Reload()
        start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
        assert hparams["optuna.trial"].string_value == f"mlp_optuna_mnist#{trial.number}"
        assert trial.user_attrs["run_dir"] == str(run_dir)
        assert trial.user_attrs["tensorboard_run"] == str(run_dir.relative_to(log_dir))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert "test_acc" not in metrics and "test_acc" not in trial.user_attrs  # chosen on validation: no test read
        assert trial.user_attrs["val_robust"] == metrics["robustness"]["val"]["mean"]
        assert trial.user_attrs["val_fonts"] == metrics["robustness"]["val"]["fonts"]
        assert trial.user_attrs["model"] == "mlp" and trial.user_attrs["trainer.max_epochs"] == 1
        assert "model.hidden_size" not in trial.user_attrs  # searched: a param, not a fixed setting
        assert "model.channels" not in trial.user_attrs  # an MLP has no channels: no setting
    assert study.metric_names == ["val/acc_best"]
    assert study.trials[0].distributions["data.batch_size"].choices == (32, 64, 128, 256, 512)  # numbers, in order
    summary = results(log_dir)
    assert (summary["complete"], summary["pruned"], summary["failed"]) == (4, 0, 0)
    assert summary["best_value"] == pytest.approx(study.best_value)
    assert summary["best_overrides"].split().count("model=mlp") == 1
    assert f"model.hidden_size={study.best_params['model.hidden_size']}" in summary["best_overrides"]
    best_run = Path(study.best_trial.user_attrs["run_dir"])
    assert Path(summary["best_checkpoint"]).parent == best_run / "checkpoints"
    assert f"python eval.py ckpt_path={summary['best_checkpoint']}" in done.stdout + done.stderr

    sweep_dir = log_dir / "sweeps" / "mlp_optuna_mnist"
    report = [sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep_dir)]
    done = subprocess.run(report, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for kind in ("history", "importances", "slice_model.hidden_size", "slice_data.batch_size"):
        assert_real_png(sweep_dir / "report" / f"optuna_mlp_optuna_mnist_{kind}.png")
    with open(sweep_dir / "report" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {(r["test_acc_pct"], r["test_error_pct"]) for r in rows} == {("-", "-")}
    assert sorted(float(r["best_val_acc_pct"]) for r in rows)[-1] == pytest.approx(100 * study.best_value, abs=1e-3)
    assert {"optuna/mlp_optuna_mnist_history", "optuna/mlp_optuna_mnist_importances"} <= set(
        read_events(sweep_dir / "report").Tags()["images"]
    )


def test_killed_sweep_resumes_to_exactly_n_trials(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    beat = "hydra.sweeper.heartbeat_interval=1"  # the killed sweep's trial is stale 2 s after its last beat
    cmd = sweep_cmd(log_dir, data_dir, "hydra.sweeper.n_trials=5", "trainer.max_epochs=2", beat)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        db = log_dir / "sweeps" / "mlp_optuna_mnist" / "optuna.db"
        try:
            if db.exists() and states(load_study(log_dir)).get("COMPLETE", 0) >= 2:
                break
        except (KeyError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            pass  # no study (or tables) yet, or this watcher and the sweep stamped the tables' version at once
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = states(load_study(log_dir))
    assert 2 <= before.get("COMPLETE", 0) < 5, before

    done = run_sweep(log_dir, data_dir, "hydra.sweeper.n_trials=5", "trainer.max_epochs=2", beat)
    assert done.returncode == 0, done.stderr[-3000:]
    after = load_study(log_dir)
    assert states(after).get("COMPLETE") == 5
    # a trial the kill interrupted is failed without a reason, not counted, and run again with its params
    interrupted = [t for t in after.trials if t.state != TrialState.COMPLETE]
    assert all("fail_reason" not in t.user_attrs for t in interrupted)
    retried = {t.system_attrs.get("failed_trial") for t in after.trials if t.state == TrialState.COMPLETE}
    assert {t.number for t in interrupted} <= retried
    assert results(log_dir)["complete"] == 5


def concurrent_sweeps(log_dir: Path, data_dir: Path, *overrides: str) -> list[subprocess.CompletedProcess]:
    cmd = sweep_cmd(log_dir, data_dir, "hydra.sweeper.n_trials=4", *overrides)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    return [subprocess.CompletedProcess(cmd, p.returncode, o, e) for p, (o, e) in zip(procs, outs, strict=True)]


def assert_shared_study_ran_exactly(study: optuna.Study, n: int) -> None:
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n
    assert len({t.number for t in complete}) == n
    # every other trial is a surplus ask that never ran: failed without a reason
    assert all("fail_reason" not in t.user_attrs for t in study.trials if t.state != TrialState.COMPLETE)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_sweep_processes_share_one_study(tmp_path, data_dir, kind):
    log_dir = tmp_path / "logs"
    storage = {"sqlite": f"sqlite:///{tmp_path}/shared.db", "journal": f"journal:{tmp_path}/shared.log"}[kind]
    for done in concurrent_sweeps(log_dir, data_dir, f"hydra.sweeper.storage='{storage}'"):
        assert done.returncode == 0, done.stderr[-3000:]
    optuna_storage = (
        storage
        if kind == "sqlite"
        else optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(storage.removeprefix("journal:"))
        )
    )
    assert_shared_study_ran_exactly(load_study(log_dir, storage=optuna_storage), 4)


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL server from Debian's packages, on a loopback port."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    bindir = Path(bins[-1]).parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="digits-pg-"))
    if as_postgres:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(
        [*as_postgres, bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust"], check=True, capture_output=True
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_postgres, bindir / "pg_ctl", "-D", data, "-o", options, "-l", root / "log", "-w", "start"],
        check=True,
        capture_output=True,
    )
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_postgres, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def test_two_sweep_processes_on_postgresql(tmp_path, data_dir, postgres_url):
    log_dir = tmp_path / "logs"
    for done in concurrent_sweeps(log_dir, data_dir, f"hydra.sweeper.storage='{postgres_url}'"):
        assert done.returncode == 0, done.stderr[-3000:]
    assert_shared_study_ran_exactly(load_study(log_dir, storage=postgres_url), 4)


def test_pruner_stops_hopeless_trials(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    done = run_sweep(
        log_dir,
        data_dir,
        "hydra.sweeper.n_trials=2",
        "trainer.max_epochs=5",
        "hydra/sweeper/pruner=threshold",
        "hydra.sweeper.pruner.lower=0.999",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_study(log_dir)
    assert states(study) == {"PRUNED": 2}
    assert all(list(t.intermediate_values) == [0] for t in study.trials)  # stopped after its first epoch
    assert results(log_dir)["pruned"] == 2


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    done = run_sweep(
        log_dir,
        data_dir,
        "hydra.sweeper.params=null",
        "hydra/sweeper/sampler=grid",
        "optimizer=sgd",
        "model.hidden_size=choice(-1,16)",
        "optimizer.lr=choice(0.01,1e30)",
        "hydra.sweeper.n_trials=4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_study(log_dir)
    assert states(study) == {"COMPLETE": 1, "FAIL": 3}
    reasons = sorted(t.user_attrs["fail_reason"] for t in study.trials if t.state == TrialState.FAIL)
    assert sum("model.hidden_size=-1" in r for r in reasons) == 2
    assert sum("diverged" in r for r in reasons) == 1
    assert results(log_dir)["failed"] == 3
    assert "3 failed of 4" in done.stdout + done.stderr
    console = (done.stdout + done.stderr).splitlines()
    # a user's mistake in a trial is its one line, as in a single run: no traceback, no second line from Hydra
    assert sum(" FAIL (" in line for line in console) == 3
    assert not [line for line in console if "Traceback" in line or "Error executing job" in line], console


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_sweep_through_other_launchers(tmp_path, data_dir, launcher):
    log_dir = tmp_path / "logs"
    extra = {"joblib": ["hydra.launcher.n_jobs=2"], "submitit_local": ["hydra.launcher.timeout_min=10"]}[launcher]
    done = run_sweep(
        log_dir, data_dir, f"hydra/launcher={launcher}", *extra, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert states(load_study(log_dir)) == {"COMPLETE": 2}


BAD_SWEEPS = {
    "model.depth=choice(1,2)": "unknown parameter path in the search space: 'model.depth'",
    "optimizer.weight_decay=tag(log,interval(1e-3,1e-6))": "interval(0.001, 1e-06) is empty or inverted",
    "hydra.sweeper.n_trials=0": "hydra.sweeper.n_trials=0 is not allowed; expected an integer ≥ 1",
    "hydra.sweeper.storage='postgresql+psycopg://u:secret@127.0.0.1:9/db'": "cannot be opened",
}


@pytest.mark.parametrize("override", BAD_SWEEPS)
def test_bad_sweep_settings_fail_before_any_trial(tmp_path, data_dir, override):
    log_dir = tmp_path / "logs"
    done = run_sweep(log_dir, data_dir, override)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert BAD_SWEEPS[override] in done.stderr
    assert "secret" not in done.stderr
    assert not list(log_dir.glob("runs/*/*_trial*"))


def test_study_of_the_other_direction_is_refused(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    storage = f"sqlite:///{tmp_path}/study.db"
    optuna.create_study(study_name="mlp_optuna_mnist", storage=storage, direction="minimize")
    done = run_sweep(log_dir, data_dir, f"hydra.sweeper.storage='{storage}'")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "was created to minimize, this sweep asks to maximize" in done.stderr


def test_grid_multirun_with_the_basic_sweeper(tmp_path, data_dir):
    """The labs' L2 study with replicates, shrunk: 2 decays × 2 seeds."""
    log_dir = tmp_path / "logs"
    cmd = train_command(
        "-m", *TINY, "logger=none", "optimizer.weight_decay=1e-6,1e-3", "seed=0,1", log_dir=log_dir, data_dir=data_dir
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list(log_dir.glob("runs/*/*/metrics.json"))
    assert len(runs) == 4
    (listing,) = log_dir.glob("multiruns/*/runs.txt")  # the multirun's own dir names its runs
    assert sorted(listing.read_text().split()) == sorted(str(run.parent) for run in runs)


@pytest.mark.parametrize(("trainer", "gpus"), [("default", None), ("cpu", None), ("gpu", 1), ("ddp", None)])
def test_the_slurm_preset_asks_for_gpus_only_when_the_trainer_runs_on_them(trainer, gpus):
    from hydra import compose, initialize_config_dir

    from digits.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        overrides = ["hparams_search=cnn_optuna", "hydra/launcher=slurm", f"trainer={trainer}"]
        cfg = compose("train", overrides=[*overrides, "hydra.launcher.partition=a100"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["gpus_per_task"] == gpus and launcher["partition"] == "a100"
    assert launcher["_target_"] == "hydra_plugins.digits_optuna_sweeper.slurm_launcher.DigitsSlurmLauncher"


LAB_STUDIES = {
    "study_hidden": ("model.hidden_size", 5),
    "study_batch": ("data.batch_size", 5),
    "study_kernel": ("model.kernel_size", 5),
    "study_dense": ("model.hidden_size", 6),
    "study_epochs": ("trainer.max_epochs", 5),
    "study_l2": ("optimizer.weight_decay", 5),
    "study_optimizers": ("optimizer", 5),
}


@pytest.mark.parametrize(("study", "key", "n"), [(s, *v) for s, v in LAB_STUDIES.items()])
def test_lab_study_presets_sweep_real_keys(study, key, n):
    from hydra import compose, initialize_config_dir

    from digits.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={study}"], return_hydra_config=True)
        values = str(cfg.hydra.sweeper.params[key]).split(",")
        assert len(values) == n
        assert key in cfg.hydra.runtime.choices or OmegaConf.select(cfg, key) is not None
        for value in values:  # every point of the study builds a net that classifies a batch
            net = instantiate(compose("train", overrides=[f"experiment={study}", f"{key}={value}"]).model)
            assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_optimizer_study_runs_each_optimizer_at_its_own_default_lr():
    from hydra import compose, initialize_config_dir

    from digits.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        lrs = {}
        for name in ("sgd", "adam", "adadelta"):
            default = compose("train", overrides=[f"optimizer={name}"]).optimizer.lr
            study = compose("train", overrides=["experiment=study_optimizers", f"optimizer={name}"])
            assert study.scheduler.factory._target_.endswith("CosineAnnealingLR")
            assert list(study.model.hidden_size) == [500, 300]
            lrs[name] = (study.optimizer.lr, default)
    assert all(ours == default for ours, default in lrs.values()), lrs
    assert len({ours for ours, _ in lrs.values()}) == 3


def test_a_sweeps_console_has_one_line_per_trial_and_no_warnings(tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"PYTHONWARNINGS": "default"}
    cmd = sweep_cmd(log_dir, data_dir, "hydra.sweeper.n_trials=3", "logger=tensorboard")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=log_dir.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    console = (done.stdout + done.stderr).splitlines()
    trial_lines = [line for line in console if "] trial " in line]
    assert [line.split("] trial ")[1].split(" ")[:2] for line in trial_lines] == [
        [str(n), "COMPLETE"] for n in range(3)
    ]
    assert all(" s: model.hidden_size=" in line for line in trial_lines)  # seconds and params on the same line
    assert not [line for line in console if "Warning" in line or "warn(" in line], console
    assert not [line for line in console if "Epoch 0" in line or "Trainable params" in line]  # bars, summaries
    assert len(console) <= 10, console
    # the detail is in each run's own log
    (run,) = log_dir.glob("runs/*/*_trial0")
    assert "best val acc" in (run / "train.log").read_text()
