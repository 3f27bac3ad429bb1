"""Glue between `conf/` and the package: resolvers the configs use, and building objects from nodes."""

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from digits.errors import DigitsError, require

ROOT = Path(__file__).resolve().parents[2]  # the checkout: conf/, data/ and logs/ live here
CONF_DIR = ROOT / "conf"


def auto_precision() -> str:
    """bf16 autocast where the GPU has bf16, full fp32 elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _tag(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "-".join(_tag(v) for v in value)
    return str(value)


def run_name(*, _root_: DictConfig) -> str:
    """A directory name that says data, model and the key hyperparameters of a run."""
    cfg, choices = _root_, _root_.hydra.runtime.choices
    parts = [choices.get("experiment") or "", choices.data, choices.model, "h" + _tag(cfg.model.hidden_size)]
    if "kernel_size" in cfg.model:
        parts.append("k" + _tag(cfg.model.kernel_size))
    parts += [f"bs{_tag(cfg.data.batch_size)}", f"{choices.optimizer}{_tag(cfg.optimizer.lr)}"]
    if cfg.optimizer.get("weight_decay"):
        parts.append("wd" + _tag(cfg.optimizer.weight_decay))
    parts += [f"ep{_tag(cfg.trainer.max_epochs)}", f"seed{_tag(cfg.seed)}"]
    return "_".join(p for p in parts if p).replace("/", "-")


_run_dirs: dict[tuple[str, bool], str] = {}  # Hydra and Lightning's DDP launcher ask several times: one answer


def run_dir(*, _root_: DictConfig) -> str:
    """A new timestamped dir; with `ckpt_path=last`, the newest unfinished run of the same name, to go on in."""
    runs = Path(_root_.paths.log_dir) / "runs" / run_name(_root_=_root_)
    resume = _root_.get("ckpt_path") == "last"
    if (str(runs), resume) not in _run_dirs:
        unfinished = [d for d in runs.glob("*") if (d / "checkpoints").is_dir() and not (d / "metrics.json").exists()]
        chosen = max(unfinished, key=lambda d: d.name) if resume and unfinished else None
        _run_dirs[str(runs), resume] = str(chosen or runs / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    return _run_dirs[str(runs), resume]


def register_resolvers() -> None:
    resolvers = {
        "digits.root": lambda: str(ROOT),
        "digits.precision": auto_precision,
        "digits.run_name": run_name,
        "digits.run_dir": run_dir,
    }
    for name, fn in resolvers.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, with a constructor's `DigitsError` re-raised under the config key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, DigitsError):
            raise DigitsError(f"{key}.{err.__cause__}") from None
        raise


def check_choices(args: list[str]) -> None:
    """Name an unknown `group=option` in one line, ahead of Hydra's multi-line composition error."""
    groups = {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in CONF_DIR.iterdir() if d.is_dir()}
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except HydraException:
        return  # not ours to judge: Hydra reports its own syntax errors
    for override in overrides:
        group = override.key_or_group
        if group not in groups or override.is_delete():
            continue
        chosen = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in chosen:
            require(value is None or str(value) in groups[group], group, value, f"one of {groups[group]}")


register_resolvers()
