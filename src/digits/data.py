"""MNIST and Fashion-MNIST as LightningDataModules, and the device-resident batch loader.

Both datasets share one base: a seeded split of the 60k official training images into disjoint
train / validation parts, the official 10k as the test set. Two loaders serve the batches:
`device` (default) keeps the whole normalised dataset on the training device and slices batches
out of one seeded permutation per epoch; `torch` is torchvision's per-sample PIL path through a
DataLoader, kept as the reference.
"""

import contextlib
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import MNIST
from torchvision.datasets.utils import check_integrity

from digits.augment import Augment
from digits.errors import DigitsError, is_int, named_class, require
from digits.images import ImageSpec

LOADERS = ("device", "torch")


class EpochSampler:
    """One seeded permutation per epoch, cut into this rank's shard.

    Lightning calls `set_epoch` on a loader's `.sampler` at each epoch start (as for a
    DistributedSampler), so the order depends only on (seed, epoch) and survives a resume.
    With `even=True` every rank gets the same count, wrapping around as DistributedSampler does.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, even: bool = True):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.even:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))

    def indices(self) -> torch.Tensor:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n)
        if self.even:
            total = len(self) * self.world_size
            order = torch.cat([order, order[: total - self.n]])
        return order[self.rank :: self.world_size]


class Steps(NamedTuple):
    """Several optimizer steps' batches handed over as one: `batch_size` images per step, in order.

    Lightning spends a fixed ~0.5 ms of Python on every batch it hands to `training_step`; a small net's
    whole step costs about that much, so the device loader hands over several steps at a time
    (`digits.module.Classifier` steps through them).
    """

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int


class DeviceLoader:
    """Batches sliced out of tensors that already live on the training device: no per-sample Python.

    With `steps_per_call` > 1 each item is a `Steps` of that many consecutive batches of one permutation
    (the last may hold fewer): the same batches, augmented the same way, in the same order, as with 1.
    Stateful for Lightning: a checkpoint taken mid-epoch (at a batch end, where every batch handed
    out has been trained on) resumes at the next batch of the same permutation.
    """

    batch_sampler = None  # read by Lightning as on a DataLoader; the sampler below is the only one

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        sampler: EpochSampler,
        augment: Augment | None = None,
        steps_per_call: int = 1,
    ):
        self.images, self.labels, self.batch_size, self.sampler = images, labels, batch_size, sampler
        self.augment, self.steps_per_call = augment, steps_per_call
        self.served, self.resume_at = 0, 0

    @property
    def steps(self) -> int:
        """Batches (optimizer steps) per epoch."""
        return math.ceil(len(self.sampler) / self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.steps / self.steps_per_call)

    def __iter__(self):
        order = self.sampler.indices().to(self.images.device, non_blocking=True)
        generator = torch.Generator(self.images.device).manual_seed(self.sampler.seed + self.sampler.epoch)
        start, self.resume_at = self.resume_at, 0
        for first in range(start, self.steps, self.steps_per_call):
            self.served = min(first + self.steps_per_call, self.steps)
            batch = order[first * self.batch_size : self.served * self.batch_size]
            images, labels = self.images[batch], self.labels[batch]
            if self.augment:  # batch by batch: some draws are per batch (low_res's side), as with one per call
                images = torch.cat([self.augment(part, generator) for part in images.split(self.batch_size)])
            yield (images, labels) if self.steps_per_call == 1 else Steps(images, labels, self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_trained": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.resume_at = state["batches_trained"] if state["batches_trained"] < self.steps else 0


# A sweep's trials in one process check and read the dataset files once (our own: torchvision reads and
# checks them on every dataset it builds)
_VERIFIED: set[tuple[Any, ...]] = set()
_READ: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


class DigitsDataModule(L.LightningDataModule):
    """A torchvision dataset in MNIST's format (28×28 grayscale IDX files: MNIST, Fashion-MNIST, KMNIST,
    or a subclass of torchvision's `MNIST` of one's own), split, normalised and served in batches.

    `dataset` names the torchvision class; `mean` and `std` are its training images' pixel statistics;
    `frame_box` and `frame_by_mass` say how its makers framed each object in 28×28 (the bounding box
    scaled to fit this side, centred by centre of mass or by the box), so that predict.py frames outside
    images the same way; `train_pool` is the size of its official training split. The other keywords are
    the training augmentations (`digits.augment.Augment`). `steps_per_call` is how many training batches the
    device loader hands to each `training_step` (one under DDP): the same steps, less of Lightning's
    per-batch overhead.
    """

    def __init__(
        self,
        dataset: str | type[MNIST] = "torchvision.datasets.MNIST",
        mean: float = 0.1307,
        std: float = 0.3081,
        frame_box: int = 20,
        frame_by_mass: bool = True,
        train_pool: int = 60_000,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        val_size: int | float = 5_000,
        train_size: int | float | None = None,
        eval_batch_size: int = 1_000,
        loader: str = "device",
        num_workers: int = 0,
        download: bool = True,
        seed: int = 0,
        steps_per_call: int = 1,
        **augment: Any,
    ) -> None:
        super().__init__()
        _check_count("batch_size", batch_size)
        _check_count("eval_batch_size", eval_batch_size)
        _check_count("steps_per_call", steps_per_call)
        require(loader in LOADERS, "loader", loader, f"one of {list(LOADERS)}")
        require(isinstance(num_workers, int) and num_workers >= 0, "num_workers", num_workers, "an integer ≥ 0")
        self.dataset_cls = _dataset_class(dataset)
        self.spec = ImageSpec(list(self.dataset_cls.classes), mean, std, frame_box, frame_by_mass)  # checks them
        _check_count("train_pool", train_pool)
        self.augment = Augment(**augment, fill=-mean / std)
        for key in Augment.DEVICE_ONLY:
            value = getattr(self.augment, key)
            allowed = "0 with loader=torch (it runs on the device loader; augment=shift or none go with either)"
            require(loader == "device" or not value, key, value, allowed)
        self.train_pool = train_pool
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.loader, self.num_workers, self.download, self.seed = loader, num_workers, download, seed
        self.steps_per_call = steps_per_call
        self.n_val = _split_size("val_size", val_size, self.train_pool, upper=self.train_pool - 1)
        remaining = self.train_pool - self.n_val
        self.n_train = remaining if train_size is None else _split_size("train_size", train_size, remaining, remaining)
        self._splits: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.dataset_cls.__name__

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.classes)

    @property
    def mean(self) -> float:
        return float(self.spec.mean)

    @property
    def std(self) -> float:
        return float(self.spec.std)

    @property
    def frame_box(self) -> int:
        return self.spec.frame_box

    @property
    def frame_by_mass(self) -> bool:
        return self.spec.frame_by_mass

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.name / "raw"

    def _files(self) -> tuple[Any, ...]:
        """The dataset's class, where its files are, and each file's name, size and time: what a process's
        cache of checked and read files is keyed by (a file changed since is checked and read again)."""
        found = sorted(self.raw_dir.glob("*")) if self.raw_dir.is_dir() else []
        return (
            self.dataset_cls,
            str(self.data_dir),
            tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in found),
        )

    def prepare_data(self) -> None:
        """Fetch (when missing and allowed) and verify the official files; rank 0 only, once per process."""
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise DigitsError(f"data.data_dir={str(self.data_dir)!r} is a file; expected a directory for the datasets")
        if self._files() in _VERIFIED:
            return
        try:
            with self._extraction_lock():
                for train in (True, False):
                    self.dataset_cls(str(self.data_dir), train=train, download=self.download)
        except RuntimeError as err:
            if "not found" not in str(err):
                raise DigitsError(self._describe_unreadable_data(err)) from None
            raise DigitsError(self._describe_missing_data(err)) from None
        except (AssertionError, KeyError, ValueError, TypeError, OSError) as err:
            raise DigitsError(self._describe_unreadable_data(err)) from None
        for filename, md5 in self.dataset_cls.resources:
            path = self.raw_dir / filename
            if path.exists() and not check_integrity(str(path), md5):
                raise DigitsError(f"{path} fails its md5 check (expected {md5}); delete it and download it again")
        _VERIFIED.add(self._files())

    def _extraction_lock(self) -> contextlib.AbstractContextManager:
        """Runs starting at once on a fresh data dir (a sweep's parallel trials): one downloads and extracts the
        files, the others wait, instead of reading a half-written file (torchvision writes them in place)."""
        with contextlib.suppress(OSError):
            self.data_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(self.data_dir, os.W_OK):
            return contextlib.nullcontext()  # read-only: nothing can be written there to wait for
        return FileLock(self.data_dir / f".{self.name}.lock")

    def _describe_missing_data(self, err: RuntimeError) -> str:
        for filename, md5 in self.dataset_cls.resources:
            path = self.raw_dir / filename
            if not path.exists():
                how = "could not be downloaded" if self.download else "download is off (data.download=false)"
                return f"{path} is missing and {how}; copy the official file there or run with network access"
            if not check_integrity(str(path), md5):
                return f"{path} fails its md5 check (expected {md5}) and no good copy could be downloaded"
        return f"could not load {self.name} from {self.data_dir}: {str(err).splitlines()[0]}"

    def _describe_unreadable_data(self, err: Exception) -> str:
        extracted = sorted(f.name for f in self.raw_dir.glob("*") if f.suffix != ".gz")
        return (
            f"the extracted {self.name} files in {self.raw_dir} cannot be read ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'a bad header'}); delete {', '.join(extracted) or 'them'} "
            "(keep the .gz files) to extract them again"
        )

    def split_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Disjoint (train, val) indices into the official training set, fixed by the seed."""
        order = torch.randperm(self.train_pool, generator=torch.Generator().manual_seed(self.seed))
        return order[self.n_val : self.n_val + self.n_train], order[: self.n_val]

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        train_idx, val_idx = self.split_indices()
        if self.loader == "torch":
            tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((self.mean,), (self.std,))])
            a = self.augment
            shift, zoom = a.translate / 28, a.zoom
            affine = transforms.RandomAffine(a.rotate, (shift, shift), (1 - zoom, 1 + zoom) if zoom else None)
            augment = [affine] if shift or a.rotate or zoom else []
            augment += [transforms.RandomHorizontalFlip()] if a.flip else []
            train_tf = transforms.Compose([*augment, tf])
            train_set = self.dataset_cls(str(self.data_dir), train=True, transform=train_tf)
            eval_set = self.dataset_cls(str(self.data_dir), train=True, transform=tf)
            test_set = self.dataset_cls(str(self.data_dir), train=False, transform=tf)
            self._splits = {"train": Subset(train_set, train_idx), "val": Subset(eval_set, val_idx), "test": test_set}
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        train, test = self._read(train=True), self._read(train=False)
        # sliced before they are normalised: a sweep's tiny trials do not convert all 60k images each
        self._splits = {
            "train": self._normalise(*(t[train_idx] for t in train), device),
            "val": self._normalise(*(t[val_idx] for t in train), device),
            "test": self._normalise(*test, device),
        }

    def load_tensors(self, train: bool, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The whole official split as normalised N×1×28×28 floats and int64 labels on `device`."""
        return self._normalise(*self._read(train), device)

    def _read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The official split's uint8 images and labels, read once per process (shared: never to be changed)."""
        key = (*self._files(), train)
        if key not in _READ:
            ds = self.dataset_cls(str(self.data_dir), train=train)
            _READ[key] = ds.data, ds.targets
        return _READ[key]

    def _normalise(
        self, data: torch.Tensor, targets: torch.Tensor, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = data.to(device).unsqueeze(1).float().div_(255).sub_(self.mean).div_(self.std)
        return images, targets.to(device, copy=True)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader | DeviceLoader:
        data = self._splits[split]
        if self.loader == "torch":
            return DataLoader(
                data,
                batch_size=batch_size,
                shuffle=shuffle,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=torch.cuda.is_available(),
            )
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = EpochSampler(len(data[1]), shuffle, self.seed, rank, world, even=shuffle)
        if split != "train":
            return DeviceLoader(*data, batch_size, sampler)
        # one step per call where Lightning's counts must mean batches: DDP synchronises gradients once per
        # forward of the wrapped module, and limit_train_batches=N (fast_dev_run too) counts calls
        counted = self.trainer is not None and is_int(self.trainer.limit_train_batches)
        steps = 1 if world > 1 or counted else self.steps_per_call
        return DeviceLoader(*data, batch_size, sampler, self.augment, steps)

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split (`train`, `val` or `test`) whole, as normalised N×1×28×28 images and labels: as the device
        loader holds them (on the device), or for the torch loader read again, on the CPU."""
        if self.loader == "device" and self._splits:
            return self._splits[split]
        images, labels = self.load_tensors(train=split != "test")
        if split == "test":
            return images, labels
        index = self.split_indices()[0 if split == "train" else 1]
        return images[index], labels[index]

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader | DeviceLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)


def shipped(name: str, **kwargs: Any) -> DigitsDataModule:
    """A dataset as its config in `digits/conf/data/<name>.yaml` describes it, with `kwargs` set, and no
    training augmentation (the one its defaults list takes from `augment/` is left out)."""
    from omegaconf import OmegaConf

    from digits.config import CONF_DIR, build

    def load(name: str) -> Any:  # the file and the data files its defaults list names, as Hydra merges them
        node = OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml")
        parents = [d for d in node.pop("defaults", []) if d != "_self_" and not d.startswith("/")]
        return OmegaConf.merge(*(load(parent) for parent in parents), node)

    return build(load(name), "data", **{"data_dir": "data", "seed": 0, **kwargs})


def _dataset_class(dataset: str | type[MNIST]) -> type[MNIST]:
    """The torchvision class a config names; it must read MNIST's IDX format (a subclass of `MNIST`)."""
    cls = named_class(dataset, MNIST) if isinstance(dataset, str) else dataset
    ok = isinstance(cls, type) and issubclass(cls, MNIST)
    require(ok, "dataset", dataset, "a torchvision dataset class in MNIST's format (MNIST, FashionMNIST, KMNIST, …)")
    return cls


def _check_count(name: str, value: Any) -> None:
    require(is_int(value) and value >= 1, name, value, "an integer ≥ 1")


def _split_size(name: str, value: int | float, pool: int, upper: int) -> int:
    """A count, or a fraction of `pool`, between 1 and `upper` images."""
    count = round(value * pool) if isinstance(value, float) and 0 < value <= 1 else value
    ok = isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= upper
    require(ok, name, value, f"a count from 1 to {upper} or a fraction in (0, 1] of {pool} images")
    return count
