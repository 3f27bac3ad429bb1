"""Sweeps on a real one-node SLURM cluster (scripts/slurm_local.sh): real daemons, sbatch, scancel, requeue."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from conftest import ROOT, read_events, train_command

pytestmark = pytest.mark.slurm
SWEEP = ["-m", "hparams_search=mlp_optuna", "model=mlp", "hydra/launcher=slurm"]
SMALL_JOBS = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
TINY = ["data.train_size=256", "data.val_size=256", "trainer.max_epochs=1", "logger=none"]
# ~1,250 steps an epoch: a trial long enough to be cancelled, requeued or killed in the middle
SLOW = ["model.hidden_size=64", "data.train_size=5000", "data.val_size=500", "data.batch_size=8"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return state.returncode == 0 and bool({"idle", "mixed"} & set(state.stdout.split()))


@pytest.fixture(scope="session")
def slurm() -> None:
    """A running cluster: the one already up, or one started here (and stopped after the tests)."""
    if cluster_up():
        yield
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no SLURM cluster is running, and starting one needs root and apt (scripts/slurm_local.sh)")
    started = subprocess.run([ROOT / "scripts" / "slurm_local.sh", "start"], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr[-3000:]
    yield
    subprocess.run([ROOT / "scripts" / "slurm_local.sh", "stop"], capture_output=True)


def study_of(log_dir: Path, storage: str | None = None) -> optuna.Study:
    storage = storage or f"sqlite:///{log_dir}/sweeps/mlp_optuna_mnist/optuna.db"
    return optuna.load_study(study_name="mlp_optuna_mnist", storage=storage)


def sweep(log_dir: Path, data_dir: Path, *overrides: str) -> subprocess.Popen:
    cmd = train_command(*SWEEP, *SMALL_JOBS, *overrides, log_dir=log_dir, data_dir=data_dir)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finished(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_until(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def running_jobs() -> list[str]:
    """Running jobs as SLURM names them (`<array>_<task>` for a job array's tasks)."""
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


def queued(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], capture_output=True, text=True).stdout
    return bool(out.strip())


def test_a_sweep_of_slurm_jobs_on_a_cpu_partition(slurm, tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    done = finished(sweep(log_dir, data_dir, *TINY, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    study = study_of(log_dir)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for trial in study.trials:
        (metrics,) = log_dir.glob(f"runs/*/*_trial{trial.number}/metrics.json")
        assert trial.value == pytest.approx(yaml.safe_load(metrics.read_text())["best_val_acc"])
    (submission,) = log_dir.glob("sweeps/mlp_optuna_mnist/.submitit/*/*_submission.sh")
    assert "--gpus-per-task" not in submission.read_text()  # trainer=default here: no GPU asked for


@pytest.mark.parametrize(
    ("override", "refusal"),
    [
        ("hydra.launcher.cpus_per_task=64", "More processors requested than permitted"),
        ("trainer=gpu", "Invalid generic resource (gres) specification"),
    ],
)
def test_a_request_the_cluster_refuses_is_one_line_before_any_trial(slurm, tmp_path, data_dir, override, refusal):
    log_dir = tmp_path / "logs"
    done = finished(sweep(log_dir, data_dir, *TINY, override, "hydra.sweeper.n_trials=2"), timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("[")]
    assert lines == [f"error: the cluster refused the trials' jobs: sbatch: error: {refusal}"] or lines[-1].endswith(
        refusal
    ), done.stderr[-2000:]
    assert not [t for t in study_of(log_dir).trials if t.state != TrialState.FAIL or t.user_attrs.get("fail_reason")]


def test_a_cancelled_trial_fails_with_its_reason_and_its_batch_is_told(slurm, tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    proc = sweep(log_dir, data_dir, *SLOW, "trainer.max_epochs=1", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2")
    wait_until(lambda: len(running_jobs()) == 2, what="both trials to run")
    victim = sorted(running_jobs())[-1]
    subprocess.run(["scancel", victim], check=True)
    done = finished(proc)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = study_of(log_dir).trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "FAIL"]
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.user_attrs["fail_reason"].startswith(f"JobLostError: SLURM job {victim} ended CANCELLED")


def test_a_trial_over_its_memory_limit_fails_with_the_schedulers_reason(slurm, tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    memory = ["hydra.launcher.mem_gb=null", "+hydra.launcher.additional_parameters.mem=150M"]
    done = finished(sweep(log_dir, data_dir, *TINY, *memory, "hydra.sweeper.n_trials=1"))
    assert done.returncode == 0, done.stderr[-3000:]
    (trial,) = study_of(log_dir).trials
    assert trial.state == TrialState.FAIL and "exceeded memory limit" in trial.user_attrs["fail_reason"]


def test_a_preempted_trial_resumes_from_its_checkpoint_each_time(slurm, tmp_path, data_dir):
    log_dir = tmp_path / "logs"
    proc = sweep(log_dir, data_dir, *SLOW, "trainer.max_epochs=3", "hydra.sweeper.n_trials=1")
    checkpoints = log_dir / "runs"
    wait_until(lambda: list(checkpoints.glob("*/*_trial0/checkpoints/epoch000.ckpt")), what="epoch 0's checkpoint")
    (job,) = running_jobs()
    subprocess.run(["scontrol", "requeue", job], check=True)  # an administrator's requeue: SIGTERM, then again
    wait_until(lambda: list(checkpoints.glob("*/*_trial0/checkpoints/epoch001.ckpt")), what="epoch 1 after the requeue")
    wait_until(lambda: running_jobs() == [job], what="the job to run")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # SLURM's warning before it preempts a job
    done = finished(proc)
    assert done.returncode == 0, done.stderr[-3000:]
    (trial,) = study_of(log_dir).trials
    assert trial.state == TrialState.COMPLETE
    (run_dir,) = checkpoints.glob("*/*_trial0")
    assert (run_dir / "train.log").read_text().count(f"resuming from {run_dir}/checkpoints/last.ckpt") == 2
    steps = [e.step for e in read_events(run_dir).Scalars("val/acc")]
    assert len(steps) == 3 == len(set(steps)), steps  # every epoch once, across both restarts

    def history() -> list[str]:
        states = subprocess.run(["sacct", "-n", "-X", "-D", "-j", job, "-o", "State"], capture_output=True, text=True)
        return states.stdout.split()

    # the trial's result is in before the job has ended and its accounting is written
    wait_until(lambda: history()[-1:] == ["COMPLETED"], timeout=60, what=f"job {job} to be accounted COMPLETED")
    assert history() == ["REQUEUED", "REQUEUED", "COMPLETED"]


def start_workers(log_dir: Path, data_dir: Path, storage: str, n_trials: int) -> str:
    env = {**ENV, "STORAGE": storage, "SEARCH": "mlp_optuna", "N_TRIALS": str(n_trials), "HEARTBEAT": "2"}
    env |= {"CPUS": "1", "MEM": "2G", "PYTHON": sys.executable, "LOGS": str(log_dir / "slurm")}
    trial = ["model=mlp", "model.hidden_size=64", "data.train_size=2000", "data.val_size=500", "data.batch_size=8"]
    overrides = [f"paths.log_dir={log_dir}", f"paths.data_dir={data_dir}", *trial, "logger=none"]
    submitted = subprocess.run(
        [ROOT / "scripts" / "slurm_sweep.sh", "2", *overrides, "trainer.max_epochs=1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_async_workers_finish_the_study_when_one_dies(slurm, tmp_path, data_dir, kind):
    log_dir = tmp_path / "logs"
    storage = {"sqlite": f"sqlite:///{tmp_path}/study.db", "journal": f"journal:{tmp_path}/study.log"}[kind]
    array = start_workers(log_dir, data_dir, storage, n_trials=3)
    optuna_storage = (
        storage
        if kind == "sqlite"
        else optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(f"{tmp_path}/study.log"))
    )

    def trial_running_in(task: str) -> bool:
        try:
            running = study_of(log_dir, optuna_storage).get_trials(states=(TrialState.RUNNING,))
        except (KeyError, sqlalchemy.exc.OperationalError):  # no study (or no tables) yet
            return False
        return any(t.user_attrs.get("slurm_job") == task for t in running)

    wait_until(lambda: len(running_jobs()) == 2, what="both workers to start")
    victim = sorted(running_jobs())[-1]
    wait_until(lambda: trial_running_in(victim), timeout=180, what="a trial in the victim worker")
    subprocess.run(["scancel", victim], check=True)
    wait_until(lambda: not queued(array), timeout=240, what="the workers to end")

    trials = study_of(log_dir, optuna_storage).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3, [(t.number, t.state.name, t.user_attrs) for t in trials]
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    assert dead.user_attrs["slurm_job"] == victim and "fail_reason" not in dead.user_attrs
    assert any(t.params == dead.params and t.system_attrs.get("failed_trial") == dead.number for t in complete)
    assert sorted(p.name for p in (log_dir / "slurm").iterdir()) == [f"{array}_0.out", f"{array}_1.out"]
