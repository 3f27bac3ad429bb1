"""The sweeper as Hydra finds it. Hydra imports every plugin module at every start, single runs too, so
this one stays light: Optuna and SQLAlchemy are imported with `digits.sweeper` when a sweep starts."""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class DigitsOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from digits.sweeper import OptunaSweep

        self.sweep_ = OptunaSweep(**self.settings)
        self.sweep_.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        self.sweep_.sweep(arguments)
