"""Glue between `conf/` and the package: resolvers the configs use, and building objects from nodes."""

from __future__ import annotations

import functools
import importlib.resources
import math
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from digits.errors import DigitsError, is_int, is_number, require
from digits.models import MLP

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CONF_DIR = Path(__file__).resolve().parent / "conf"  # the configs ship inside the package
MLP_TARGET = f"{MLP.__module__}.{MLP.__qualname__}"


def root_dir() -> str:
    """Where `data/` and `logs/` go by default: $DIGITS_ROOT (a checkout's scripts set it to the checkout),
    else the current directory."""
    return os.environ.get("DIGITS_ROOT") or os.getcwd()


def cpu_has_fast_bf16(capabilities: Mapping[str, Any] | None = None) -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86 AVX512-BF16 or AMX, Arm's BF16 extension);
    elsewhere bf16 is emulated and slower than fp32."""
    caps = torch.cpu.get_capabilities() if capabilities is None else capabilities
    return any(caps.get(flag) for flag in ("avx512_bf16", "amx_bf16", "bf16"))


def auto_precision(accelerator: str = "auto", model: str | None = None, cpu_bf16: bool | str = "auto") -> str:
    """bf16 autocast on the trainer's device where it computes bf16 in hardware (a GPU with bf16, a CPU with
    `cpu_has_fast_bf16`), full fp32 elsewhere. On such a CPU `cpu_bf16` decides: `auto` takes bf16 for any
    model but an MLP (`model` is the model's `_target_`), whose small matmuls mostly run faster in fp32 there
    (README); true takes it for any model (a large MLP measured in it); false for none (a preset that lost
    accuracy in bf16 on a CPU)."""
    require(isinstance(cpu_bf16, bool) or cpu_bf16 == "auto", "cpu_bf16", cpu_bf16, "true, false or auto")
    accelerator = str(accelerator)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    wanted = cpu_bf16 is True or (cpu_bf16 == "auto" and model != MLP_TARGET)
    fast = wanted and accelerator in ("auto", "cpu") and cpu_has_fast_bf16()
    return "bf16-mixed" if fast else "32-true"


def _tag(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "-".join(_tag(v) for v in value)
    return str(value)


NAME_TAGS = {  # how a key shows in a run's name
    "model.hidden_size": "h", "model.kernel_size": "k", "data.batch_size": "bs",
    "optimizer.weight_decay": "wd", "trainer.max_epochs": "ep", "seed": "seed",
}  # fmt: skip
NAMELESS = ("optuna.", "hydra.", "paths.", "ckpt_path", "test", "logger", "callbacks", "debug", "hparams_search")


def name_part(key: str, value: Any, choice: bool = False) -> str:
    """One key's piece of a run name: a group's `choice` as itself, a key by its tag (or last name) and value."""
    if choice:
        return _tag(value)
    return NAME_TAGS.get(key, key.rsplit(".", 1)[-1] + "-") + _tag(value)


NAME_ORDER = (
    "experiment", "data", "model", "model.hidden_size", "model.kernel_size", "data.batch_size", "optimizer",
    "optimizer.lr", "optimizer.weight_decay", "trainer.max_epochs", "seed",
)  # fmt: skip


def swept_keys(hydra: DictConfig) -> set[str]:
    """The keys a multirun varies: its sweeper's search space and the sweeps on its command line (as saved in
    the sweep dir's multirun.yaml); none in a single run."""
    if str(hydra.get("mode")) != "RunMode.MULTIRUN":
        return set()
    keys = set((hydra.sweeper.get("params") or {}).keys())
    saved = Path(str(hydra.sweep.dir)) / "multirun.yaml"
    if saved.is_file():
        keys |= _command_line_sweeps(str(saved), saved.stat().st_mtime_ns)
    return {k.lstrip("+~") for k in keys}


@functools.lru_cache(maxsize=8)
def _command_line_sweeps(saved: str, mtime_ns: int) -> frozenset[str]:
    """The swept keys of a multirun's command line, parsed once per process and version of its record (Hydra's
    override parser costs about 0.1 s, paid by every trial otherwise)."""
    try:
        lines = OmegaConf.load(saved).hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides(list(lines))
    except (HydraException, OSError, ValueError):
        return frozenset()  # an unreadable record only costs the name its order
    return frozenset(o.get_key_element() for o in parsed if o.is_sweep_override())


def run_name(*, _root_: DictConfig) -> str:
    """A directory name that says data, model and the key hyperparameters of a run: first the keys a multirun
    sweeps, then the other keys the command line gave, then the rest. Where TensorBoard cuts a name short,
    what sets runs apart still shows; the same command gives the same name whatever its keys' order."""
    cfg, choices = _root_, _root_.hydra.runtime.choices
    standard = {k: name_part(k, choices.get(k), choice=True) for k in ("experiment", "data", "model") if choices.get(k)}
    for key in ("model.hidden_size", "model.kernel_size"):  # a model of one's own may have neither
        if key.split(".")[1] in cfg.model:
            standard[key] = name_part(key, OmegaConf.select(cfg, key))
    standard["data.batch_size"] = name_part("data.batch_size", cfg.data.batch_size)
    standard["optimizer"] = f"{choices.optimizer}{_tag(cfg.optimizer.lr)}"
    if cfg.optimizer.get("weight_decay"):
        standard["optimizer.weight_decay"] = name_part("optimizer.weight_decay", cfg.optimizer.weight_decay)
    standard["trainer.max_epochs"] = name_part("trainer.max_epochs", cfg.trainer.max_epochs)
    standard["seed"] = name_part("seed", cfg.seed)
    given: dict[str, str] = {}
    for line in map(str, _root_.hydra.overrides.task):
        key = line.split("=", 1)[0].lstrip("+~")
        if "=" in line and not key.startswith(NAMELESS):
            value = choices.get(key) if key in choices else OmegaConf.select(cfg, key, default=None)
            # the optimizer's name with its rate, whichever of the two was given
            optimizer = key in ("optimizer", "optimizer.lr")
            given[key] = standard["optimizer"] if optimizer else name_part(key, value, key in choices)
    swept = swept_keys(_root_.hydra)

    def rank(key: str) -> tuple[bool, int, str]:
        return key not in swept, NAME_ORDER.index(key) if key in NAME_ORDER else len(NAME_ORDER), key

    parts = dict.fromkeys([*(given[k] for k in sorted(given, key=rank)), *standard.values()])
    return re.sub(r"[^\w.+-]", "-", "_".join(p for p in parts if p))


def evaluated_name(*, _root_: DictConfig) -> str:
    """What an eval run is named after: the run and checkpoint it evaluates (`<run name>_<time>_<checkpoint>`
    for a checkpoint in a run's `checkpoints/`), else the checkpoint file's name."""
    if OmegaConf.is_missing(_root_, "ckpt_path"):
        return "checkpoint"  # the task names the missing key in one line
    ckpt = Path(str(_root_.ckpt_path))
    parts = [ckpt.stem]
    if ckpt.parent.name == "checkpoints":
        run = ckpt.parent.parent
        parts = [run.parent.name, run.name, *parts]
    return "_".join(p for p in parts if p).replace(" ", "-") or "checkpoint"


_stamp: str | None = None


def stamp() -> str:
    """This process's run id: the start time, SLURM's job (and array task) id where there is one, and the pid.

    Two runs started in the same second, by job-array workers or from two shells, never share a dir.
    """
    global _stamp
    if _stamp is None:
        slurm = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        ids = [f"j{slurm}" + (f"_{task}" if task else "")] if slurm else []
        _stamp = "_".join([datetime.now().strftime("%Y-%m-%d_%H-%M-%S"), *ids, f"p{os.getpid()}"])
    return _stamp


# What makes a run the run it is: `ckpt_path=last` resumes only a run that agrees on every key of these
# (where the data lives and how the files are fetched may change between machines)
RUN_KEYS = ("seed", "model", "data", "optimizer", "scheduler", "trainer")
NOT_RUN_KEYS = frozenset({"data.data_dir", "data.download", "data.num_workers", "trainer.default_root_dir"})


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The run's settings as dotted keys with resolved values, each leaf resolved on its own."""
    settings: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, DictConfig):
            for key in node:
                walk(f"{prefix}.{key}", node._get_node(key))
        elif prefix not in NOT_RUN_KEYS:
            value = OmegaConf.select(cfg, prefix)
            settings[prefix] = OmegaConf.to_container(value) if isinstance(value, ListConfig | DictConfig) else value

    for key in RUN_KEYS:
        walk(key, cfg._get_node(key) if key in cfg else None)
    return settings


def differing_settings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(a.keys() | b.keys())
    return [f"{k}: {a.get(k, '(absent)')} → {b.get(k, '(absent)')}" for k in keys if a.get(k) != b.get(k)]


def requeued() -> bool:
    """This process is a SLURM job started again after preemption or `scontrol requeue`: it goes on from
    its last checkpoint as if given `ckpt_path=last`."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def resume_checkpoint(run: Path) -> Path | None:
    """The newest checkpoint a run can go on from: last.ckpt, or SLURM's requeue checkpoint."""
    found = [*(run / "checkpoints").glob("last*.ckpt"), *run.glob("hpc_ckpt_*.ckpt")]
    return max(found, key=os.path.getmtime) if found else None


def saved_settings(run: Path, checkpoint: Path) -> dict[str, Any]:
    """The settings a run was started with: from its checkpoint's record, or its `.hydra/config.yaml`."""
    from digits.artifacts import checkpoint_record, load_checkpoint

    config = checkpoint_record(load_checkpoint(checkpoint)).get("config")
    saved = OmegaConf.create(config) if config else OmegaConf.load(run / ".hydra" / "config.yaml")
    return run_settings(saved)


def resumable_run(runs: Path, cfg: DictConfig) -> Path | None:
    """The newest unfinished run of this name with a checkpoint and exactly this command's settings."""
    unfinished = sorted(
        (d for d in runs.glob("*") if not (d / "metrics.json").exists() and resume_checkpoint(d)), reverse=True
    )
    if not unfinished:
        return None
    wanted = run_settings(cfg)
    differences = {}
    for run in unfinished:
        differences[run] = differing_settings(saved_settings(run, resume_checkpoint(run)), wanted)
        if not differences[run]:
            return run
    newest = unfinished[0]
    raise DigitsError(
        f"ckpt_path=last found {newest}, an unfinished run with other settings ({'; '.join(differences[newest][:4])}); "
        "give the same settings to resume it, or leave out ckpt_path=last to start a new run"
    )


SWEEP_RUNS = "runs.txt"  # in a multirun's dir: its jobs' run dirs, one per line
_run_dirs: dict[tuple[str, bool], str] = {}  # Hydra and Lightning's DDP launcher ask several times: one answer


def run_dir(*, _root_: DictConfig) -> str:
    """A new dir per run; with `ckpt_path=last`, the newest unfinished run of the same settings, to go on in."""
    runs = Path(_root_.paths.log_dir) / "runs" / run_name(_root_=_root_)
    resume = _root_.get("ckpt_path") == "last" or (_root_.get("ckpt_path") is None and requeued())
    if (str(runs), resume) not in _run_dirs:
        chosen = resumable_run(runs, _root_) if resume else None
        _run_dirs[str(runs), resume] = str(chosen or runs / stamp())
    return _run_dirs[str(runs), resume]


def job_id(*, _root_: DictConfig) -> str:
    """A multirun job's part of its run dir's name: its Optuna trial (`trial<N>`) or its job number. Beside the
    sweep's stamp it names the same dir when SLURM starts the job again."""
    trial = (_root_.get("optuna") or {}).get("trial")
    return f"trial{trial}" if trial is not None else str(_root_.hydra.job.num)


def slurm_gpus(accelerator: str, devices: Any) -> int | None:
    """GPUs per SLURM task (`hydra/launcher=slurm`): the trainer's device count on a GPU accelerator, none
    otherwise."""
    if str(accelerator) not in ("gpu", "cuda"):
        return None
    return devices if is_int(devices) and devices >= 1 else 1


def register_resolvers() -> None:
    resolvers = {
        "digits.root": root_dir,
        "digits.precision": auto_precision,
        "digits.run_name": run_name,
        "digits.run_dir": run_dir,
        "digits.evaluated": evaluated_name,
        "digits.job": job_id,
        "digits.absolute": lambda path: os.path.abspath(str(path)),  # a multirun's subdir must not be relative
    }
    for name, fn in resolvers.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)
    OmegaConf.register_new_resolver("digits.slurm_gpus", slurm_gpus, replace=True)
    # cached like Hydra's `now`: a launcher's jobs (other processes) inherit the sweep dir's stamp
    OmegaConf.register_new_resolver("digits.stamp", stamp, replace=True, use_cache=True)


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, with a constructor's `DigitsError` re-raised under the config key."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, DigitsError):
            raise DigitsError(f"{key}.{err.__cause__}") from None
        raise


def check_run(cfg: DictConfig) -> None:
    """Values Lightning and torch would refuse with a traceback, hang on, or accept into an untrained run."""
    require(is_int(cfg.seed) and 0 <= cfg.seed < 2**32, "seed", cfg.seed, "an integer from 0 to 2**32 - 1")
    require(isinstance(cfg.get("test", True), bool), "test", cfg.get("test"), "true or false")
    epochs = cfg.trainer.get("max_epochs")
    require(is_int(epochs) and epochs >= 1, "trainer.max_epochs", epochs, "an integer ≥ 1")
    lr = cfg.optimizer.get("lr")
    ok_lr = is_number(lr) and math.isfinite(lr) and lr > 0
    require(ok_lr, "optimizer.lr", lr, "a finite number > 0")
    # digits.module.Classifier steps the optimizer itself (several steps per training batch): Lightning's
    # own clipping and accumulation do not reach those steps, and it refuses them with a traceback
    for key, off in (("gradient_clip_val", (None, 0)), ("accumulate_grad_batches", (None, 1))):
        value = cfg.trainer.get(key)
        require(value in off, f"trainer.{key}", value, f"it unset or {off[1]} (digits steps the optimizer itself)")
    check_devices(cfg.trainer)


def check_devices(trainer: DictConfig) -> None:
    """`trainer.devices` against what this machine has, before any process group starts (and waits forever)."""
    accelerator, devices = str(trainer.get("accelerator", "auto")), trainer.get("devices", "auto")
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and not gpus:
        raise DigitsError(
            f"trainer.accelerator={accelerator!r} is not allowed: this machine has no CUDA GPU; use trainer=cpu"
        )
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0)
    have, what = (gpus, "CUDA GPUs") if on_gpu else (os.cpu_count() or 1, "CPU cores")
    if devices in ("auto", -1, "-1"):
        return
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, ListConfig):
        ok = len(devices) >= 1 and all(is_int(d) and 0 <= d < have for d in devices)
    else:
        ok = is_int(devices) and 1 <= devices <= have
    require(ok, "trainer.devices", devices, f"'auto' or 1 to {have} (this machine's {what}), or a list of device ids")


VALUED_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun")


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """A Hydra command line as its flags (with their values) and its other arguments, each in order."""
    flags, rest, skip = [], [], False
    for arg in args:
        if skip or arg.startswith("-"):
            skip = not skip and arg in VALUED_FLAGS
            flags.append(arg)
        else:
            rest.append(arg)
    return flags, rest


def override_args(args: list[str]) -> list[str]:
    """The `key=value` overrides of a Hydra command line, without its flags and their values."""
    return split_args(args)[1]


def config_dirs(args: list[str]) -> list[Traversable]:
    """The config dirs Hydra composes from: the package's, then `--config-dir` and `hydra.searchpath` ones."""
    dirs: list[Traversable] = [importlib.resources.files("digits") / "conf"]
    for i, arg in enumerate(args):
        for flag in ("--config-dir", "-cd"):
            if arg == flag and i + 1 < len(args):
                dirs.append(Path(args[i + 1]))
            elif arg.startswith(flag + "="):
                dirs.append(Path(arg.split("=", 1)[1]))
    try:
        searchpath = [a for a in override_args(args) if a.startswith("hydra.searchpath=")]
        overrides = OverridesParser.create().parse_overrides(searchpath)
    except HydraException:
        overrides = []
    for override in overrides:
        for entry in override.value() or []:
            scheme, _, where = str(entry).rpartition("://")
            if scheme == "pkg":
                package, _, sub = where.partition("/")
                dirs.append(importlib.resources.files(package).joinpath(sub or "."))
            else:
                dirs.append(Path(where))
    return dirs


def check_choices(args: list[str]) -> None:
    """Name an unknown `group=option` in one line, ahead of Hydra's multi-line composition error, and ahead of
    a multirun's first job: every value of a swept group is checked before anything runs."""
    groups: dict[str, set[str]] = {}
    for conf in config_dirs(args):
        for group in conf.iterdir() if conf.is_dir() else []:
            if group.is_dir():
                options = {f.name.removesuffix(".yaml") for f in group.iterdir() if f.name.endswith(".yaml")}
                groups.setdefault(group.name, set()).update(options)
    try:
        overrides = OverridesParser.create().parse_overrides(override_args(args))
    except HydraException:
        return  # not ours to judge: Hydra reports its own syntax errors
    for override in overrides:
        group = override.key_or_group
        if group not in groups or override.is_delete():
            continue
        chosen = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        allowed = sorted(groups[group])
        for value in chosen:
            require(value is None or str(value) in groups[group], group, value, f"one of {allowed}")


register_resolvers()
