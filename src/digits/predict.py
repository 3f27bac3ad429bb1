"""Predict with any checkpoint of a digits run, on image files, folders of them or test images. The net and
what its dataset's images are (classes, normalisation, framing) come from the checkpoint, so predicting
images imports neither Lightning nor torchvision: they took half of predict.py's start-up."""

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image
from torch import nn
from tqdm import tqdm

from digits.artifacts import check_own_net, check_targets, check_weights, checkpoint_record, load_run, write_json
from digits.config import build
from digits.errors import DigitsError, is_number, require
from digits.images import ImageSpec, find_inputs, model_view, read_gray


def load_net(cfg: DictConfig, checkpoint: dict[str, Any], ckpt_path: str | Path) -> nn.Module:
    """The run's net (its `model` node) with the checkpoint's weights, in eval mode."""
    check_own_net(ckpt_path, checkpoint, cfg.model)
    net = build(cfg.model, "model")
    check_weights(ckpt_path, checkpoint, {f"net.{k}": v for k, v in net.state_dict().items()})
    weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}
    net.load_state_dict(weights)
    return net.eval()


def image_spec(cfg: DictConfig, checkpoint: dict[str, Any], ckpt_path: str | Path, datamodule: Any = None) -> ImageSpec:
    """The run's dataset's classes, normalisation and framing, from the checkpoint's record (a checkpoint older
    than that record: from the dataset's data module, `datamodule` if one is built already)."""
    data = checkpoint_record(checkpoint).get("data")
    if not isinstance(data, dict):
        return (datamodule or build_data(cfg, ckpt_path)).spec
    framing = {k: cfg.data.get(k) for k in ("frame_box", "frame_by_mass") if k in cfg.data}
    try:
        return ImageSpec(data.get("classes"), data.get("mean"), data.get("std"), **framing)
    except DigitsError as err:
        raise DigitsError(f"ckpt_path={str(ckpt_path)!r} is refused: its data.{err}") from None


def build_data(cfg: DictConfig, ckpt_path: str | Path) -> Any:
    """The run's data module (imports Lightning and torchvision), its `_target_` checked first."""
    check_targets(cfg, ckpt_path, ["data"])
    return build(cfg.data, "data")


@torch.no_grad()
def check_outputs(net: nn.Module, spec: ImageSpec, ckpt_path: str | Path) -> None:
    """The net answers one score per class of its dataset."""
    outputs = net(spec.model_input(torch.zeros(1, 28, 28))).shape[-1]
    if outputs != len(spec.classes):
        raise DigitsError(
            f"ckpt_path={str(ckpt_path)!r} is refused: its model scores {outputs} classes, its data has "
            f"{len(spec.classes)}"
        )


@torch.no_grad()
def predict(
    net: nn.Module, images: torch.Tensor, class_names: Sequence[str], batch_size: int = 512
) -> list[dict[str, Any]]:
    """The two likeliest classes of each image, in batches."""
    rows = []
    for batch in images.split(batch_size):
        probs = net(batch).float().softmax(-1)
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
    threshold = cfg.get("low_confidence", 0.0)
    require(is_number(threshold) and 0 <= threshold <= 1, "low_confidence", threshold, "a probability in [0, 1]")
    require(cfg.get("format") in ("table", "json"), "format", cfg.get("format"), "table or json")
    run_cfg, checkpoint = load_run(cfg.ckpt_path, cfg.paths, builds=["model"])
    net = load_net(run_cfg, checkpoint, cfg.ckpt_path)
    datamodule = build_data(run_cfg, cfg.ckpt_path) if cfg.test_index is not None else None
    spec = image_spec(run_cfg, checkpoint, cfg.ckpt_path, datamodule)
    check_outputs(net, spec, cfg.ckpt_path)
    names = list(spec.classes)
    rows: list[dict[str, Any]] = []
    if datamodule is not None:
        datamodule.prepare_data()
        images, labels = datamodule.load_tensors(train=False)
        indices = parse_test_index(cfg.test_index, len(labels))
        for i, row in zip(indices, predict(net, images[indices], names), strict=True):
            rows.append({"input": f"test[{i}]", **row, "true": names[int(labels[i])]})
    paths = list(find_inputs([*input_entries(cfg), *extra_inputs]))
    slots: list[dict[str, Any]] = []  # one row per path, in the order given
    views, read = [], []
    for path in tqdm(paths, desc="reading", unit="image", disable=len(paths) < 200 or not sys.stderr.isatty()):
        slots.append({"input": str(path)})
        try:
            views.append(model_view(read_gray(path), spec.frame_box, spec.frame_by_mass))
        except DigitsError as err:
            slots[-1]["error"] = str(err)
            continue
        read.append(len(slots) - 1)
    if views:
        for slot, row in zip(read, predict(net, spec.model_input(torch.stack(views)), names), strict=True):
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
    """`inputs` (one path, or a list) and the paths `inputs_from` lists (a file, or `-` for stdin): one per line,
    or each ended by a NUL byte (`find -print0`), for names that hold a newline."""
    given = cfg.get("inputs") or []
    entries = [given] if isinstance(given, str) else [str(e) for e in given]
    source = cfg.get("inputs_from")
    if source:
        try:
            data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
        except OSError as err:
            raise DigitsError(f"inputs_from={source!r}: {err.strerror}") from None
        data = data.removeprefix(b"\xef\xbb\xbf")  # the byte-order mark Windows editors put before UTF-8 text
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Notepad's "Unicode": a NUL in every ASCII character
            raise DigitsError(f"inputs_from={source!r} is UTF-16 text; expected UTF-8 (save it as UTF-8)")
        if b"\0" in data:
            names = data.split(b"\0")
            # `-print0` ends every name with a NUL and never gives a blank one; an image or another binary file
            # has runs of NULs, or does not end in one, and UTF-16 text has its line breaks among its names
            if names[-1] or not all(name.strip() for name in names[:-1]):
                raise DigitsError(
                    f"inputs_from={source!r} is not allowed; expected a text file of paths, one per line or each "
                    "ended by a NUL byte"
                )
            entries += [os.fsdecode(name) for name in names[:-1]]  # names in any bytes, as the file system has them
        else:
            entries += [line.strip() for line in os.fsdecode(data).splitlines() if line.strip()]
    return entries


def save_views(out: Path, paths: list[Path], views: list[torch.Tensor]) -> None:
    """Each image as the model saw it, 28×28 white on black, named after its file (its first 60 characters: a
    name may already be as long as the file system allows)."""
    out.mkdir(parents=True, exist_ok=True)
    for i, (path, view) in enumerate(zip(paths, views, strict=True)):
        Image.fromarray((view * 255).round().byte().numpy()).save(out / f"{i:05d}_{path.stem[:60]}.png")


def prediction_table(rows: list[dict[str, Any]]) -> str:
    names = [printable(r["input"]) for r in rows]
    width = max(map(len, names))
    lines = [f"{'input':<{width}}  label  {'class':<14}  probability  {'then':<14}  {'p':>6}  true"]
    for name, r in zip(names, rows, strict=True):
        if "error" in r:
            lines.append(f"{name:<{width}}  error: {r['error']}")
        else:
            answer = f"{r['label']:>5}  {r['class']:<14}  {r['probability']:11.4f}  {r['second']:<14}  "
            answer += f"{r['second_probability']:6.4f}  {r.get('true', '')}"
            lines.append(f"{name:<{width}}  {answer}{'  (low confidence)' if r.get('low_confidence') else ''}")
    if summary := labelled_accuracy(rows):
        lines.append(summary)
    return "\n".join(lines)


def printable(name: str) -> str:
    """A file name on one line of the table, as the terminal shows it: a newline, a terminal's escape sequence
    or a byte that is no character in the file system's encoding written out as Python escapes it."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in name)


def labelled_accuracy(rows: list[dict[str, Any]]) -> str:
    """Accuracy over the rows with a true class (test images, images in `<label>/` folders), if any."""
    labelled = [r for r in rows if "true" in r and "class" in r]
    if not labelled:
        return ""
    right = sum(r["class"] == r["true"] for r in labelled)
    return f"accuracy {100 * right / len(labelled):.2f} % ({right} of {len(labelled)} labelled images)"
