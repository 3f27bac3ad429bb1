"""The one LightningModule: wraps any classifier net; knows nothing about which one."""

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import MaxMetric, MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from digits.errors import DigitsError
from digits.models import count_parameters

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class DivergedError(DigitsError):
    """The training loss became NaN or infinite."""


class Classifier(L.LightningModule):
    """Cross-entropy training with accuracy, softmax-vs-one-hot MSE and best-so-far val accuracy.

    Metrics are logged per epoch only, so a training step never waits on the host.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        num_classes: int = 10,
        max_misclassified: int = 64,
    ) -> None:
        super().__init__()
        self.net, self.num_classes = net, num_classes
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval, self.max_misclassified = scheduler_interval, max_misclassified
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro") for _ in range(3)
        )
        self.val_mse, self.test_mse = MeanSquaredError(), MeanSquaredError()
        self.val_acc_best = MaxMetric()
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.train_loss_sum = torch.zeros(())
        self.channels_last = False
        self.misclassified: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

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

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, ...]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "test", sync_dist=True)
        return loss, logits, y

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits, y = self._shared_step(batch, "train")
        self.train_loss_sum = self.train_loss_sum.to(loss.device) + loss.detach()
        self.train_acc(logits, y)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        if not torch.isfinite(self.train_loss_sum):
            raise DivergedError(
                f"training diverged: the train loss became {self.train_loss_sum.item()} in epoch "
                f"{self.current_epoch}; lower optimizer.lr or add a scheduler"
            )
        self.train_loss_sum = torch.zeros((), device=self.device)

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        _, logits, y = self._shared_step(batch, stage)
        acc, mse = (self.val_acc, self.val_mse) if stage == "val" else (self.test_acc, self.test_mse)
        acc(logits, y)
        mse(logits.float().softmax(-1), F.one_hot(y, self.num_classes).float())
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/mse", mse, on_step=False, on_epoch=True)
        return logits, y

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # forget the sanity-check batches

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self.misclassified = []

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits, y = self._eval_step(batch, "test")
        preds = logits.argmax(-1)
        self.test_confusion(preds, y)
        room = self.max_misclassified - sum(len(m[0]) for m in self.misclassified)
        if room > 0:
            wrong = (preds != y).nonzero().squeeze(1)[:room]
            self.misclassified.append((batch[0][wrong].float().cpu(), y[wrong].cpu(), preds[wrong].cpu()))

    def on_test_epoch_end(self) -> None:
        self.confusion_matrix = self.test_confusion.compute().cpu()
        self.test_confusion.reset()
        tensorboards = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not tensorboards or self.trainer.sanity_checking:
            return
        from digits import figures  # matplotlib is only needed once the test set has been seen

        names = getattr(self.trainer.datamodule, "class_names", [str(i) for i in range(self.num_classes)])
        images, labels, preds = (
            (torch.cat(parts) for parts in zip(*self.misclassified, strict=True)) if self.misclassified else (None,) * 3
        )
        for tb in tensorboards:
            tb.experiment.add_figure("test/confusion_matrix", figures.confusion_matrix(self.confusion_matrix, names))
            if images is not None:
                tb.experiment.add_figure("test/misclassified", figures.image_grid(images, labels, preds, names))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, **self._schedule_length())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    def _schedule_length(self) -> dict[str, int]:
        """Fill a scheduler's length argument (OneCycle's total_steps, cosine's T_max) from the trainer."""
        steps = (
            self.trainer.estimated_stepping_batches if self.scheduler_interval == "step" else self.trainer.max_epochs
        )
        accepted = inspect.signature(self.scheduler_factory).parameters
        given = getattr(self.scheduler_factory, "keywords", {})
        return {k: int(steps) for k in ("total_steps", "T_max", "total_iters") if k in accepted and k not in given}
