"""Config nodes: `hydra/sweeper=digits_optuna`, with `hydra/sweeper/sampler` and `hydra/sweeper/pruner` groups."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = 0
    n_startup_trials: int = 10
    multivariate: bool = False


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = 0


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = 0
    n_startup_trials: int = 1


@dataclass
class GridSamplerConf:
    """The grid is the search space itself: `choice`/`range` params, known only at sweep time."""

    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: int | None = 0


@dataclass
class QMCSamplerConf:
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = 0
    qmc_type: str = "sobol"
    scramble: bool = True


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 1


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3


@dataclass
class ThresholdPrunerConf:
    """Stop a trial whose reported value falls below `lower` (or above `upper`) after `n_warmup_steps`."""

    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: float | None = None
    upper: float | None = None
    n_warmup_steps: int = 0


@dataclass
class DigitsOptunaSweeperConf:
    _target_: str = "hydra_plugins.digits_optuna_sweeper.sweeper.DigitsOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    sampler: Any = MISSING
    pruner: Any = MISSING
    direction: str = "maximize"
    # what the task returns, by name (optuna-dashboard's axis and column)
    metric: str = "val/acc_best"
    # SQLAlchemy URL (sqlite:///..., postgresql+psycopg://...), journal:<path> for a journal file,
    # or null for an in-memory study that dies with the process
    storage: str | None = None
    study_name: str | None = None
    n_trials: int = 20
    # trials per launcher batch; a batch waits for its slowest trial
    n_jobs: int = 1
    # stop the sweep once more than this share of its finished trials failed (1.0: never)
    max_failure_rate: float = 1.0
    # seconds between a running trial's heartbeats (RDB storages), so a crashed sweep's trials are freed
    heartbeat_interval: int = 30
    params: dict[str, str] | None = None


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="digits_optuna", node=DigitsOptunaSweeperConf, provider="digits")
    for group, options in {
        "sampler": {
            "tpe": TPESamplerConf,
            "random": RandomSamplerConf,
            "cmaes": CmaEsSamplerConf,
            "grid": GridSamplerConf,
            "qmc": QMCSamplerConf,
        },
        "pruner": {
            "none": NopPrunerConf,
            "median": MedianPrunerConf,
            "hyperband": HyperbandPrunerConf,
            "threshold": ThresholdPrunerConf,
        },
    }.items():
        for name, node in options.items():
            cs.store(group=f"hydra/sweeper/{group}", name=name, node=node, provider="digits")


register()
