"""The per-epoch sums the LightningModule keeps on the device give what torchmetrics computes over the same
batches; the benchmark's hand-written loop trains exactly as the framework does."""

from functools import partial
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from digits import callbacks
from digits.baseline import RawLoop
from digits.config import CONF_DIR
from digits.models import MLP
from digits.module import Classifier


@pytest.fixture
def batches() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1000, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (1000,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=300)  # a short last batch: means weigh by images


def expected(net: torch.nn.Module, batches: DataLoader) -> dict[str, float]:
    accuracy, mse = MulticlassAccuracy(10, average="micro"), MeanSquaredError()
    loss, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = net(x)
            accuracy.update(logits, y)
            mse.update(logits.softmax(-1), F.one_hot(y, 10).float())
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            count += len(y)
    return {"acc": accuracy.compute().item(), "mse": mse.compute().item(), "loss": loss / count}


def test_epoch_metrics_equal_torchmetrics_over_the_same_batches(batches):
    torch.manual_seed(0)
    module = Classifier(MLP(hidden_size=32), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    results = callbacks.TestResults(figures=False)
    trainer.callbacks.append(results)
    want = expected(module.net.eval(), batches)
    for stage, run in (("val", trainer.validate), ("test", trainer.test)):
        got = run(module, dataloaders=batches, verbose=False)[0]
        for name in ("acc", "mse", "loss"):
            assert got[f"{stage}/{name}"] == pytest.approx(want[name], rel=1e-5), (stage, name)
    assert results.confusion.sum() == 1000
    assert results.confusion.diag().sum() / 1000 == pytest.approx(want["acc"], abs=1e-6)


def test_train_epoch_metrics_weigh_each_image_once(batches):
    """Training's loss and accuracy are those of each batch as it was trained on, weighted by its images."""
    torch.manual_seed(0)
    net = MLP(hidden_size=32)
    module = Classifier(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))  # the weights stay: each batch the same
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    want = expected(net, batches)
    trainer.fit(module, train_dataloaders=batches)
    assert trainer.callback_metrics["train/acc"].item() == pytest.approx(want["acc"], rel=1e-5)
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(want["loss"], rel=1e-5)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_the_raw_loop_and_the_framework_reach_the_same_weights_and_loss(batches, model):
    """The benchmark's yardstick trains exactly as the framework does: same batches, same steps, same result."""
    torch.manual_seed(0)
    net = instantiate(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"))
    adam = partial(torch.optim.Adam, lr=1e-3)
    raw = RawLoop(net, adam, *batches.dataset.tensors, batch_size=300)  # trains its own copy
    module = Classifier(net, optimizer=adam)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=batches)
    raw.run(batches)
    for ours, theirs in zip(module.net.state_dict().values(), raw.net.state_dict().values(), strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    x, y = batches.dataset.tensors
    with torch.no_grad():
        assert F.cross_entropy(module.net.eval()(x), y).item() == pytest.approx(
            F.cross_entropy(raw.net.eval()(x), y).item(), rel=1e-5
        )


def fit_mlp(
    batches: DataLoader, steps_per_call: int, ckpt_path: str | None = None, **trainer_args: Any
) -> tuple[Classifier, L.Trainer]:
    """A small MLP trained for 2 epochs with Adam and a per-step OneCycle on the device loader, `steps_per_call`
    batches of 64 a call; returns the module and its trainer."""
    from digits.data import DeviceLoader, EpochSampler

    images, labels = batches.dataset.tensors
    torch.manual_seed(0)
    module = Classifier(
        MLP(hidden_size=32),
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01),
        scheduler_interval="step",
    )
    loader = DeviceLoader(images, labels, 64, EpochSampler(len(labels), True, seed=1), steps_per_call=steps_per_call)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, **trainer_args,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return module, trainer


def test_several_steps_per_call_train_exactly_as_one(batches):
    """A training batch holding several steps' batches (`digits.data.Steps`) gives the same steps in the same
    order: the same weights, train metrics and per-step schedule as one step per batch."""
    (one, one_trainer), (five, five_trainer) = fit_mlp(batches, 1), fit_mlp(batches, 5)
    steps = 2 * 16  # 1000 images in batches of 64, two epochs
    assert one_trainer.global_step == five_trainer.global_step == steps
    assert five_trainer.num_training_batches == 4  # 16 batches a call of up to 5
    for trainer in (one_trainer, five_trainer):
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        assert scheduler.last_epoch == scheduler.total_steps == steps  # stepped once per batch, to its end
    for a, b in zip(one.net.state_dict().values(), five.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for name in ("train/loss", "train/acc"):
        assert one_trainer.callback_metrics[name].item() == five_trainer.callback_metrics[name].item()
    _, stopped = fit_mlp(batches, 5, max_steps=7)  # mid-call: the schedule is 7 steps long and ends there, not at 10
    assert stopped.global_step == 7 and stopped.lr_scheduler_configs[0].scheduler.last_epoch == 7


def test_a_checkpoint_from_automatic_optimization_resumes_its_step_count(batches, tmp_path):
    """Checkpoints written before the Classifier stepped the optimizer itself keep the step count where Lightning's
    automatic optimization does; a resume from one goes on from it and trains as a straight run would."""

    class StopAfterOneEpoch(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.should_stop = True

    _, first = fit_mlp(batches, 5, callbacks=[StopAfterOneEpoch()])
    first.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    loop = checkpoint["loops"]["fit_loop"]
    manual = loop["epoch_loop.manual_optimization.optim_step_progress"]
    automatic = loop["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]
    assert manual["total"]["completed"] == 16 and automatic["total"]["completed"] == 0
    # the older layout, as such a run wrote it: the same count on the automatic side, none on the manual
    automatic["total"], automatic["current"] = dict(manual["total"]), dict(manual["current"])
    for tracker in (manual["total"], manual["current"]):
        tracker.update(ready=0, completed=0)
    torch.save(checkpoint, tmp_path / "old.ckpt")

    resumed, resumed_trainer = fit_mlp(batches, 5, str(tmp_path / "old.ckpt"))
    straight, straight_trainer = fit_mlp(batches, 5)
    assert resumed_trainer.global_step == straight_trainer.global_step == 32
    assert resumed_trainer.lr_scheduler_configs[0].scheduler.last_epoch == 32
    for a, b in zip(resumed.net.state_dict().values(), straight.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
