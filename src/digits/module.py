"""The one LightningModule: wraps any classifier net; knows nothing about which one."""

import copy
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from digits.data import Steps
from digits.errors import DigitsError
from digits.models import count_parameters

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]

# what each stage sums over its batches: summed loss, right answers, images, summed squared softmax error
LOSS, CORRECT, COUNT, SQUARED = range(4)


class DivergedError(DigitsError):
    """The training loss became NaN or infinite."""


class Classifier(L.LightningModule):
    """Cross-entropy training with accuracy, softmax-vs-one-hot MSE and best-so-far val accuracy.

    Each stage sums its metrics on the device, batch by batch, and logs them once per epoch with the epoch
    as the step: a training step never waits on the host, and runs of any batch size line up in TensorBoard.
    (Our own sums: per-step `self.log` and torchmetrics objects cost more than the step itself for small nets.)

    It steps the optimizer itself, once per batch, so that one call can train on several batches
    (`digits.data.Steps`): Lightning's automatic optimization allows one step per call.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.net, self.num_classes = net, num_classes
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        self.sums: dict[str, torch.Tensor] = {}
        self.best_val_acc: float | None = None
        self.channels_last = False
        self.automatic_optimization = False

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets this name around every hook call, some 40 times a step; nn.Module's checks for
        # parameters, buffers and submodules on each cost a tenth of a small MLP's step
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.net)

    def setup(self, stage: str) -> None:
        # cuDNN (Tensor Cores under bf16) and oneDNN on CPUs run convolutions fastest on NHWC tensors
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        sums = self.sums.get(stage)
        if sums is None:
            sums = self.sums[stage] = torch.zeros(4, dtype=torch.float32, device=loss.device)
        with torch.no_grad():  # in place on each sum's view: `sums[i] += …` would also copy it back
            sums[LOSS].add_(loss.detach(), alpha=len(y))
            sums[CORRECT].add_((logits.argmax(-1) == y).sum())
            sums[COUNT].add_(len(y))
            if stage != "train":  # the softmax's distance from the one-hot label, as the labs' MSE
                sums[SQUARED].add_((logits.float().softmax(-1) - F.one_hot(y, self.num_classes)).square().sum())
        return loss, logits

    def _log_epoch(self, stage: str) -> dict[str, torch.Tensor]:
        """The stage's epoch means, summed over every DDP process, logged at the epoch as step; sums reset."""
        sums = self.sums.pop(stage, None)
        if sums is None or self.trainer.sanity_checking:
            return {}
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        count = sums[COUNT].clamp(min=1)
        means = {f"{stage}/loss": sums[LOSS] / count, f"{stage}/acc": sums[CORRECT] / count}
        if stage != "train":
            means[f"{stage}/mse"] = sums[SQUARED] / (count * self.num_classes)
        self.log_dict(means, prog_bar=stage == "val")
        self.log("step", float(self.current_epoch))  # Lightning's step for these values: the epoch
        return means

    def on_train_epoch_start(self) -> None:
        # the rate this epoch starts with (Lightning's LearningRateMonitor logs on the batch axis, not the epoch's)
        self.log("train/lr", float(self.optimizers().param_groups[0]["lr"]))

    def training_step(self, batch: Steps | tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch[0], batch[1]
        size = batch.batch_size if isinstance(batch, Steps) else len(labels)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        for x, y in zip(images.split(size), labels.split(size), strict=True):
            if 0 < self.trainer.max_steps <= self.trainer.global_step:
                break  # Lightning checks max_steps between calls only
            loss = self._step((x, y), "train")[0]
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
            if scheduler is not None and self.scheduler_interval == "step":
                scheduler.step()

    def on_train_epoch_end(self) -> None:
        loss = self._log_epoch("train").get("train/loss")
        if loss is not None and not torch.isfinite(loss):
            raise DivergedError(
                f"training diverged: the train loss became {loss.item()} in epoch "
                f"{self.current_epoch}; lower optimizer.lr or add a scheduler"
            )
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.scheduler_interval == "epoch":
            scheduler.step()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        acc = self._log_epoch("val").get("val/acc")
        if acc is not None:
            self.best_val_acc = acc.item() if self.best_val_acc is None else max(acc.item(), self.best_val_acc)
            self.log("val/acc_best", self.best_val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Returns the logits, for callbacks that look at the answers (`digits.callbacks.TestResults`)."""
        return self._step(batch, "test")[1]

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_val_acc"] = self.best_val_acc

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best_val_acc = checkpoint.get("best_val_acc")
        carry_automatic_steps(checkpoint)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, **self._schedule_length())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    def _schedule_length(self) -> dict[str, int]:
        """Fill a scheduler's length argument (OneCycle's total_steps, cosine's T_max) from the trainer."""
        steps = self._optimizer_steps() if self.scheduler_interval == "step" else self.trainer.max_epochs
        accepted = inspect.signature(self.scheduler_factory).parameters
        given = getattr(self.scheduler_factory, "keywords", {})
        return {k: int(steps) for k in ("total_steps", "T_max", "total_iters") if k in accepted and k not in given}

    def _optimizer_steps(self) -> int:
        """Optimizer steps in the whole fit (Lightning counts training batches, which may hold several)."""
        trainer = self.trainer
        trainer.fit_loop.setup_data()  # a no-op once the training data is set up
        loader = trainer.train_dataloader
        per_call = getattr(loader, "steps_per_call", 1)
        per_epoch = min(trainer.num_training_batches * per_call, getattr(loader, "steps", len(loader)))
        total = per_epoch * trainer.max_epochs
        return min(total, trainer.max_steps) if trainer.max_steps > 0 else total


def carry_automatic_steps(checkpoint: dict[str, Any]) -> None:
    """A checkpoint written while Lightning still stepped the optimizer (before commit e2bf541) counts the steps in
    its automatic loop's progress; move them to the manual loop's, where Lightning reads the global step from now,
    so that a resumed run goes on counting (max_steps, step-named checkpoints) instead of starting again at 0."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    automatic = loop.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
    manual = loop.get("epoch_loop.manual_optimization.optim_step_progress")
    if automatic and manual and manual["total"]["completed"] == 0 < automatic["total"]["completed"]:
        loop["epoch_loop.manual_optimization.optim_step_progress"] = copy.deepcopy(automatic)
