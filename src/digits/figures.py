"""Matplotlib figures of test results, for TensorBoard and for PNG files.

Figures are made as `matplotlib.figure.Figure` objects, not through pyplot: no GUI backend is chosen or
needed, and importing digits changes nothing in a user's own matplotlib session.
"""

import io
import struct
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.figure import Figure

# TensorBoard's image cards show a figure 215 px high at their default size: figures for them are drawn that
# high at 100 dpi, so their text is not scaled down (PNG files are written at a higher dpi from the same figure)
CARD_INCHES = (4.4, 2.15)

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def confusion_matrix(counts: torch.Tensor, class_names: Sequence[str], normalize: bool = False) -> Figure:
    """Rows are true classes, columns predictions; `normalize` divides each row by its total."""
    values = counts.double()
    if normalize:
        values = values / values.sum(1, keepdim=True).clamp(min=1)
    fig = Figure(figsize=CARD_INCHES)
    ax = fig.subplots()
    ax.imshow(values.numpy(), cmap="Blues", aspect="auto")
    n = len(class_names)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=6)
    ax.set_yticks(
        range(n), [name if name.startswith(str(i)) else f"{name} {i}" for i, name in enumerate(class_names)], fontsize=6
    )
    ax.tick_params(length=0, pad=1)
    ax.set_xlabel("predicted", fontsize=6, labelpad=1)
    threshold = values.max().item() / 2
    for i in range(n):
        for j in range(n):
            v = values[i, j].item()
            text = f"{v:.2f}".lstrip("0") if normalize else f"{int(v)}"
            color = "white" if v > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color=color)
    ax.set_title(
        ("true (rows) × predicted, share of each row" if normalize else "true (rows) × predicted, counts"), fontsize=7
    )
    fig.tight_layout(pad=0.3)
    return fig


def image_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    preds: torch.Tensor | None,
    class_names: Sequence[str],
    columns: int = 8,
) -> Figure:
    """Images with their true label (and prediction, when given) above each one."""
    rows = max(1, -(-len(images) // columns))
    fig = Figure(figsize=(columns * 1.4, rows * 1.6))
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        ax.imshow(images[k].squeeze(0).numpy(), cmap="gray")
        title = class_names[labels[k]]
        if preds is not None:
            title = f"true {title}\npred {class_names[preds[k]]}"
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


def mistakes_card(images: torch.Tensor, labels: Sequence[int], preds: Sequence[int]) -> Figure:
    """The first 16 misclassified images, each titled `true → predicted` by class index, in a card's size."""
    fig = Figure(figsize=CARD_INCHES)
    axes = fig.subplots(2, 8, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k].squeeze(0).numpy(), cmap="gray")
            ax.set_title(f"{labels[k]} → {preds[k]}", fontsize=7, pad=2)
    fig.suptitle("misclassified test images: true → predicted class", fontsize=7)
    fig.tight_layout(pad=0.2)
    return fig


def save_figures(
    figures: Iterable[tuple[str, Figure]],
    out_dir: Path,
    scalars: dict[str, float] | None = None,
    dpi: int = 110,
    events: bool = True,
) -> list[Path]:
    """Each (tag, figure) as a PNG (the tag with `/` as `_`) and, with `events`, as an image in TensorBoard
    events in `out_dir`, beside `scalars`. Figures are closed as they are written, so a generator of many
    holds one at a time. Events an earlier call left in `out_dir` are replaced: TensorBoard shows each once.
    """
    from torch.utils.tensorboard import SummaryWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(str(out_dir)) if events else None
    paths = []
    for tag, fig in figures:
        paths.append(out_dir / f"{tag.replace('/', '_')}.png")
        png = io.BytesIO()
        fig.savefig(png, dpi=dpi, format="png")
        paths[-1].write_bytes(png.getvalue())
        if writer and dpi == fig.dpi:  # the PNG is what TensorBoard would draw: handed over, not drawn again
            add_png(writer, tag, png.getvalue())
        elif writer:
            writer.add_figure(tag, fig, close=False)
        if pyplot := sys.modules.get("matplotlib.pyplot"):  # Optuna's plots are made through pyplot: let go of them
            pyplot.close(fig)
    if writer:
        for tag, value in (scalars or {}).items():
            writer.add_scalar(tag, value)
        writer.close()
    return paths


def add_png(writer: "SummaryWriter", tag: str, png: bytes) -> None:
    """A PNG file's bytes as a TensorBoard image, as they are (`add_image` would decode and encode them again)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR: width, height
    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]))
