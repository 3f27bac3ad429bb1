"""One training run: seed → instantiate → fit → test → metrics.json → the value a sweeper optimises."""

import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from digits.callbacks import EpochTimer
from digits.config import build
from digits.errors import DigitsError
from digits.module import Classifier
from digits.trials import pruning_callback

log = logging.getLogger(__name__)


def configure_backends() -> None:
    """TF32 matmuls and cuDNN autotuning: free speed for fixed-shape batches on CUDA."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True


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


def build_trainer(cfg: DictConfig) -> L.Trainer:
    loggers = [build(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()]
    callbacks = [build(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()]
    callbacks.append(EpochTimer())
    if pruner := pruning_callback(cfg.get("optuna")):
        callbacks.append(pruner)
    return build(cfg.trainer, "trainer", logger=loggers or False, callbacks=callbacks)


def hyperparameters(cfg: DictConfig, num_parameters: int) -> dict[str, Any]:
    """What the TensorBoard HParams tab compares runs by: choices, then every model/optimizer key."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    params: dict[str, Any] = {
        g: choices.get(g) or "" for g in ("experiment", "data", "model", "optimizer", "scheduler")
    }
    params |= {"seed": cfg.seed, "params": num_parameters, "max_epochs": cfg.trainer.max_epochs}
    if cfg.get("optuna") and cfg.optuna.trial is not None:
        params |= {"optuna.study": cfg.optuna.study_name, "optuna.trial": cfg.optuna.trial}
    data_keys = ("batch_size", "val_size", "train_size", "loader", "translate", "rotate", "zoom", "flip")
    params |= {f"data.{k}": cfg.data[k] for k in data_keys}
    for group in ("model", "optimizer"):
        params |= {f"{group}.{k}": v for k, v in cfg[group].items() if not k.startswith("_")}
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}


def resume_checkpoint(ckpt_path: str | None, run_dir: Path) -> str | None:
    """`last`: the newest last.ckpt or SLURM hpc checkpoint of this run dir (None: start afresh)."""
    if ckpt_path != "last":
        return ckpt_path
    found = [*(run_dir / "checkpoints").glob("last*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    if not found:
        log.info(f"ckpt_path=last: no checkpoint of an unfinished run in {run_dir}; starting from scratch")
        return None
    return str(max(found, key=os.path.getmtime))


def check_checkpoint(path: str, module: Classifier, dataset: str | None = None) -> dict[str, Any]:
    """A checkpoint must exist, load, hold weights of exactly this model's shapes, and come from `dataset`.

    Returns the loaded checkpoint, so callers need not read the file again.
    """
    if not Path(path).is_file():
        raise DigitsError(f"ckpt_path={path!r} is not allowed; expected an existing checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        state = checkpoint["state_dict"]
    except Exception as err:
        raise DigitsError(
            f"ckpt_path={path!r} is not a readable checkpoint ({type(err).__name__}); truncated?"
        ) from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        diff = sorted(set(found.items()) ^ set(expected.items()))[:2]
        raise DigitsError(f"ckpt_path={path!r} holds a different model than model=… here (first differences: {diff})")
    trained_on = checkpoint.get("dataset")
    if dataset and trained_on and trained_on != dataset:
        raise DigitsError(f"ckpt_path={path!r} was trained on {trained_on}; this run's data is {dataset}")
    return checkpoint


def package_versions() -> dict[str, str]:
    names = ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "omegaconf", "optuna", "numpy")
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test the configured model; returns the metrics also written to `metrics.json`."""
    L.seed_everything(cfg.seed, workers=True)
    configure_backends()
    run_dir = Path(cfg.paths.output_dir)
    datamodule = build(cfg.data, "data")
    module = build_module(cfg)
    ckpt_path = resume_checkpoint(cfg.get("ckpt_path"), run_dir)
    if ckpt_path:
        check_checkpoint(ckpt_path, module, datamodule.name)
    trainer = build_trainer(cfg)
    if trainer.is_global_zero:
        write_json(run_dir / "versions.json", package_versions())

    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's is a SystemExit with code 0: a scheduler must not take it for success
        log.warning(f"stopped by SIGTERM; {run_dir}/checkpoints/last.ckpt holds the run: resume with ckpt_path=last")
        raise SystemExit(128 + signal.SIGTERM) from None
    train_seconds = time.perf_counter() - start

    timer = next(cb for cb in trainer.callbacks if isinstance(cb, EpochTimer))
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    tested = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)[0]
    metrics = {
        "test_acc": tested["test/acc"],
        "test_error_pct": 100 * (1 - tested["test/acc"]),
        "test_loss": tested["test/loss"],
        "test_mse": tested["test/mse"],
        "best_val_acc": float(module.val_acc_best.compute()),
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
    if trainer.is_global_zero:
        hparams = hyperparameters(cfg, module.num_parameters)
        hp_metrics = {f"hp/{k}": metrics[k] for k in HP_METRICS}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # its HPARAMS tab pairs these metrics with the run
                logger.log_hyperparams(hparams, hp_metrics)
            else:
                logger.log_hyperparams(hparams)
                logger.log_metrics(hp_metrics)
            logger.save()
        write_json(run_dir / "metrics.json", metrics)
        log.info(summary(metrics, str(run_dir)))
    return metrics


HP_METRICS = ("best_val_acc", "test_acc", "test_loss", "test_mse")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write via a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def summary(m: dict[str, Any], run_dir: str) -> str:
    return "\n".join(
        [
            f"{m['data']} · {m['model']} ({m['params']:,} params) · {m['epochs']} epochs",
            f"  device         {m['device']}, {m['precision']}",
            f"  test accuracy  {100 * m['test_acc']:.2f} %   (error {m['test_error_pct']:.2f} %)",
            f"  test loss      {m['test_loss']:.4f}   MSE {m['test_mse']:.5f}",
            f"  best val acc   {100 * m['best_val_acc']:.2f} %",
            f"  train time     {m['train_seconds']:.1f} s",
            f"  run dir        {run_dir}",
        ]
    )


def run(cfg: DictConfig) -> float:
    """The Hydra task: train, and return best val accuracy for a sweeper to maximise.

    A user mistake in a single run ends with one line on stderr and no run dir left behind;
    in a multirun it is raised, so the sweeper records the job as failed.
    """
    try:
        return train(cfg)["best_val_acc"]
    except DigitsError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        discard_unfinished_run(Path(cfg.paths.output_dir), Path(cfg.paths.log_dir))
        sys.exit(f"error: {err}")


def discard_unfinished_run(run_dir: Path, log_root: Path) -> None:
    """Remove a run dir that holds nothing of value (no checkpoint, no metrics), and empty parents."""
    if run_dir.resolve() == log_root.resolve() or log_root.resolve() not in run_dir.resolve().parents:
        return
    if (run_dir / "metrics.json").exists() or any((run_dir / "checkpoints").glob("*.ckpt")):
        return
    logging.shutdown()
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:
        if parent.resolve() == log_root.resolve() or any(parent.iterdir()):
            break
        parent.rmdir()
