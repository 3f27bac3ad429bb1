"""What a run leaves behind and what reads it back: checkpoints (loaded without running any code in them),
JSON files written atomically, and the versions of the packages a run used."""

import functools
import importlib.metadata
import json
import logging
import os
import pickle
import platform
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from digits.config import build
from digits.errors import DigitsError, named_class

RECORD = "digits"  # the checkpoint key holding the run's resolved config, dataset and package versions


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file as plain data: tensors, numbers, strings and containers, never arbitrary objects.

    `weights_only=True` refuses any pickled class or function outside torch's allow-list, so nothing in a
    hostile file runs; our own checkpoints need nothing beyond it (a test loads one of every recipe).
    """
    if not Path(path).is_file():
        raise DigitsError(f"ckpt_path={str(path)!r} is not allowed; expected an existing checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if not found:  # bytes that are no pickle at all: an image or a text file given by mistake
            what = "not a file torch.save wrote"
            raise DigitsError(f"ckpt_path={str(path)!r} is not a readable checkpoint ({what})") from None
        raise DigitsError(
            f"ckpt_path={str(path)!r} is refused: it holds a pickled {found.group(1)}, not only weights and plain "
            "data; nothing in it was run"
        ) from None
    except Exception as err:
        what = type(err).__name__
        raise DigitsError(f"ckpt_path={str(path)!r} is not a readable checkpoint ({what}); truncated?") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DigitsError(f"ckpt_path={str(path)!r} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def checkpoint_record(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a digits checkpoint says about its run: `config`, `dataset`, `versions` (older ones: `dataset` only)."""
    record = checkpoint.get(RECORD)
    if isinstance(record, dict):
        return record
    return {"dataset": checkpoint.get("dataset")}


def check_weights(
    path: str | Path, checkpoint: dict[str, Any], state: dict[str, torch.Tensor], against: str = "model=… here"
) -> None:
    """The checkpoint's weights have exactly the names and shapes of `state` (the model built here)."""
    expected = {k: tuple(v.shape) for k, v in state.items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}
    if found != expected:
        diff = sorted(set(found.items()) ^ set(expected.items()))[:2]
        raise DigitsError(f"ckpt_path={str(path)!r} holds a different model than {against} (first differences: {diff})")


def check_own_net(path: str | Path, checkpoint: dict[str, Any], model: DictConfig) -> None:
    """The checkpoint's weights fit the net its own config names (`model`, its `_target_` checked already), built
    on the meta device: a checkpoint from someone else may name a net of any size, whose parameters a real
    build would allocate before its weights were compared. A net that cannot be built there (its `__init__`
    computes with real tensors) is left to the check after its real build."""
    try:
        with torch.device("meta"):
            net = build(model, "model")
    except DigitsError:
        raise
    except Exception:
        return
    check_weights(path, checkpoint, {f"net.{k}": v for k, v in net.state_dict().items()}, "its config's model")


# What a checkpoint's config may build, key by key: classes of these kinds only. Hydra's own blocklist stops
# os.system, but a config could as well name pathlib.Path.unlink, torch.load or torch.hub.load.
BUILDS = {
    "model": "torch.nn.Module",
    "optimizer": "torch.optim.Optimizer",
    "scheduler": "torch.optim.lr_scheduler.LRScheduler",
    "data": "lightning.LightningDataModule",  # imported only to check a data node: predict builds none
}


def load_run(
    ckpt_path: str | Path, paths: DictConfig, builds: Iterable[str] = tuple(BUILDS)
) -> tuple[DictConfig, dict[str, Any]]:
    """A checkpoint (loaded safely) and the config of the run that wrote it: from the checkpoint itself, or
    for checkpoints older than that record, from the run's `.hydra/config.yaml` two folders up. The config's
    `builds` keys are checked (`check_targets`): those the caller will build."""
    checkpoint = load_checkpoint(ckpt_path)
    config = checkpoint_record(checkpoint).get("config")
    if config:
        cfg = OmegaConf.create(config)
    else:
        saved = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
        if not saved.is_file():
            raise DigitsError(
                f"ckpt_path={str(ckpt_path)!r} carries no config and has no {saved} beside it; "
                "expected a checkpoint of a digits run"
            )
        cfg = OmegaConf.load(saved)
    check_targets(cfg, ckpt_path, builds)
    cfg.paths = paths  # this machine's data and log dirs, not those of the run's
    cfg.data.data_dir = paths.data_dir
    return cfg, checkpoint


def check_targets(cfg: DictConfig, ckpt_path: str | Path, keys: Iterable[str]) -> None:
    """Every `_target_` under the `keys` of a checkpoint's config, nested ones included, names a class of the
    kind its key builds (`BUILDS`), outside the standard library: a checkpoint from someone else cannot make
    eval or predict call a function."""
    from hydra.utils import get_object

    for key in keys:
        try:
            node = OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) is not None else None
        except OmegaConfBaseException as err:
            raise DigitsError(f"ckpt_path={str(ckpt_path)!r} has a config whose {key} cannot be read ({err})") from None
        for target in targets(node):
            if named_class(target, get_object(BUILDS[key])) is None:
                raise DigitsError(
                    f"ckpt_path={str(ckpt_path)!r} is refused: its config builds {key} with {target!r}, which is "
                    f"not a {BUILDS[key]} class; nothing was built from it"
                )


def targets(node: Any) -> Iterable[Any]:
    """The `_target_` values anywhere in a config container."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from targets(value)


def package_versions() -> dict[str, str]:
    return dict(_installed_versions())


@functools.cache  # the metadata scan takes milliseconds a package, and a sweep's trials share the process
def _installed_versions() -> tuple[tuple[str, str], ...]:
    names = ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "omegaconf", "optuna", "numpy")
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return tuple(versions.items())


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write via a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@contextmanager
def discarded_on_error(run_dir: Path, log_root: Path) -> Iterator[None]:
    """Whatever goes wrong inside, a run dir holding nothing of value is removed before the error goes on."""
    try:
        yield
    except BaseException:
        discard_unfinished_run(run_dir, log_root)
        raise


def discard_unfinished_run(run_dir: Path, log_root: Path) -> None:
    """Remove a run dir that holds nothing of value (no checkpoint, no metrics), and its empty parents."""
    run_dir, log_root = run_dir.resolve(), log_root.resolve()
    if run_dir == log_root or log_root not in run_dir.parents or not run_dir.is_dir():
        return
    if (run_dir / "metrics.json").exists() or any((run_dir / "checkpoints").glob("*.ckpt")):
        return
    logging.shutdown()  # train.log is open in this dir
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:
        if parent == log_root or any(parent.iterdir()):
            break
        parent.rmdir()
