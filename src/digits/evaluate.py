"""Evaluate any checkpoint of a digits run on the test set; model and data come from the run's config."""

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from digits.artifacts import check_own_net, check_weights, write_json
from digits.callbacks import TAGS, Robustness, TestResults
from digits.config import build
from digits.module import Classifier
from digits.train import build_module, configure_process, device_name


def load_model(cfg: DictConfig, checkpoint: dict[str, Any], ckpt_path: str | Path) -> Classifier:
    check_own_net(ckpt_path, checkpoint, cfg.model)
    module = build_module(cfg)
    check_weights(ckpt_path, checkpoint, module.state_dict())
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def per_class_report(results: TestResults, class_names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class."""
    support = results.confusion.sum(1).tolist()
    columns = zip(class_names, *(results.per_class[k] for k in ("precision", "recall", "f1")), support, strict=True)
    return [{"class": c, "precision": p, "recall": r, "f1": f, "support": int(s)} for c, p, r, f, s in columns]


def most_confused(confusion: torch.Tensor, class_names: list[str], k: int = 5) -> list[dict[str, Any]]:
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(k)
    n = len(class_names)
    return [
        {"true": class_names[i // n], "predicted": class_names[i % n], "count": int(c)}
        for c, i in zip(counts.tolist(), flat.tolist(), strict=True)
        if c > 0
    ]


def evaluate(
    cfg: DictConfig, checkpoint: dict[str, Any], ckpt: Path, out_dir: Path, robustness: DictConfig | None = None
) -> dict[str, Any]:
    """Test the checkpoint; write metrics, confusion matrices, the per-class report and misclassified images,
    and with `robustness` (`size`, `fonts`) the robustness suite's accuracies."""
    from digits import figures

    configure_process()
    datamodule = build(cfg.data, "data")
    module = load_model(cfg, checkpoint, ckpt)
    results = TestResults(figures=False)
    robust = Robustness(("test",), **robustness) if robustness else None
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,  # save_figures writes this dir's TensorBoard events, figures and scalars in one file
        callbacks=[results, robust] if robust else [results],
        enable_progress_bar=False,
        enable_model_summary=False,
        precision=cfg.trainer.precision,
    )
    tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    cm, names = results.confusion, datamodule.class_names
    report = per_class_report(results, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "checkpoint": str(ckpt),
        "test_acc": tested["test/acc"],
        "test_error_pct": 100 * (1 - tested["test/acc"]),
        "test_loss": tested["test/loss"],
        "test_mse": tested["test/mse"],
        "test_size": int(cm.sum()),
        "device": device_name(trainer.strategy.root_device),
        "confusion_matrix": cm.tolist(),
        "most_confused": most_confused(cm, names),
        "per_class": report,
    }
    if robust:
        metrics["robustness"] = robust.results["test"]
    write_json(out_dir / "eval.json", metrics)
    with open(out_dir / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(report[0]))
        writer.writeheader()
        writer.writerows(report)
    (out_dir / "per_class.txt").write_text(per_class_table(report))
    plots = results.drawn(names, card=False)
    plots.insert(1, (TAGS["confusion"] + "_normalized", figures.confusion_matrix(cm, names, normalize=True)))
    scalars = {f"test/{k}": metrics[f"test_{k}"] for k in ("acc", "loss", "mse")}
    scalars |= {f"robust/{k}": v for k, v in metrics.get("robustness", {}).items()}
    figures.save_figures(plots, out_dir, scalars, dpi=200)
    return metrics


def per_class_table(report: list[dict[str, Any]]) -> str:
    lines = [f"{'class':>16}  precision  recall     f1  support"]
    lines += [
        f"{r['class']:>16}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:.4f}  {r['support']:7d}" for r in report
    ]
    return "\n".join(lines) + "\n"
