"""How predict.py reads photos of digits: a checkpoint's own validation digits, photographed
(`digits.robustness.photographed`: written on plain, ruled or squared paper, a shadow across the sheet,
camera noise), framed as predict.py frames an image file, and predicted. One row per shadow, one column per
paper; the 28×28 digits as the dataset holds them come first.

    python scripts/photos.py <checkpoint> [--shadows 0,0.2,0.4,0.6] [--papers plain,ruled,squared]
                             [--noise 0.02] [--size 1000]
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DIGITS_ROOT", str(Path(__file__).resolve().parents[1]))  # data/ in the checkout

import torch
from omegaconf import OmegaConf

from digits.artifacts import load_run
from digits.config import build
from digits.errors import DigitsError
from digits.images import model_view
from digits.predict import load_net
from digits.robustness import RULINGS, photographed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--shadows", default="0,0.2,0.4,0.6", help="the light's fall-off across the sheet")
    parser.add_argument("--papers", default=",".join(RULINGS), help=f"any of {', '.join(RULINGS)}")
    parser.add_argument("--noise", type=float, default=0.02, help="the camera noise's standard deviation")
    parser.add_argument("--size", type=int, default=1000, help="validation digits, the first of the split")
    args = parser.parse_args()
    papers = args.papers.split(",")
    if unknown := [p for p in papers if p not in RULINGS]:
        raise DigitsError(f"--papers {','.join(unknown)} is not allowed; expected any of {', '.join(RULINGS)}")

    root = Path(os.environ["DIGITS_ROOT"])
    paths = OmegaConf.create({"data_dir": str(root / "data"), "log_dir": str(root / "logs")})
    cfg, checkpoint = load_run(args.checkpoint, paths)
    model = load_net(cfg, checkpoint, args.checkpoint)
    data = build(cfg.data, "data")
    data.prepare_data()
    images, labels = data.tensors("val")
    images, labels = images[: args.size], labels[: args.size]
    ink = (images[:, 0] * data.std + data.mean).clamp(0, 1)

    def accuracy(views: torch.Tensor, seen: torch.Tensor) -> float:
        with torch.no_grad():
            predicted = model(data.spec.model_input(views)).argmax(-1)
        return 100 * (predicted == labels[seen]).sum().item() / len(labels)

    def photos(shadow: float, paper: str) -> str:
        """Accuracy (%) over every digit, a digit with no ink found counted wrong (their number in brackets)."""
        generator = torch.Generator().manual_seed(0)  # the same shadows and noise on every paper
        views, seen = [], []
        for i, digit in enumerate(ink):
            try:
                photo = photographed(digit, shadow, args.noise, generator, paper)
                views.append(model_view(photo, data.frame_box, data.frame_by_mass))
                seen.append(i)
            except DigitsError:
                continue
        missed = f" ({len(labels) - len(seen)} no ink)" if len(seen) < len(labels) else ""
        return f"{accuracy(torch.stack(views), torch.tensor(seen)) if views else 0.0:.1f}{missed}"

    print(f"{len(labels)} validation digits of {args.checkpoint}, camera noise {args.noise}")
    print(f"as the dataset holds them: {accuracy(ink, torch.arange(len(labels))):.1f}%\n")
    print("| shadow | " + " | ".join(papers) + " |\n|---|" + "---:|" * len(papers))
    for shadow in (float(s) for s in args.shadows.split(",")):
        print(f"| {shadow} | " + " | ".join(photos(shadow, paper) for paper in papers) + " |")


if __name__ == "__main__":
    try:
        main()
    except DigitsError as err:  # a missing or hostile checkpoint: one line, as train.py and predict.py say it
        sys.exit(f"error: {err}")
