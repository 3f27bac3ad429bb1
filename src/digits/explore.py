"""The labs' look at a dataset: the first 200 training images, class balance, per-image statistics."""

import csv
from pathlib import Path

import torch
from matplotlib.figure import Figure

from digits.data import DigitsDataModule
from digits.figures import image_grid, save_figures


def image_statistics(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image (N×28×28 uint8): mean, variance and std of the pixels in [0, 1], entropy of their histogram in bits."""
    x = images.flatten(1).float() / 255
    counts = torch.stack([torch.bincount(img, minlength=256) for img in images.flatten(1).long()]).float()
    p = counts / counts.sum(1, keepdim=True)
    entropy = -(p * p.clamp(min=1e-12).log2()).sum(1)
    return {"mean": x.mean(1), "variance": x.var(1), "std": x.std(1), "entropy": entropy}


def explore(datamodule: DigitsDataModule, out_dir: Path) -> list[Path]:
    """Write the figures as PNGs and TensorBoard images into `out_dir`, the statistics as CSV; returns the PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    datamodule.prepare_data()
    train = datamodule.dataset_cls(str(datamodule.data_dir), train=True)
    test = datamodule.dataset_cls(str(datamodule.data_dir), train=False)
    names = datamodule.class_names
    train_idx, val_idx = datamodule.split_indices()

    first = train.data[:200].unsqueeze(1).float()
    plots = {"first_200": image_grid(first, train.targets[:200], None, [n.split(" - ")[0] for n in names], columns=20)}

    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    width = 0.27
    for k, (label, targets) in enumerate(
        (("train", train.targets[train_idx]), ("val", train.targets[val_idx]), ("test", test.targets))
    ):
        share = torch.bincount(targets, minlength=10).float() / len(targets)
        ax.bar(torch.arange(10) + (k - 1) * width, share, width, label=f"{label} ({len(targets):,})")
    ax.set_xticks(range(10), names, rotation=30, ha="right")
    ax.set_ylabel("share of the split")
    ax.set_title(f"{datamodule.name}: class balance")
    ax.legend()
    fig.tight_layout()
    plots["class_histogram"] = fig

    stats = image_statistics(train.data)
    rows = []
    for c, name in enumerate(names):
        mask = train.targets == c
        rows.append(
            {"class": name, "images": int(mask.sum()), **{k: round(v[mask].mean().item(), 5) for k, v in stats.items()}}
        )
    with open(out_dir / "image_stats.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig = Figure(figsize=(16, 4))
    axes = fig.subplots(1, 4)
    for ax, (key, values) in zip(axes, stats.items(), strict=True):
        ax.boxplot([values[train.targets == c].numpy() for c in range(10)], showfliers=False)
        ax.set_xticks(range(1, 11), [n.split(" - ")[0][:8] for n in names], rotation=45)
        ax.set_title(f"per-image {key}")
    fig.suptitle(f"{datamodule.name} training images by class")
    fig.tight_layout()
    plots["image_stats"] = fig
    return save_figures(plots.items(), out_dir, dpi=100)
