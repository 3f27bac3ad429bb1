"""The sweeper's pure logic on in-memory studies: budget counting, search-space parsing, URL redaction."""

import warnings

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from digits.sweeper import (
    FAIL_REASON,
    SweepError,
    budget_used,
    redact,
    to_distribution,
    worker_alive,
)


def distribution(line: str):
    return to_distribution(OverridesParser.create().parse_overrides([line])[0])


def test_search_space_lines_become_optuna_distributions():
    assert distribution("a=tag(log,interval(1e-6,1e-3))") == FloatDistribution(1e-6, 1e-3, log=True)
    assert distribution("a=int(interval(16,512))") == IntDistribution(16, 512)
    assert distribution("a=range(1,10,2)") == IntDistribution(1, 9, step=2)
    assert distribution("a=choice(32,64)") == CategoricalDistribution((32, 64))
    assert distribution("a=5") == "5"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a=interval(3,1)", "interval(3.0, 1.0) is empty or inverted"),
        ("a=tag(log,interval(0,1))", "a log-scale interval needs low > 0"),
        ("a=range(5,1)", "is empty; expected start < stop"),
    ],
)
def test_impossible_search_spaces_are_refused(line, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distribution(line)


def test_the_budget_counts_what_ran_or_runs_not_what_died_or_waits():
    study = optuna.create_study()
    space = {"x": FloatDistribution(0, 1)}
    done = study.ask(space)
    study.tell(done, 0.5)
    pruned = study.ask(space)
    study.tell(pruned, state=TrialState.PRUNED)
    failed = study.ask(space)
    failed.set_user_attr(FAIL_REASON, "ValueError: a bad value")
    study.tell(failed, state=TrialState.FAIL)
    died = study.ask(space)  # its worker died: failed without a reason
    study.tell(died, state=TrialState.FAIL)
    study.ask(space)  # running
    study.enqueue_trial({"x": 0.3})  # a retry, waiting
    assert budget_used(study) == 4


def test_redact_hides_the_password_even_in_a_url_that_does_not_parse():
    assert redact("postgresql+psycopg://user:secret@db/optuna") == "postgresql+psycopg://user:***@db/optuna"
    assert "secret" not in redact("postgresql+psycopg://user:secret@db:notaport/optuna")
    assert redact("journal:/fs/study.log") == "journal:/fs/study.log"


def test_a_worker_is_alive_while_its_process_runs():
    import os
    import socket
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = socket.gethostname()
    assert worker_alive({"worker": f"{host}:{os.getpid()}"})
    assert not worker_alive({"worker": f"{host}:{child.pid}"})
    assert worker_alive({"worker": f"elsewhere:{child.pid}"})  # another host: cannot tell, so alive


def test_a_trial_whose_worker_died_before_labelling_it_is_failed_and_queued_again(tmp_path):
    from datetime import datetime, timedelta

    from digits.sweeper import OptunaSweep

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=1)
    study = optuna.create_study(storage=storage)
    dist = {"x": FloatDistribution(0, 1)}
    long_ago = datetime.now() - timedelta(minutes=5)
    for _ in range(2):
        study.add_trial(optuna.create_trial(state=TrialState.RUNNING, params={"x": 0.5}, distributions=dist))
    orphan, labelled = study.trials
    storage.set_trial_user_attr(labelled._trial_id, "worker", "elsewhere:1")  # alive as far as we can tell
    with storage.engine.begin() as db:  # started five minutes ago, never beat
        db.exec_driver_sql("UPDATE trials SET datetime_start = ?", (long_ago.isoformat(sep=" "),))
    sweeper = OptunaSweep.__new__(OptunaSweep)
    sweeper.rdb, sweeper.heartbeat_interval = storage, 1
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        sweeper._fail_dead_trials(study)
    assert not shown, [str(w.message) for w in shown]  # a sweep's console stays one line per trial
    states = [t.state for t in study.trials]
    assert states[:2] == [TrialState.FAIL, TrialState.RUNNING] and states[2:] == [TrialState.WAITING]
    assert study.trials[2].params == {"x": 0.5} and study.trials[2].system_attrs["failed_trial"] == orphan.number
