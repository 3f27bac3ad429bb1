"""Callbacks the training loop always uses: epoch timing, self-describing checkpoints that survive preemption."""

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from digits.artifacts import RECORD


class EpochTimer(L.Callback):
    """Seconds and samples of each training epoch, validation excluded, the GPU synchronised at each mark."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.samples, self.start, self.paused = 0, 0.0, 0.0

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self._now(pl_module)  # a resumed mid-epoch run gets no on_train_epoch_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.paused = self._now(pl_module), 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.samples += len(batch[1])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validation_start = self._now(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.paused += self._now(pl_module) - self.validation_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(self._now(pl_module) - self.start - self.paused)


class PreemptionCheckpoint(L.Callback):
    """Save `last.ckpt` when SIGTERM stops training (Lightning stops after the current batch).

    Every checkpoint also flushes the loggers, so the curves on disk reach as far as the weights do
    and a resumed run neither repeats nor skips an epoch.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.dirpath / "last.ckpt")


class RunRecord(L.Callback):
    """Put the run's record (resolved config, dataset, package versions) into every checkpoint it saves,
    so that a checkpoint copied anywhere can be evaluated and predicted with on its own."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD] = self.record
