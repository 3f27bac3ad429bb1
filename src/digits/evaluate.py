"""Evaluate and predict with any checkpoint of a digits run; model and data come from the run's config."""

import csv
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from tqdm import tqdm

from digits.artifacts import check_weights, checkpoint_record, load_checkpoint, write_json
from digits.callbacks import TAGS, Robustness, TestResults
from digits.config import build
from digits.errors import DigitsError, named_class
from digits.images import find_inputs, model_view, read_gray
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
    check_targets(cfg, ckpt_path)
    cfg.paths = paths  # this machine's data and log dirs, not those of the run's
    cfg.data.data_dir = paths.data_dir
    return cfg, checkpoint


# What a checkpoint's config may build, key by key: classes of these kinds only. Hydra's own blocklist stops
# os.system, but a config could as well name pathlib.Path.unlink, torch.load or torch.hub.load.
BUILDS = {
    "model": ("torch.nn.Module", torch.nn.Module),
    "optimizer": ("torch.optim.Optimizer", torch.optim.Optimizer),
    "scheduler": ("torch.optim.lr_scheduler.LRScheduler", torch.optim.lr_scheduler.LRScheduler),
    "data": ("lightning.LightningDataModule", L.LightningDataModule),
}


def check_targets(cfg: DictConfig, ckpt_path: str | Path) -> None:
    """Every `_target_` that eval and predict would build from a checkpoint's config, nested ones included, names
    a class of the kind its key builds (`BUILDS`), outside the standard library: a checkpoint from someone
    else cannot make them call a function."""
    for key, (kind_name, kind) in BUILDS.items():
        try:
            node = OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) is not None else None
        except OmegaConfBaseException as err:
            raise DigitsError(f"ckpt_path={str(ckpt_path)!r} has a config whose {key} cannot be read ({err})") from None
        for target in targets(node):
            if named_class(target, kind) is None:
                raise DigitsError(
                    f"ckpt_path={str(ckpt_path)!r} is refused: its config builds {key} with {target!r}, which is "
                    f"not a {kind_name} class; nothing was built from it"
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


def evaluate(
    cfg: DictConfig, checkpoint: dict[str, Any], ckpt: Path, out_dir: Path, robustness: DictConfig | None = None
) -> dict[str, Any]:
    """Test the checkpoint; write metrics, confusion matrices, the per-class report and misclassified images,
    and with `robustness` (`size`, `fonts`) the robustness suite's accuracies."""
    from digits import figures

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


@torch.no_grad()
def predict(
    module: Classifier, images: torch.Tensor, class_names: list[str], batch_size: int = 512
) -> list[dict[str, Any]]:
    """The two likeliest classes of each image, in batches."""
    rows = []
    for batch in images.split(batch_size):
        probs = module(batch.to(module.device)).float().softmax(-1).cpu()
        top = probs.topk(2, dim=-1)
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            rows.append(
                {
                    "label": i[0],
                    "class": class_names[i[0]],
                    "probability": p[0],
                    "second": class_names[i[1]],
                    "second_probability": p[1],
                }
            )
    return rows


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


def run_predict(cfg: DictConfig, extra_inputs: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Predictions for `test_index` and every image `inputs`, `inputs_from` and `extra_inputs` name, read and
    predicted in batches; an unreadable or blank image gets an error row and the rest are answered."""
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
    paths = list(find_inputs([*input_entries(cfg), *extra_inputs]))
    slots: list[dict[str, Any]] = []  # one row per path, in the order given
    views, read = [], []
    for path in tqdm(paths, desc="reading", unit="image", disable=len(paths) < 200 or not sys.stderr.isatty()):
        slots.append({"input": str(path)})
        try:
            views.append(model_view(read_gray(path), datamodule.frame_box, datamodule.frame_by_mass))
        except DigitsError as err:
            slots[-1]["error"] = str(err)
            continue
        read.append(len(slots) - 1)
    if views:
        batch = ((torch.stack(views) - datamodule.mean) / datamodule.std).unsqueeze(1)
        for slot, row in zip(read, predict(module, batch, names), strict=True):
            slots[slot] |= row
            if (label := class_of(paths[slot].parent.name, names)) is not None:
                slots[slot]["true"] = names[label]
        if cfg.get("save_inputs"):
            save_views(Path(cfg.save_inputs), [paths[i] for i in read], views)
        if cfg.get("report_dir"):
            labelled = [(slots[slot], view) for slot, view in zip(read, views, strict=True) if "true" in slots[slot]]
            labelled_report(Path(cfg.report_dir), labelled, names)
    rows += slots
    if not rows:
        raise DigitsError(
            "nothing to predict; give inputs=[a.png,dir/,'*.jpg'], inputs_from=<list or ->, or test_index=0:5"
        )
    threshold = cfg.get("low_confidence", 0.0)
    for row in rows:
        if "probability" in row:
            row["low_confidence"] = row["probability"] < threshold
    return rows


def labelled_report(out: Path, labelled: list[tuple[dict[str, Any], torch.Tensor]], class_names: list[str]) -> None:
    """For images in `<label>/` folders, what eval.py writes for the test set: accuracy and confusion matrix
    (`labelled.json`), the matrix and the misclassified images as PNGs."""
    from digits import figures

    if not labelled:
        raise DigitsError(
            f"report_dir={str(out)!r}: no input is in a folder named after a class ({class_names[0]!r}, …)"
        )
    index = {name: i for i, name in enumerate(class_names)}
    n = len(class_names)
    confusion = torch.zeros(n, n, dtype=torch.long)
    for row, _ in labelled:
        confusion[index[row["true"]], row["label"]] += 1
    wrong = [(row, view) for row, view in labelled if row["class"] != row["true"]]
    out.mkdir(parents=True, exist_ok=True)
    right = int(confusion.diag().sum())
    summary = {"images": len(labelled), "right": right, "accuracy": right / len(labelled)}
    write_json(out / "labelled.json", summary | {"confusion_matrix": confusion.tolist(), "classes": class_names})
    plots = [("confusion_matrix", figures.confusion_matrix(confusion, class_names))]
    if wrong:
        images = torch.stack([view for _, view in wrong]).unsqueeze(1)
        labels = torch.tensor([index[row["true"]] for row, _ in wrong])
        preds = torch.tensor([row["label"] for row, _ in wrong])
        plots.append(("misclassified", figures.image_grid(images, labels, preds, class_names)))
    figures.save_figures(plots, out, dpi=200, events=False)


def class_of(folder: str, class_names: list[str]) -> int | None:
    """The class a folder is named after (its index, its name, or for MNIST's "7 - seven" also "seven"), if any:
    the images in `<label>/` folders are labelled by it."""
    wanted = folder.strip().lower()
    for i, name in enumerate(class_names):
        if wanted in (str(i), name.lower(), name.lower().partition(" - ")[2]):
            return i
    return None


def input_entries(cfg: DictConfig) -> list[str]:
    """`inputs` (one path, or a list) and the lines of `inputs_from` (a file, or `-` for stdin)."""
    given = cfg.get("inputs") or []
    entries = [given] if isinstance(given, str) else [str(e) for e in given]
    source = cfg.get("inputs_from")
    if source:
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text()
        except OSError as err:
            raise DigitsError(f"inputs_from={source!r}: {err.strerror}") from None
        entries += [line.strip() for line in text.splitlines() if line.strip()]
    return entries


def save_views(out: Path, paths: list[Path], views: list[torch.Tensor]) -> None:
    """Each image as the model saw it, 28×28 white on black, named after its file."""
    out.mkdir(parents=True, exist_ok=True)
    for i, (path, view) in enumerate(zip(paths, views, strict=True)):
        Image.fromarray((view * 255).round().byte().numpy()).save(out / f"{i:05d}_{path.stem}.png")


def prediction_table(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["input"]) for r in rows)
    lines = [f"{'input':<{width}}  label  {'class':<14}  probability  {'then':<14}  {'p':>6}  true"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['input']:<{width}}  error: {r['error']}")
        else:
            answer = f"{r['label']:>5}  {r['class']:<14}  {r['probability']:11.4f}  {r['second']:<14}  "
            answer += f"{r['second_probability']:6.4f}  {r.get('true', '')}"
            lines.append(f"{r['input']:<{width}}  {answer}{'  (low confidence)' if r.get('low_confidence') else ''}")
    if summary := labelled_accuracy(rows):
        lines.append(summary)
    return "\n".join(lines)


def labelled_accuracy(rows: list[dict[str, Any]]) -> str:
    """Accuracy over the rows with a true class (test images, images in `<label>/` folders), if any."""
    labelled = [r for r in rows if "true" in r and "class" in r]
    if not labelled:
        return ""
    right = sum(r["class"] == r["true"] for r in labelled)
    return f"accuracy {100 * right / len(labelled):.2f} % ({right} of {len(labelled)} labelled images)"
