"""One training run: seed → instantiate → fit → test → metrics.json → the value a sweeper optimises."""

import ctypes
import functools
import logging
import os
import re
import signal
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from digits.artifacts import (
    check_weights,
    checkpoint_record,
    discarded_on_error,
    load_checkpoint,
    package_versions,
    write_json,
)
from digits.callbacks import EpochTimer, Robustness, RunRecord
from digits.config import SWEEP_RUNS, build, check_run, requeued, resume_checkpoint
from digits.errors import DigitsError
from digits.hparams import hyperparameters, write_tensorboard
from digits.module import Classifier

log = logging.getLogger(__name__)


# Lightning's warnings that do not apply to digits runs, silenced where they are raised
UNDERSTOOD_WARNINGS = (
    "The `srun` command is available",  # submitit starts SLURM jobs through srun; outside SLURM none is needed
    "The number of training batches",  # metrics are logged per epoch: the step interval does not apply
    "`isinstance(treespec, LeafSpec)` is deprecated",  # inside Lightning, about torch's API
    "Precision bf16-mixed is not supported by the model summary",  # mixed precision keeps fp32 weights: as it counts
)
ADVERTISEMENT = "💡 Tip:"  # Lightning's pointer to its cloud logger, logged by every fit


@functools.cache
def configure_process() -> None:
    """What holds for the whole process, set once (a sweep's trials share it): the allocator, Lightning's NVML
    probe, the warnings that do not apply, each Lightning notice printed once."""
    # Lightning sets this at import: every torch.cuda.is_available() (Adam asks on each step) would dlopen
    # NVML again on a machine without a GPU; torch's own check is cached and just as exact here
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    keep_freed_memory()
    for message in UNDERSTOOD_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message))
    notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    notices.addFilter(lambda record: not record.getMessage().startswith(ADVERTISEMENT))
    if logging.getLogger().handlers:  # Hydra's: they print and file Lightning's notices, which it printed again
        lightning = logging.getLogger("lightning")
        for handler in [h for h in lightning.handlers if type(h) is logging.StreamHandler]:
            lightning.removeHandler(handler)


def configure_backends() -> None:
    """TF32 matmuls and cuDNN autotuning: free speed for fixed-shape batches on CUDA. Under SLURM, as many
    CPU threads as the job was given cores, not as the node has (jobs sharing a node would fight over them)."""
    configure_process()
    if cores := os.environ.get("SLURM_CPUS_PER_TASK"):
        torch.set_num_threads(int(cores))
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """glibc's malloc hands each step's freed activations (tens of MB) back to the OS and faults them in again
    on the next step; with large trim and mmap thresholds it keeps them for reuse. The same as starting with
    MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ set; a no-op where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 256 << 20)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def build_module(cfg: DictConfig) -> Classifier:
    net = build(cfg.model, "model")
    if cfg.get("compile"):
        net.compile()  # in place: checkpoints keep the plain parameter names
    scheduler = cfg.get("scheduler")
    return Classifier(
        net,
        optimizer=build(cfg.optimizer, "optimizer"),
        scheduler=build(scheduler.factory, "scheduler.factory") if scheduler else None,
        scheduler_interval=scheduler.interval if scheduler else "epoch",
    )


def build_trainer(cfg: DictConfig, record: dict[str, Any], quiet: bool = False) -> L.Trainer:
    """The configured Trainer; `quiet` (a multirun's job) drops the progress bar and model summary unless the
    trainer config asks for them."""
    loggers = [build(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()]
    bar = not quiet or cfg.trainer.get("enable_progress_bar", False)
    nodes = {name: node for name, node in (cfg.get("callbacks") or {}).items() if bar or name != "progress_bar"}
    callbacks = [build(node, f"callbacks.{name}") for name, node in nodes.items()]
    callbacks += [EpochTimer(), RunRecord(record)]
    if cfg.get("optuna") and cfg.optuna.get("trial") is not None:  # a sweep's trial: Optuna only then
        from digits.trials import pruning_callback

        if pruner := pruning_callback(cfg.optuna):
            callbacks.append(pruner)
    quieted = {k: False for k in ("enable_progress_bar", "enable_model_summary") if quiet and k not in cfg.trainer}
    return build(cfg.trainer, "trainer", logger=loggers or False, callbacks=callbacks, **quieted)


def check_checkpoint(path: str, module: Classifier, dataset: str | None = None) -> dict[str, Any]:
    """A checkpoint must load safely, hold weights of exactly this model's shapes, and come from `dataset`.

    Returns the loaded checkpoint, so callers need not read the file again.
    """
    checkpoint = load_checkpoint(path)
    check_weights(path, checkpoint, module.state_dict())
    trained_on = checkpoint_record(checkpoint).get("dataset")
    if dataset and trained_on and trained_on != dataset:
        raise DigitsError(f"ckpt_path={path!r} was trained on {trained_on}; this run's data is {dataset}")
    return checkpoint


def run_record(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """What every checkpoint of the run carries, so that it can be rebuilt and used with nothing beside it."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("optuna", None)  # which trial of which study: not needed to rebuild the model
    return {
        "config": config,
        "dataset": datamodule.name,
        "data": {"mean": datamodule.mean, "std": datamodule.std, "classes": datamodule.class_names},
        "versions": package_versions(),
    }


def train(cfg: DictConfig, quiet: bool = False) -> dict[str, Any]:
    """Fit and test the configured model; returns the metrics also written to `metrics.json`. `quiet`: no
    progress bar, model summary or Lightning notices (a multirun's job)."""
    check_run(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    configure_backends()
    run_dir = Path(cfg.paths.output_dir)
    datamodule = build(cfg.data, "data")
    module = build_module(cfg)
    ckpt_path = cfg.get("ckpt_path") or ("last" if requeued() else None)
    if ckpt_path == "last":
        ckpt_path = resume_checkpoint(run_dir)
        if ckpt_path is None:
            log.info(f"ckpt_path=last: no unfinished run of these settings; starting {run_dir}")
    if ckpt_path:
        check_checkpoint(str(ckpt_path), module, datamodule.name)
        log.info(f"resuming from {ckpt_path}")
    record = run_record(cfg, datamodule)
    trainer = build_trainer(cfg, record, quiet)
    if trainer.is_global_zero:
        write_json(run_dir / "versions.json", record["versions"])

    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # Lightning's is a SystemExit with code 0: a scheduler must not take it for success
        log.warning(f"stopped by SIGTERM; {run_dir}/checkpoints/last.ckpt holds the run: resume with ckpt_path=last")
        raise SystemExit(128 + signal.SIGTERM) from None
    train_seconds = time.perf_counter() - start

    timer = next(cb for cb in trainer.callbacks if isinstance(cb, EpochTimer))
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    robustness = next((cb for cb in trainer.callbacks if isinstance(cb, Robustness)), None)
    metrics = run_test(trainer, module, datamodule, best) if cfg.test else skip_test(trainer, module, best, robustness)
    metrics |= {
        "best_val_acc": module.best_val_acc if module.best_val_acc is not None else float("nan"),
        "params": module.num_parameters,
        "epochs": trainer.current_epoch,
        "train_seconds": train_seconds,
        "epoch_seconds": timer.seconds,
        "samples_per_second": timer.samples / sum(timer.seconds) if timer.seconds else 0.0,
        "device": device_name(trainer.strategy.root_device),
        "precision": str(trainer.precision),
        "compiled": bool(cfg.get("compile")),
        "data": datamodule.name,
        "train_size": datamodule.n_train,
        "model": type(module.net).__name__,
        "best_checkpoint": best,
    }
    if robustness and robustness.results:
        metrics["robustness"] = robustness.results
    if trainer.is_global_zero:
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        hparams = hyperparameters(cfg, choices, module.num_parameters)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                write_tensorboard(logger.experiment, hparams)
            else:
                logger.log_hyperparams(hparams)
            logger.save()
        write_json(run_dir / "metrics.json", metrics)
        log.info(summary(metrics, str(run_dir)))
    return metrics


def run_test(trainer: L.Trainer, module: Classifier, datamodule: L.LightningDataModule, best: str) -> dict[str, float]:
    """The test stage on the best-validation checkpoint (the last weights without one): the test set, read once."""
    tested = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)[0]
    return {
        "test_acc": tested["test/acc"],
        "test_error_pct": 100 * (1 - tested["test/acc"]),
        "test_loss": tested["test/loss"],
        "test_mse": tested["test/mse"],
    }


def skip_test(trainer: L.Trainer, module: Classifier, best: str, robustness: Robustness | None) -> dict[str, Any]:
    """`test=false`: no test image is read; the robustness suite, if on, scores the best checkpoint on the
    validation images, logged at the step the test stage would have used."""
    if robustness is not None:
        if best:
            module.load_state_dict(load_checkpoint(best)["state_dict"])
        module.eval()
        with torch.no_grad():  # in full precision, as the test stage's epoch-end hook runs it
            logged = robustness.measure(trainer, module, ("val",))
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.current_epoch)
    return {}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def summary(m: dict[str, Any], run_dir: str) -> str:
    return "\n".join(
        [
            f"{m['data']} · {m['model']} ({m['params']:,} params) · {m['epochs']} epochs",
            f"  device         {m['device']}, {m['precision']}",
            *(
                [
                    f"  test accuracy  {100 * m['test_acc']:.2f} %   (error {m['test_error_pct']:.2f} %)",
                    f"  test loss      {m['test_loss']:.4f}   MSE {m['test_mse']:.5f}",
                ]
                if "test_acc" in m
                else ["  test           not run (test=false)"]
            ),
            f"  best val acc   {100 * m['best_val_acc']:.2f} %",
            *(
                f"  robustness     {100 * r['mean']:.2f} % degraded {split} images"
                + (f", {100 * r['fonts']:.2f} % fonts" if "fonts" in r else "")
                for split, r in m.get("robustness", {}).items()
            ),
            f"  train time     {m['train_seconds']:.1f} s",
            f"  run dir        {run_dir}",
        ]
    )


def list_in_sweep(sweep_dir: Path, run_dir: Path) -> None:
    """Name a multirun job's run dir in its sweep's `runs.txt` (once: a job SLURM starts again is listed)."""
    listing = sweep_dir / SWEEP_RUNS
    if requeued() and listing.is_file() and str(run_dir) in listing.read_text().splitlines():
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(listing, "a") as f:  # one short append per job: jobs finishing together do not mix lines
        f.write(f"{run_dir}\n")


@contextmanager
def console_quiet() -> Iterator[None]:
    """A multirun's job logs to its run's train.log only, warnings aside: the sweep's console keeps one line
    per trial."""
    consoles = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    levels = [h.level for h in consoles]
    lightning = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    lightning_levels = [lg.level for lg in lightning]
    for handler in consoles:
        handler.setLevel(logging.WARNING)
    for lg in lightning:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler, level in zip(consoles, levels, strict=True):
            handler.setLevel(level)
        for lg, level in zip(lightning, lightning_levels, strict=True):
            lg.setLevel(level)


def run(cfg: DictConfig) -> float:
    """The Hydra task: train, and return best val accuracy for a sweeper to maximise.

    A single run that fails before it has a checkpoint leaves no run dir behind, whatever the error;
    the entry point prints a user's mistake as one line and a bug as a traceback. In a multirun the
    error goes to the sweeper, which records the job as failed and keeps its dir.
    """
    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN:
        list_in_sweep(Path(hydra.sweep.dir), Path(cfg.paths.output_dir))
        with console_quiet():
            return train(cfg, quiet=True)["best_val_acc"]
    with discarded_on_error(Path(cfg.paths.output_dir), Path(cfg.paths.log_dir)):
        return train(cfg)["best_val_acc"]
