"""Optuna's ask/tell behind Hydra's Sweeper interface (`hydra/sweeper=digits_optuna`); trials run through any
Hydra launcher.

Our own because the released hydra-optuna-sweeper pins optuna<3 and its storage breaks on SQLAlchemy 2.
"""

import contextlib
import io
import json
import logging
import math
import os
import re
import socket
import subprocess
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException, HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from digits.cli import describe
from digits.errors import JobsRefusedError
from digits.hparams import ABSENT, TRIAL, hyperparameters
from digits.trials import JOURNAL_PREFIX, PRUNER_ATTR, open_storage, requeue_callback

log = logging.getLogger(__name__)
HOST = socket.gethostname()
FAIL_REASON = "fail_reason"  # user attr of a trial that ran and failed; a FAIL without it never ran to the end


class SweepError(CompactHydraException):
    """A bad sweep setting: Hydra prints it as one line, before any trial starts."""


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Trials that ran or are running, failed ones with their reason included; not those whose worker died
    (queued again with the same params), not a retry still waiting, nor a surplus ask."""
    if trial.state == TrialState.FAIL:
        return FAIL_REASON in trial.user_attrs
    return trial.state != TrialState.WAITING


def budget_used(study: optuna.Study) -> int:
    return sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))


def finish(study: optuna.Study, trial: optuna.Trial | int, **kwargs: Any) -> None:
    """`study.tell`, once per trial, tolerating the GridSampler's stop() outside `optimize`."""
    try:
        study.tell(trial, skip_if_finished=True, **kwargs)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def to_distribution(override: Override) -> BaseDistribution | str:
    """`choice`, `range`, `interval`, `int(interval)` and `tag(log, ...)` as Optuna distributions."""
    key = override.get_key_element()
    written = override.input_line.partition("=")[2] if override.input_line else key
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    if override.is_choice_sweep() or (override.is_range_sweep() and override.value().shuffle):
        values = list(override.sweep_iterator())
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        # numbers stay numbers, so that dashboards order them as numbers; anything else as override text
        choices = values if numbers else list(override.sweep_iterator(transformer=Transformer.encode))
        if not choices:
            raise SweepError(f"{key}: {written} has no values")
        return CategoricalDistribution(choices)
    sweep = override.value()
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise SweepError(f"{key}: {written} is empty; expected start < stop")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(sweep.step))
        return FloatDistribution(values[0], values[-1], step=sweep.step)
    low, high, log_scale = sweep.start, sweep.end, "log" in sweep.tags
    if not low < high:
        raise SweepError(f"{key}: interval({low}, {high}) is empty or inverted; expected low < high")
    if log_scale and low <= 0:
        raise SweepError(f"{key}: a log-scale interval needs low > 0, got {low}")
    if isinstance(low, int) and isinstance(high, int):
        return IntDistribution(low, high, log=log_scale)
    return FloatDistribution(low, high, log=log_scale)


def grid_values(name: str, dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    raise SweepError(f"{name}: the grid sampler takes choice(...) or an integer range(...), not an interval")


def redact(url: str | None) -> str:
    """A storage URL fit for logs and errors: its password hidden, even where the URL does not parse."""
    if not url or url.startswith(JOURNAL_PREFIX):
        return str(url)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"(//[^/:@]*:)[^@/]*@", r"\1***@", url)


def worker_label() -> dict[str, str]:
    """Who runs a trial: this host and process, and the SLURM job it runs in, if any."""
    label = {"worker": f"{HOST}:{os.getpid()}"}
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if job := f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID"):
        label["slurm_job"] = job  # as squeue and scancel name it: <array>_<task> for a job array's task
    return label


def worker_alive(attrs: dict[str, Any]) -> bool:
    """A trial's worker is alive while its SLURM job runs, or (same host) while its process does; a worker
    on another host outside SLURM cannot be checked and counts as alive."""
    if job := attrs.get("slurm_job"):
        try:
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return True
        return state.returncode == 0 and state.stdout.strip() in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED")
    host, _, pid = str(attrs.get("worker", "")).rpartition(":")
    if host != HOST or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_attributes(ret: JobReturn, searched: dict[str, Any]) -> dict[str, Any]:
    """What optuna-dashboard shows beside a trial's params: its run dir, TensorBoard run name, what it scored
    on the robustness suite (validation images) and the settings it kept fixed, by the config's dotted names."""
    if ret.cfg is None or ret.hydra_cfg is None:
        return {}  # a job lost before it ran
    run = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
    attrs: dict[str, Any] = {"run_dir": str(run)}
    log_dir = Path(str(ret.cfg.paths.log_dir))
    if run.is_relative_to(log_dir):
        attrs["tensorboard_run"] = str(run.relative_to(log_dir))
    with contextlib.suppress(OSError, ValueError, KeyError):  # none for a trial failed or pruned before the end
        metrics = json.loads((run / "metrics.json").read_text())
        for split, measured in metrics.get("robustness", {}).items():
            attrs[f"{split}_robust"] = measured["mean"]
            if "fonts" in measured:
                attrs[f"{split}_fonts"] = measured["fonts"]
        if "test_acc" in metrics:  # a sweep run with test=true
            attrs["test_acc"] = metrics["test_acc"]
    fixed = hyperparameters(ret.cfg, ret.hydra_cfg.hydra.runtime.choices)
    # a key the model or optimizer does not take is no setting; each attribute costs the storage a commit
    return attrs | {k: v for k, v in fixed.items() if k not in searched and k != TRIAL and v != ABSENT}


def trial_line(started: FrozenTrial, trial: optuna.Trial, outcome: str) -> str:
    """A told trial's one console line: number, outcome, seconds since it started, params."""
    seconds = (datetime.now() - started.datetime_start).total_seconds() if started.datetime_start else 0.0
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"trial {trial.number} {outcome} in {seconds:.1f} s: {params}"


class OptunaSweep(Sweeper):
    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        direction: str,
        metric: str,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        heartbeat_interval: int,
        params: DictConfig | None,
    ) -> None:
        self.sampler, self.pruner, self.direction, self.metric = sampler, pruner, direction, metric
        self.storage_url, self.study_name, self.params = storage, study_name, params or {}
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.max_failure_rate, self.heartbeat_interval = max_failure_rate, heartbeat_interval

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.job_idx = 0

    # -- before any trial: the search space and the study --------------------------------------

    def _check_settings(self) -> None:
        checks = [
            (self.direction in ("maximize", "minimize"), "direction", self.direction, "maximize or minimize"),
            (isinstance(self.n_trials, int) and self.n_trials >= 1, "n_trials", self.n_trials, "an integer ≥ 1"),
            (isinstance(self.n_jobs, int) and self.n_jobs >= 1, "n_jobs", self.n_jobs, "an integer ≥ 1"),
            (0 <= self.max_failure_rate <= 1, "max_failure_rate", self.max_failure_rate, "a number in [0, 1]"),
        ]
        for ok, key, value, allowed in checks:
            if not ok:
                raise SweepError(f"hydra.sweeper.{key}={value!r} is not allowed; expected {allowed}")

    def _search_space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
        """Distributions from `params` and sweep-style command-line overrides; the rest stays fixed."""
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        try:
            overrides = OverridesParser.create().parse_overrides(lines)
        except HydraException as err:
            raise SweepError(f"cannot parse the search space: {str(err).splitlines()[0]}") from None
        space: dict[str, BaseDistribution] = {}
        fixed: dict[str, str] = {}
        for override in overrides:
            key = override.get_key_element()
            path = override.key_or_group
            is_group = path in self.config.hydra.runtime.choices
            known = is_group or OmegaConf.select(self.config, path, default=KeyError, throw_on_resolution_failure=False)
            known = known is not KeyError
            if not (known or override.is_add() or override.is_force_add()):
                raise SweepError(f"unknown parameter path in the search space: {path!r} is not a key of the config")
            value = to_distribution(override)
            if isinstance(value, BaseDistribution):
                space[key] = value
                fixed.pop(key, None)
            else:
                fixed[key] = value
                space.pop(key, None)
        if not space:
            raise SweepError("the search space is empty: set hydra.sweeper.params or sweep a key on the command line")
        return space, [f"{k}={v}" for k, v in fixed.items()]

    def _open_study(self, space: dict[str, BaseDistribution]) -> optuna.Study:
        storage = None
        if self.storage_url:
            try:
                storage = open_storage(self.storage_url, heartbeat_interval=self.heartbeat_interval)
            except Exception as err:
                detail = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise SweepError(f"storage {redact(self.storage_url)!r} cannot be opened: {detail}") from None
        self.rdb = storage if isinstance(storage, optuna.storages.RDBStorage) else None
        sampler = self.sampler
        if getattr(sampler, "func", None) is optuna.samplers.GridSampler:
            grid = {name: grid_values(name, d) for name, d in space.items()}
            sampler = sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        study = optuna.create_study(
            storage=storage,
            study_name=self.study_name,
            sampler=sampler,
            pruner=self.pruner,
            direction=self.direction,
            load_if_exists=True,
        )
        if study.direction.name.lower() != self.direction:
            raise SweepError(
                f"study {study.study_name!r} in {redact(self.storage_url)} was created to "
                f"{study.direction.name.lower()}, this sweep asks to {self.direction}; choose another study_name"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable in use since 3.2
            study.set_metric_names([self.metric])
        # jobs build the study's pruner from here, to decide for themselves when to stop
        study.set_user_attr(PRUNER_ATTR, OmegaConf.to_container(self.config.hydra.sweeper.pruner))
        return study

    def _fail_dead_trials(self, study: optuna.Study) -> None:
        """Fail the RUNNING trials of workers that died, and queue each again with the same params.

        RDB storages (SQLite, PostgreSQL) use Optuna's heartbeats; a journal file has none in Optuna, so
        there a trial's worker label is checked instead (its SLURM job, or its process on this host).
        """
        if self.rdb is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        elif not isinstance(study._storage, optuna.storages.JournalStorage):
            return  # in memory: no other process shares the study
        # Optuna counts a trial that never beat as alive forever: one a worker asked for and died before
        # labelling (it labels within milliseconds) is dead once it is older than two heartbeats
        cutoff = datetime.now() - timedelta(seconds=2 * max(self.heartbeat_interval, 1) + 5)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "worker" in trial.user_attrs:
                dead = self.rdb is None and not worker_alive(trial.user_attrs)
            else:
                dead = trial.datetime_start is not None and trial.datetime_start < cutoff
            if dead:
                log.info(f"trial {trial.number}: its worker died; it is failed and queued again")
                finish(study, trial.number, state=TrialState.FAIL)
                requeue_callback()(study, study.trials[trial.number])

    # -- the loop ------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> None:
        self._check_settings()
        space, fixed = self._search_space(arguments)
        study = self._open_study(space)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # as Hydra's own sweeper does: what was swept, which run names put first
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        if study.get_trials(deepcopy=False):
            study.sampler.reseed_rng()  # joining or resuming: do not replay the seeded draws already made
        log.info(f"study {study.study_name!r} in {redact(self.storage_url)}: {self.n_trials} trials, {self.direction}")
        log.info("search space: " + ", ".join(f"{k} ~ {v}" for k, v in space.items()))
        finished: Counter[str] = Counter()
        # one line per trial on the console (ours, when it is told): the launcher's own lines go to the log file
        logging.getLogger(type(self.launcher).__module__).setLevel(logging.WARNING)
        while trials := self._ask_batch(study, space) or self._wait_for_other_workers(study, space):
            overrides = [self._overrides(study, trial, fixed) for trial in trials]
            with self._heartbeats(trials):
                try:
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
                except JobsRefusedError as err:
                    for trial in trials:
                        finish(study, trial, state=TrialState.FAIL)  # no fail_reason: never ran, never counted
                    raise SweepError(str(err)) from None
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                finished[self._tell(study, trial, ret).name] += 1
            if finished["FAIL"] / sum(finished.values()) > self.max_failure_rate:
                self._write_results(study, fixed)
                raise SweepError(
                    f"{finished['FAIL']} of {sum(finished.values())} trials failed, more than "
                    f"max_failure_rate={self.max_failure_rate}; see fail_reason in the study"
                )
        self._write_results(study, fixed)

    def _wait_for_other_workers(self, study: optuna.Study, space: dict[str, BaseDistribution]) -> list[optuna.Trial]:
        """The budget is spoken for: wait while other workers run the last trials, and take over any whose
        worker dies (failed and queued again), so that the study ends with exactly n_trials."""
        waited = False
        while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not waited:
                log.info("every trial is asked for; waiting for those still running elsewhere")
                waited = True
            time.sleep(max(1, min(self.heartbeat_interval, 10)))
            if trials := self._ask_batch(study, space):
                return trials
        return []

    def _ask_batch(self, study: optuna.Study, space: dict[str, BaseDistribution]) -> list[optuna.Trial]:
        """Up to n_jobs new trials, none beyond n_trials even with other sweep processes on the study."""
        self._fail_dead_trials(study)
        batch: list[optuna.Trial] = []
        for _ in range(self.n_jobs):
            if budget_used(study) >= self.n_trials:
                break
            with warnings.catch_warnings():
                # our own thread beats for the trials we ask and tell, as Study.optimize's would
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")
                trial = study.ask(space)
            if self.rdb is not None and self.heartbeat_interval:
                self.rdb.record_heartbeat(trial._trial_id)  # alive from its first moment, not from its launch
            for key, value in worker_label().items():
                trial.set_user_attr(key, value)
            # another process may have asked at the same moment: the lower trial numbers win
            ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counts_toward_budget(t)]
            if len(ahead) >= self.n_trials:
                finish(study, trial, state=TrialState.FAIL)  # surplus: no fail_reason, never counted
                break
            batch.append(trial)
        return batch

    def _overrides(self, study: optuna.Study, trial: optuna.Trial, fixed: list[str]) -> Sequence[str]:
        params = [f"{k}={v}" for k, v in trial.params.items()]
        storage = f"'{self.storage_url}'" if self.storage_url else "null"
        job = [f"optuna.trial={trial.number}", f"optuna.study_name='{study.study_name}'", f"optuna.storage={storage}"]
        return (*fixed, *params, *job)

    @contextmanager
    def _heartbeats(self, trials: list[optuna.Trial]) -> Iterator[None]:
        """Record each running trial's heartbeat (RDB storages), so other processes know it is alive."""
        if self.rdb is None or not self.heartbeat_interval:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while True:
                for trial in trials:
                    self.rdb.record_heartbeat(trial._trial_id)  # Optuna keeps heartbeats by internal id
                if stop.wait(self.heartbeat_interval):
                    return

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> TrialState:
        """COMPLETE with a finite value; PRUNED when the job said so; FAIL with its reason otherwise."""
        started = study.get_trials(deepcopy=False)[trial.number]
        running = started.state == TrialState.RUNNING  # not if another process failed it as stale meanwhile
        if running:
            for key, value in job_attributes(ret, trial.params).items():
                trial.set_user_attr(key, value)
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # Hydra's own line for a failed job: ours says it
                value = float(ret.return_value)  # re-raises what the job raised
        except optuna.TrialPruned:
            finish(study, trial, state=TrialState.PRUNED)
            log.info(trial_line(started, trial, "PRUNED"))
            return TrialState.PRUNED
        except Exception as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            bug = err if describe(err) is None else None  # a user's mistake is its one line; a bug its traceback
        else:
            if math.isfinite(value):
                finish(study, trial, values=value)
                log.info(trial_line(started, trial, f"COMPLETE {self.metric}={value:.6g}"))
                return TrialState.COMPLETE
            reason, bug = f"the job returned {value}", None
        if running:
            trial.set_user_attr(FAIL_REASON, reason)
        finish(study, trial, state=TrialState.FAIL)
        log.warning(trial_line(started, trial, f"FAIL ({reason})"), exc_info=bug)
        return TrialState.FAIL

    def _write_results(self, study: optuna.Study, fixed: list[str]) -> None:
        """optimization_results.yaml in the sweep dir: counts, best value and params, the command to rerun it."""
        trials = [t for t in study.get_trials(deepcopy=False) if counts_toward_budget(t)]
        states = Counter(t.state for t in trials)
        results: dict[str, Any] = {
            "name": study.study_name,
            "storage": redact(self.storage_url),
            "direction": self.direction,
            "n_trials": self.n_trials,
            "complete": states[TrialState.COMPLETE],
            "pruned": states[TrialState.PRUNED],
            "failed": states[TrialState.FAIL],
        }
        if states[TrialState.COMPLETE]:
            best = study.best_trial
            # a single run needs the preset's model, not the preset (which also configures the sweep)
            kept = [o for o in fixed if not o.startswith("hparams_search=")]
            preset = (
                []
                if any(o.startswith("model=") for o in kept)
                else [f"model={self.config.hydra.runtime.choices.model}"]
            )
            overrides = [*preset, *kept, *(f"{k}={v}" for k, v in best.params.items())]
            results |= {
                "best_trial": best.number,
                "best_value": best.value,
                "best_params": dict(best.params),
                "best_overrides": " ".join(overrides),
            }
            with contextlib.suppress(OSError, ValueError, KeyError):  # a run dir since removed, or on another host
                metrics = json.loads((Path(best.user_attrs["run_dir"]) / "metrics.json").read_text())
                results["best_checkpoint"] = metrics["best_checkpoint"] or None
        out = Path(self.config.hydra.sweep.dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "optimization_results.yaml.tmp"
        tmp.write_text(yaml.safe_dump(results, sort_keys=False, width=1 << 16))
        tmp.replace(out / "optimization_results.yaml")
        log.info(
            f"study {study.study_name!r}: {results['complete']} complete, {results['pruned']} pruned, "
            f"{results['failed']} failed of {self.n_trials}"
        )
        if "best_overrides" in results:
            log.info(f"best value {results['best_value']:.6g} (trial {results['best_trial']}); train it again with")
            log.info(f"python train.py {results['best_overrides']}")
        if results.get("best_checkpoint"):
            log.info(f"or test its checkpoint, once: python eval.py ckpt_path={results['best_checkpoint']}")
