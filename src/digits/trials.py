"""The job's side of an Optuna sweep: open the study's storage, report epochs to the trial for pruning."""

import functools
import random
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import DictConfig

JOURNAL_PREFIX = "journal:"


NOP = "optuna.pruners.NopPruner"
PRUNER_ATTR = "pruner"  # a study's user attr: the config of the pruner its sweeps chose


def requeue_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that queues a failed trial again with the same params, up to three times."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable in use since 2.8
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)


def open_storage(url: str, heartbeat_interval: int | None = None) -> optuna.storages.BaseStorage:
    """An SQLAlchemy URL gives an RDB storage; `journal:<path>` an append-only journal file.

    With `heartbeat_interval`, an RDB storage fails the running trials of a process that stopped beating
    (`fail_stale_trials`) and queues each again with the same params (`RetryHeartbeatStaleTrialCallback`).
    """
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url.removeprefix(JOURNAL_PREFIX)).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    sqlite = url.startswith("sqlite:///")
    if sqlite:
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # SQLite: wait for a writer from another process instead of failing at once
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    retries = 4
    retry = requeue_callback() if heartbeat_interval else None
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    heartbeat_stale_trial_callback=retry,
                )
        except sqlalchemy.exc.SQLAlchemyError as err:
            # two processes creating a new storage's tables at once: the loser retries against the winner's
            racing = isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)
            if not racing or retries == 0:
                raise
            retries -= 1
            time.sleep(0.2 + random.random())


@functools.lru_cache(maxsize=4)
def _trial_storage(url: str) -> optuna.storages.BaseStorage:
    """One connection per process for all the trials it runs (a journal is replayed once, not per trial)."""
    return open_storage(url)


def pruning_callback(trial_cfg: DictConfig | None, monitor: str = "val/acc") -> Callback | None:
    """The sweeper passes `optuna.{storage,study_name,trial}`; the job reports `monitor` every epoch."""
    if not trial_cfg or trial_cfg.get("trial") is None or not trial_cfg.get("storage"):
        return None
    from optuna_integration import PyTorchLightningPruningCallback

    storage = _trial_storage(trial_cfg.storage)
    study_id = storage.get_study_id_from_name(trial_cfg.study_name)
    pruner = instantiate(storage.get_study_user_attrs(study_id).get(PRUNER_ATTR) or {"_target_": NOP})
    study = optuna.load_study(study_name=trial_cfg.study_name, storage=storage, pruner=pruner)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial_cfg.trial)
    return PyTorchLightningPruningCallback(optuna.trial.Trial(study, trial_id), monitor=monitor)
