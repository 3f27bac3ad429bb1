"""A minimal hand-written PyTorch training loop: the yardstick the benchmark holds the framework against.

`RawLoop` trains its own copy of a run's net with the run's optimizer on the run's normalised training
tensors: forward, cross-entropy, backward, step, and nothing else. `InterleavedBaseline` runs it inside a
Lightning fit, a block of raw steps after each block of framework steps, so that both are timed in the
same process under the same machine load.
"""

import copy
import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


class RawLoop:
    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.net = copy.deepcopy(net).train()
        self.autocast = autocast  # e.g. torch.bfloat16: the forward under autocast, as precision=bf16-mixed runs it
        # the framework runs conv nets channels-last (digits.module): so does the yardstick, or it would be slower
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.optimizer = optimizer(self.net.parameters())
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.generator = torch.Generator(images.device).manual_seed(seed)
        self.batches = self._epochs()

    def _epochs(self) -> Iterator[Batch]:
        """A fresh permutation per pass over the images, as the framework's device loader draws one per epoch."""
        while True:
            order = torch.randperm(len(self.labels), device=self.images.device, generator=self.generator)
            for batch in order.split(self.batch_size):
                yield self.images[batch], self.labels[batch]

    def step(self, batch: Batch | None = None) -> torch.Tensor:
        x, y = batch if batch is not None else next(self.batches)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = F.cross_entropy(self.net(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def run(self, steps: int | Iterable[Batch]) -> torch.Tensor:
        """`steps` steps on its own batches, or one step per batch given; the last loss."""
        batches = [None] * steps if isinstance(steps, int) else steps
        loss = torch.tensor(float("nan"))
        for batch in batches:
            loss = self.step(batch)
        return loss


class InterleavedBaseline(L.Callback):
    """In each training epoch: after at least `block` framework optimizer steps (a training batch may hold several),
    as many raw steps; both timed per block (the device synchronised at each mark) and written to `out` as JSON
    when the fit ends."""

    def __init__(self, out: str | Path, block: int = 20) -> None:
        self.out, self.block = Path(out), block
        self.framework: list[float] = []
        self.raw: list[float] = []
        self.steps: list[int] = []
        self.raw_loop: RawLoop | None = None

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        images, labels = trainer.datamodule.tensors("train")
        self.raw_loop = RawLoop(
            pl_module.net, pl_module.optimizer_factory, images, labels, trainer.datamodule.batch_size
        )
        self.raw_loop.run(self.block)  # its first steps allocate and warm up, as the framework's did

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_step, self.start = trainer.global_step, self._now(pl_module.device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        steps = trainer.global_step - self.first_step
        if steps < self.block:
            return
        mark = self._now(pl_module.device)
        self.framework.append(mark - self.start)
        self.raw_loop.run(steps)
        self.start = self._now(pl_module.device)
        self.raw.append(self.start - mark)
        self.steps.append(steps)
        self.first_step = trainer.global_step

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ratios = sorted(f / r for f, r in zip(self.framework, self.raw, strict=True))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(
            json.dumps(
                {
                    "block": self.block,
                    "framework_block_s": self.framework,
                    "raw_block_s": self.raw,
                    "block_steps": self.steps,
                    "step_ratio_median": statistics.median(ratios),
                    "step_ratio_iqr": [quartiles[0], quartiles[2]],
                    "raw_step_s": sum(self.raw) / sum(self.steps),
                }
            )
        )
