"""The fast path: device-resident batches (order, shards, resume, augmentation), precision and compile."""

import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint

from digits.augment import Augment, random_flip, random_warp
from digits.config import cpu_has_fast_bf16
from digits.data import DeviceLoader, EpochSampler
from digits.train import train

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gather_shards(rank: int, world: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    shard = EpochSampler(1003, shuffle=True, seed=5, rank=dist.get_rank(), world_size=dist.get_world_size())
    shard.set_epoch(2)
    mine = shard.indices()
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        out["shards"] = [g.tolist() for g in gathered]
    dist.destroy_process_group()


def test_ddp_shards_over_gloo_are_disjoint_equal_and_cover_the_set():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_gather_shards, args=(2, port, out), nprocs=2, join=True)
    first, second = out["shards"]
    assert len(first) == len(second) == 502
    assert set(first) | set(second) == set(range(1003))
    assert len(set(first) & set(second)) == 1  # the one index wrapped around to even the shards out


class Recorder(L.LightningModule):
    """Trains a single weight and remembers which sample indices (the labels here) each step saw."""

    def __init__(self, loader: DeviceLoader):
        super().__init__()
        self.loader, self.weight, self.seen = loader, torch.nn.Parameter(torch.zeros(())), []

    def train_dataloader(self) -> DeviceLoader:
        return self.loader

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[1].tolist())
        return (self.weight - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def record(tmp_path, ckpt_path=None, callbacks=()) -> list[list[int]]:
    n = 22
    loader = DeviceLoader(torch.zeros(n, 1, 2, 2), torch.arange(n), batch_size=4, sampler=EpochSampler(n, True, 3))
    module = Recorder(loader)
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        enable_checkpointing=bool(callbacks),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module.seen


def test_device_loader_resumes_mid_epoch_in_the_same_order(tmp_path):
    straight = record(tmp_path / "a")
    assert len(straight) == 12 and straight[:6] != straight[6:]  # 6 batches an epoch, a new order each epoch
    every_4_steps = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    record(tmp_path / "b", callbacks=[every_4_steps])
    resumed = record(tmp_path / "c", ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert resumed == straight[4:]
    resumed_late = record(tmp_path / "d", ckpt_path=tmp_path / "ckpt" / "step=8.ckpt")
    assert resumed_late == straight[8:]


def test_random_translate_moves_each_image_within_the_shift():
    images = torch.full((64, 1, 28, 28), -1.0)
    images[:, 0, 14, 14] = 5.0
    moved = Augment(translate=2, fill=-1.0)(images, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape
    where = (moved[:, 0] == 5.0).nonzero()[:, 1:]
    assert len(where) == 64 and (where - 14).abs().max() <= 2
    assert len({tuple(p) for p in where.tolist()}) > 10  # shifts differ between images
    again = Augment(translate=2, fill=-1.0)(images, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)


def bar_angles_and_lengths(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's ink as a bar: the angle of its main axis in degrees, and its length (4 × that axis' std)."""
    ink = (images[:, 0] + 1).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = ink.sum((1, 2))
    my, mx = (ink * ys).sum((1, 2)) / mass, (ink * xs).sum((1, 2)) / mass
    dy, dx = ys - my[:, None, None], xs - mx[:, None, None]
    cyy, cxx, cxy = ((ink * d).sum((1, 2)) / mass for d in (dy * dy, dx * dx, dx * dy))
    angles = torch.rad2deg(0.5 * torch.atan2(2 * cxy, cxx - cyy))
    major = 0.5 * (cxx + cyy) + ((0.5 * (cxx - cyy)) ** 2 + cxy**2).sqrt()
    return angles, 4 * major.sqrt()


def test_random_warp_turns_and_scales_each_image_about_the_centre():
    images = torch.full((128, 1, 28, 28), -1.0)
    images[:, 0, 13:15, 4:24] = 2.0  # a horizontal bar through the centre, 20 pixels long
    angle0, length0 = bar_angles_and_lengths(images)

    def augment(degrees: float, zoom: float) -> torch.Tensor:
        return random_warp(images + 1, degrees, zoom, 0.0, torch.Generator().manual_seed(0)) - 1  # ink: image - fill

    assert torch.allclose(augment(0, 0), images, atol=1e-5)
    turned = augment(30, 0)
    assert torch.equal(turned, augment(30, 0)) and (turned[:, 0, 0, 0] == -1).all()  # seeded; background kept
    angles, lengths = bar_angles_and_lengths(turned)
    assert angles.abs().max() <= 31 and angles.std() > 10  # each image its own angle within ±30°
    assert torch.allclose(lengths, length0, rtol=0.1)
    _, lengths = bar_angles_and_lengths(augment(0, 0.2))
    ratio = lengths / length0
    assert ratio.min() >= 0.78 and ratio.max() <= 1.22 and ratio.std() > 0.05  # scaled by 0.8 to 1.2
    assert torch.allclose(bar_angles_and_lengths(augment(0, 0.2))[0], angle0, atol=1)


def test_random_flip_mirrors_about_half_the_images_and_nothing_else():
    images = torch.arange(256 * 28 * 28, dtype=torch.float32).reshape(256, 1, 28, 28)
    flipped = random_flip(images, torch.Generator().manual_seed(0))
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    kept = (flipped == images).flatten(1).all(1)
    assert bool((mirrored ^ kept).all())  # each image is either mirrored or left alone
    assert 96 < int(mirrored.sum()) < 160
    assert torch.equal(flipped, random_flip(images, torch.Generator().manual_seed(0)))


def test_flip_augments_training_batches_only(make_cfg, data_dir):
    from hydra.utils import instantiate

    dm = instantiate(make_cfg("data=fashion", "augment=clothes", "data.train_size=512", "data.val_size=512").data)
    dm.setup()
    train_x, _ = dm._splits["train"]
    seen = torch.cat([batch[0] for batch in dm.train_dataloader()])
    order = dm.train_dataloader().sampler.indices()
    assert not torch.equal(seen, train_x[order]) and torch.equal(seen.sort(-1).values, train_x[order].sort(-1).values)
    val_x, _ = dm._splits["val"]
    assert torch.equal(torch.cat([x for x, _ in dm.val_dataloader()]), val_x)


@pytest.mark.slow
def test_device_and_torch_loaders_reach_comparable_accuracy(make_cfg):
    common = [
        "model=mlp",
        "augment=none",
        "data.train_size=4000",
        "data.val_size=1000",
        "trainer.max_epochs=2",
        "seed=0",
        "logger=none",
    ]
    device = train(make_cfg(*common, "data.loader=device"))
    reference = train(make_cfg(*common, "data.loader=torch"))
    assert device["test_acc"] > 0.88 and reference["test_acc"] > 0.88
    assert abs(device["test_acc"] - reference["test_acc"]) < 0.02


def test_translation_and_bf16_autocast_compose_on_cpu(make_cfg):
    quick = ("model=mlp", "debug=quick", "logger=none", "trainer=cpu", "data.translate=2")
    bf16 = train(make_cfg(*quick, "trainer.precision=bf16-mixed"))
    fp32 = train(make_cfg(*quick))
    assert bf16["test_loss"] != fp32["test_loss"], "bf16 autocast changes the arithmetic"
    assert abs(bf16["test_acc"] - fp32["test_acc"]) < 0.02 and bf16["test_acc"] > 0.7  # untrained: 0.1


@pytest.mark.parametrize(
    ("capabilities", "fast"),
    [
        ({"avx512_f": True, "avx512_bf16": True}, True),  # Cooper Lake, Zen 4
        ({"avx512_f": True, "avx512_bf16": False, "amx_bf16": True}, True),  # AMX without the AVX-512 form
        ({"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),  # Skylake-SP
        ({"neon": True, "bf16": True}, True),  # Arm v8.6 (Graviton 3)
        ({"neon": True, "bf16": False}, False),
        ({}, False),
    ],
)
def test_bf16_counts_as_fast_only_where_the_cpu_computes_it(capabilities, fast):
    assert cpu_has_fast_bf16(capabilities) is fast


def _cpuinfo_flags() -> set[str]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return {flag for line in lines if line.startswith(("flags", "Features")) for flag in line.split(":")[1].split()}


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or torch.cuda.is_available(), reason="a Linux CPU machine")
def test_default_trainer_picks_bf16_from_what_the_cpu_reports(make_cfg):
    # read from the kernel's flags, not from the function that decides
    expected = "bf16-mixed" if {"avx512_bf16", "amx_bf16", "bf16"} & _cpuinfo_flags() else "32-true"
    metrics = train(make_cfg("model=cnn", "debug=quick", "logger=none"))
    assert metrics["precision"] == expected
    # an MLP trains faster in fp32 on any CPU (README), bf16 hardware or not, unless a preset measured it in bf16
    assert train(make_cfg("model=mlp", "debug=quick", "logger=none"))["precision"] == "32-true"
    assert make_cfg("model=mlp", "cpu_bf16=true").trainer.precision == expected
    assert make_cfg("experiment=mlp_512_256").trainer.precision == expected
    assert make_cfg("experiment=mlp_300").trainer.precision == "32-true"
    assert make_cfg("trainer=cpu").trainer.precision == "32-true"  # the plain-fp32 CPU trainer stays so
    # a preset that lost accuracy in bf16 on a CPU trains there in fp32, and takes bf16 on a GPU or when asked
    assert make_cfg("experiment=bn_cnn").trainer.precision == "32-true"
    assert make_cfg("experiment=bn_cnn", "trainer=gpu").trainer.precision == "bf16-mixed"
    assert make_cfg("model=cnn", "cpu_bf16=false").trainer.precision == "32-true"


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_parameter_names(make_cfg, tmp_path):
    metrics = train(make_cfg("model=mlp", "compile=true", "debug=quick", "logger=none"))
    assert metrics["compiled"] and metrics["test_acc"] > 0.5
    state = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)


@CUDA
def test_gpu_trainer_uses_bf16_and_matches_fp32_accuracy(make_cfg):
    common = ["experiment=mnist_fast", "logger=none", "seed=0", "trainer=gpu"]
    bf16 = train(make_cfg(*common))
    fp32 = train(make_cfg(*common, "trainer.precision=32-true"))
    assert bf16["precision"] == "bf16-mixed" and bf16["device"].startswith("cuda")
    assert abs(bf16["test_acc"] - fp32["test_acc"]) <= 0.002
    assert bf16["test_acc"] >= 0.99


@CUDA
def test_gpu_compile_composes_with_bf16(make_cfg):
    metrics = train(make_cfg("model=cnn", "compile=true", "trainer=gpu", "debug=quick", "logger=none"))
    assert metrics["compiled"] and metrics["precision"] == "bf16-mixed"
