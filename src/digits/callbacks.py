"""Callbacks the training loop always uses: epoch timing, self-describing checkpoints that survive preemption,
the test set's confusion matrix and misclassified images, the robustness suite."""

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from digits.artifacts import RECORD
from digits.errors import is_int, require
from digits.robustness import is_digits, score, suite


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


class TestResults(L.Callback):
    """The test set's confusion matrix, per-class precision, recall and F1 (torchmetrics, summed over DDP
    processes) and a sample of misclassified images, from the logits `test_step` returns; with `figures`, the
    matrix and the images drawn into every TensorBoard logger of the run, under the tags in `TAGS`."""

    def __init__(self, figures: bool = True, max_misclassified: int = 64) -> None:
        self.figures, self.max_misclassified = figures, max_misclassified
        self.metrics: MetricCollection | None = None
        self.confusion = torch.zeros(0, 0, dtype=torch.long)
        self.per_class: dict[str, list[float]] = {}
        self.misclassified: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = pl_module.num_classes
        self.metrics = MetricCollection(
            {
                "confusion": MulticlassConfusionMatrix(n),
                "precision": MulticlassPrecision(n, average="none"),
                "recall": MulticlassRecall(n, average="none"),
                "f1": MulticlassF1Score(n, average="none"),
            }
        ).to(pl_module.device)
        self.misclassified = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        x, y = batch
        preds = outputs.argmax(-1)
        self.metrics.update(preds, y)
        room = self.max_misclassified - sum(len(m[0]) for m in self.misclassified)
        if room > 0:
            wrong = (preds != y).nonzero().squeeze(1)[:room]
            self.misclassified.append((x[wrong].float().cpu(), y[wrong].cpu(), preds[wrong].cpu()))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        computed = {k: v.cpu() for k, v in self.metrics.compute().items()}
        self.confusion = computed.pop("confusion")
        self.per_class = {k: v.tolist() for k, v in computed.items()}
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if self.figures and tensorboards and trainer.is_global_zero:
            names = getattr(trainer.datamodule, "class_names", None) or [str(i) for i in range(len(self.confusion))]
            for tag, figure in self.drawn(names):
                for tb in tensorboards:
                    tb.experiment.add_figure(tag, figure, global_step=trainer.current_epoch, close=False)

    def drawn(self, class_names: list[str], card: bool = True) -> list[tuple[str, Any]]:
        """The figures of these results, under the tags that train, eval and report all use: sized for a
        TensorBoard card, or (`card=False`) every misclassified image kept, titled by class name."""
        from digits import figures  # matplotlib only once there is something to draw

        drawn = [(TAGS["confusion"], figures.confusion_matrix(self.confusion, class_names))]
        if self.misclassified:
            images, labels, preds = (torch.cat(parts) for parts in zip(*self.misclassified, strict=True))
            grid = (
                figures.mistakes_card(images[:16], labels.tolist(), preds.tolist())
                if card
                else figures.image_grid(images, labels, preds, class_names)
            )
            drawn.append((TAGS["misclassified"], grid))
        return drawn


class Robustness(L.Callback):
    """The robustness suite (`digits.robustness`) on the model the test stage tests, logged beside its test
    accuracy: `robust/<set>` from a fixed sample of `size` test images, and with `val` among `splits`,
    `val_robust/<set>` from the held-out validation images, the ones to choose recipes by."""

    def __init__(self, splits: tuple[str, ...] | list[str] = ("test",), size: int = 2000, fonts: bool = True) -> None:
        ok = len(splits) > 0 and all(s in ("val", "test") for s in splits)
        require(ok, "splits", list(splits), "a list of `val` and/or `test`")
        require(is_int(size) and size >= 1, "size", size, "a number of images ≥ 1")
        self.splits, self.size, self.fonts = tuple(splits), size, fonts
        self.results: dict[str, dict[str, float]] = {}

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, accuracy in self.measure(trainer, pl_module, self.splits).items():
            pl_module.log(name, accuracy)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, splits: tuple[str, ...]) -> dict[str, float]:
        """Score the suite built from each split's images into `results`; returns them by their logged names."""
        dm = trainer.datamodule
        fonts = (dm.frame_box, dm.frame_by_mass) if self.fonts and is_digits(dm.class_names) else None
        logged = {}
        for split in splits:
            images, labels = (t.to(pl_module.device) for t in dm.tensors(split))
            sets = suite(images, labels, dm.mean, dm.std, self.size, fonts)
            self.results[split] = score(pl_module, sets, dm.eval_batch_size)
            prefix = "robust" if split == "test" else "val_robust"
            logged |= {f"{prefix}/{name}": accuracy for name, accuracy in self.results[split].items()}
        return logged


TAGS = {"confusion": "test/confusion_matrix", "misclassified": "test/misclassified"}
