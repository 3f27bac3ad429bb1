"""Evaluate and predict with any checkpoint of a digits run; model and data come from the run's config."""

import csv
import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError

from digits.artifacts import check_weights, checkpoint_record, load_checkpoint, write_json
from digits.callbacks import TAGS, TestResults
from digits.config import build
from digits.data import DigitsDataModule
from digits.errors import DigitsError
from digits.module import Classifier
from digits.train import build_module, device_name


def load_run(ckpt_path: str | Path, paths: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """A checkpoint (loaded safely) and the config of the run that wrote it: from the checkpoint itself, or
    for checkpoints older than that record, from the run's `.hydra/config.yaml` two folders up."""
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
    cfg.paths = paths  # this machine's data and log dirs, not those of the run's
    cfg.data.data_dir = paths.data_dir
    return cfg, checkpoint


def load_model(cfg: DictConfig, checkpoint: dict[str, Any], ckpt_path: str | Path) -> Classifier:
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


def evaluate(cfg: DictConfig, checkpoint: dict[str, Any], ckpt: Path, out_dir: Path) -> dict[str, Any]:
    """Test the checkpoint; write metrics, confusion matrices, the per-class report and misclassified images."""
    from digits import figures

    datamodule = build(cfg.data, "data")
    module = load_model(cfg, checkpoint, ckpt)
    results = TestResults(figures=False)
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,  # save_figures writes this dir's TensorBoard events, figures and scalars in one file
        callbacks=[results],
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
    write_json(out_dir / "eval.json", metrics)
    with open(out_dir / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(report[0]))
        writer.writeheader()
        writer.writerows(report)
    (out_dir / "per_class.txt").write_text(per_class_table(report))
    plots = results.drawn(names, card=False)
    plots.insert(1, (TAGS["confusion"] + "_normalized", figures.confusion_matrix(cm, names, normalize=True)))
    scalars = {f"test/{k}": metrics[f"test_{k}"] for k in ("acc", "loss", "mse")}
    figures.save_figures(plots, out_dir, scalars, dpi=200)
    return metrics


def per_class_table(report: list[dict[str, Any]]) -> str:
    lines = [f"{'class':>16}  precision  recall     f1  support"]
    lines += [
        f"{r['class']:>16}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:.4f}  {r['support']:7d}" for r in report
    ]
    return "\n".join(lines) + "\n"


def image_to_tensor(path: str | Path, datamodule: DigitsDataModule) -> torch.Tensor:
    """Any image file as the model saw its training data: 1×1×28×28, white on black, normalised.

    A 28×28 image is taken as it is (the datasets' own format); any other size is framed the way
    the dataset's own images were (`frame`).
    """
    try:
        data = Path(path).read_bytes()
        if not data:
            raise DigitsError(f"{path}: the file is empty")
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise DigitsError(f"{path}: not a readable image ({type(err).__name__})") from None
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # drawn on a transparent sheet
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    gray = image.convert("L")
    x = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(gray.height, gray.width).float() / 255
    paper = _border_median(x)
    if paper > 0.5:  # dark ink on light paper: flip to MNIST's white on black
        x, paper = 1 - x, 1 - paper
    if x.shape != (28, 28):
        x = frame(x, paper, datamodule.frame_box, datamodule.frame_by_mass)
    return ((x - datamodule.mean) / datamodule.std).view(1, 1, 28, 28)


def frame(x: torch.Tensor, paper: float, box: int, by_mass: bool) -> torch.Tensor:
    """White-on-black ink as the datasets framed theirs: the paper's tone taken off and the ink stretched to
    full contrast, its bounding box scaled to fit `box`×`box` (aspect kept), then placed on a 28×28 canvas,
    centred by its centre of mass (MNIST: a 20-pixel box) or by its box (Fashion-MNIST: 28)."""
    ink = ((x - paper) / max(x.max().item() - paper, 1e-6)).clamp(0, 1)
    rows, cols = (ink > 0.1).nonzero(as_tuple=True)
    if not len(rows):
        return torch.zeros(28, 28)
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = box / max(ink.shape)
    h, w = (max(1, round(side * scale)) for side in ink.shape)
    ink = F.interpolate(ink[None, None], size=(h, w), mode="area" if scale < 1 else "bilinear")[0, 0]
    top, left = (28 - h) // 2, (28 - w) // 2
    if by_mass:
        mass = ink.sum().clamp(min=1e-6)
        cy = (ink.sum(1) * torch.arange(h)).sum() / mass
        cx = (ink.sum(0) * torch.arange(w)).sum() / mass
        top = min(max(round(13.5 - cy.item()), 0), 28 - h)
        left = min(max(round(13.5 - cx.item()), 0), 28 - w)
    canvas = torch.zeros(28, 28)
    canvas[top : top + h, left : left + w] = ink
    return canvas


def _border_median(x: torch.Tensor) -> float:
    """The median of the border pixels: the paper's tone."""
    border = torch.cat([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    return border.median().item()


@torch.no_grad()
def predict(module: Classifier, images: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    probs = module(images.to(module.device)).float().softmax(-1).cpu()
    top = probs.max(-1)
    return [
        {"label": int(i), "class": class_names[int(i)], "probability": float(p)}
        for p, i in zip(top.values, top.indices, strict=True)
    ]


def parse_test_index(value: Any, test_size: int) -> list[int]:
    """`3` or `0:5` (a slice of the official test set)."""
    text = str(value)
    start, sep, stop = text.partition(":")
    try:
        indices = list(range(int(start), int(stop))) if sep else [int(text)]
    except ValueError:
        indices = []
    ok = bool(indices) and indices[0] >= 0 and indices[-1] < test_size
    if not ok:
        raise DigitsError(f"test_index={value!r} is not allowed; expected an index or a slice a:b within 0:{test_size}")
    return indices


def run_predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Predictions for `test_index` and `inputs`; an unreadable input gets an error row, the rest answers."""
    run_cfg, checkpoint = load_run(cfg.ckpt_path, cfg.paths)
    datamodule = build(run_cfg.data, "data")
    module = load_model(run_cfg, checkpoint, cfg.ckpt_path)
    names = datamodule.class_names
    rows: list[dict[str, Any]] = []
    if cfg.test_index is not None:
        datamodule.prepare_data()
        images, labels = datamodule.load_tensors(train=False)
        indices = parse_test_index(cfg.test_index, len(labels))
        for i, row in zip(indices, predict(module, images[indices], names), strict=True):
            rows.append({"input": f"test[{i}]", **row, "true": names[int(labels[i])]})
    for path in cfg.inputs or []:
        try:
            image = image_to_tensor(path, datamodule)
        except DigitsError as err:
            rows.append({"input": str(path), "error": str(err)})
            continue
        rows.append({"input": str(path), **predict(module, image, names)[0]})
    if not rows:
        raise DigitsError("nothing to predict; give inputs=[a.png,...] and/or test_index=0:5")
    return rows


def prediction_table(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["input"]) for r in rows)
    lines = [f"{'input':<{width}}  label  {'class':<14}  probability  true"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['input']:<{width}}  error: {r['error']}")
        else:
            answer = f"{r['label']:>5}  {r['class']:<14}  {r['probability']:11.4f}  {r.get('true', '')}"
            lines.append(f"{r['input']:<{width}}  {answer}")
    return "\n".join(lines)
