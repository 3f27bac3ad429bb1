"""The robustness suite: how a model holds up on digits unlike its dataset's own, built only from what we may
ship or generate. Held-out images degraded the ways people's pictures of digits are (low resolution, blur,
faint ink, thick and thin strokes, off-centre), and, for digit datasets, digits rendered from every font on
the machine, framed as predict.py frames an image."""

import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from digits.augment import gaussian_blur, resample, thicken, thin, translate
from digits.errors import DigitsError
from digits.images import model_view

FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".local/share/fonts")
FONT_SUFFIXES = {".ttf", ".otf"}
Sets = dict[str, tuple[torch.Tensor, torch.Tensor]]  # a set's name → its images and labels
SHIFT = 4  # pixels: the suite's off-centre digits


def _blur(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda ink: gaussian_blur(ink, torch.full((len(ink),), sigma, device=ink.device))


def _shifted(ink: torch.Tensor) -> torch.Tensor:
    """Each image moved SHIFT pixels in one of the eight directions, the same for every run."""
    moves = torch.tensor([(dy, dx) for dy in (-SHIFT, 0, SHIFT) for dx in (-SHIFT, 0, SHIFT) if dy or dx])
    move = moves[torch.arange(len(ink)) % len(moves)].to(ink.device)
    return translate(ink, move[:, 0], move[:, 1], SHIFT)


# Each takes white-on-black ink in [0, 1], N×1×28×28
CORRUPTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "low_res_8": lambda ink: resample(ink, 8),
    "low_res_12": lambda ink: resample(ink, 12),
    "low_res_16": lambda ink: resample(ink, 16),
    "blur_1": _blur(1.0),
    "blur_1.5": _blur(1.5),
    "faint": lambda ink: ink * 0.3,
    "thick": thicken,
    "thin": thin,
    "shifted": _shifted,
}


RULINGS = {"plain": (), "ruled": ((0, 144),), "squared": ((0, 48), (90, 48))}  # lines: (direction°, spacing px)


def photographed(
    ink: torch.Tensor, shadow: float, noise: float, generator: torch.Generator, paper: str = "plain"
) -> torch.Tensor:
    """A 28×28 white-on-black digit as a phone photo of it written on paper: dark ink 112 pixels tall on a
    192-pixel sheet (paper 0.9, the ink taking 85% of the light), the light falling off by `shadow` from one
    side of the sheet to the other in a random direction, and camera noise of standard deviation `noise`.

    `paper="ruled"` prints lines 144 pixels apart (a line under a digit 3/4 of their spacing tall, as in a
    ruled notebook); `"squared"`, a grid of 48-pixel squares (a digit over two squares and a bit); each line
    about 2 pixels wide and taking 30% of the light, the ruling turned by up to 3° and shifted at random."""
    big = F.pad(F.interpolate(ink[None, None], size=(112, 112), mode="bilinear")[0, 0], (40, 40, 40, 40))
    angle = 2 * math.pi * torch.rand((), generator=generator).item()
    v, u = torch.linspace(-1, 1, 192)[:, None], torch.linspace(-1, 1, 192)[None, :]
    across = (math.cos(angle) * u + math.sin(angle) * v) / math.sqrt(2)  # -1 to 1 from one corner to the other
    page = 0.9 * (1 - shadow * (0.5 + 0.5 * across)) * (1 - 0.85 * big)
    rows, cols = torch.arange(192.0)[:, None], torch.arange(192.0)[None, :]
    tilt = math.radians(3 * (2 * torch.rand((), generator=generator).item() - 1)) if RULINGS[paper] else 0.0
    for direction, spacing in RULINGS[paper]:
        turn = tilt + math.radians(direction)
        across_lines = rows * math.cos(turn) - cols * math.sin(turn) + spacing * torch.rand((), generator=generator)
        off = (across_lines / spacing - (across_lines / spacing).round()).abs() * spacing  # pixels to the nearest
        page = page * (1 - 0.3 * (1.5 - off).clamp(0, 1))
    return (page + noise * torch.randn(page.shape, generator=generator)).clamp(0, 1)


def is_digits(class_names: list[str]) -> bool:
    """A dataset whose classes are the digits 0-9 (MNIST's are named "0 - zero" …)."""
    return [name.split(" ")[0] for name in class_names] == [str(i) for i in range(10)]


def font_files() -> list[Path]:
    return sorted(p for d in FONT_DIRS if d.is_dir() for p in d.rglob("*") if p.suffix.lower() in FONT_SUFFIXES)


@functools.cache
def font_digits(box: int, by_mass: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Digits 0-9 drawn in Pillow's own font and in every font file on the machine, black on white, each framed
    as predict.py frames an image: (N×28×28 ink in [0, 1], labels, number of fonts). A font whose ten digits
    are not ten different pictures (a symbol font, or one without digits) is left out."""
    fonts = [ImageFont.load_default(size=96)]
    for path in font_files():
        try:
            fonts.append(ImageFont.truetype(str(path), size=96))
        except OSError:
            continue
    views = []
    for font in fonts:
        drawn = []
        for digit in range(10):
            page = Image.new("L", (192, 192), 255)
            ImageDraw.Draw(page).text((96, 96), str(digit), font=font, fill=0, anchor="mm")
            gray = torch.frombuffer(bytearray(page.tobytes()), dtype=torch.uint8).view(192, 192).float() / 255
            try:
                drawn.append(model_view(gray, box, by_mass))
            except DigitsError:  # nothing drawn: the font has no such glyph
                break
        if len(drawn) == 10 and len({tuple(v.flatten().tolist()) for v in drawn}) == 10:
            views.extend(drawn)
    return torch.stack(views), torch.arange(10).repeat(len(views) // 10), len(views) // 10


def suite(
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: float,
    std: float,
    size: int,
    fonts: tuple[int, bool] | None = None,
) -> Sets:
    """Normalised images (N×1×28×28, as a datamodule holds them): a fixed sample of `size` of them under each
    corruption, and with `fonts=(box, by_mass)` the font digits; each set normalised the same way."""
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:size].to(labels.device)
    ink = (images[pick] * std + mean).clamp(0, 1)
    sets = {name: ((corrupt(ink) - mean) / std, labels[pick]) for name, corrupt in CORRUPTIONS.items()}
    if fonts:
        drawn, digits, _ = font_digits(*fonts)
        sets["fonts"] = ((drawn.unsqueeze(1).to(images.device) - mean) / std, digits.to(labels.device))
    return sets


@torch.no_grad()
def score(model: torch.nn.Module, sets: Sets, batch_size: int) -> dict[str, float]:
    """Accuracy on each set, and `mean`: the mean over the corruptions (fonts apart)."""
    dtype = next(model.parameters()).dtype
    accuracy = {}
    for name, (images, labels) in sets.items():
        right = sum(
            (model(x.to(dtype)).argmax(-1) == y).sum().item()
            for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True)
        )
        accuracy[name] = right / len(labels)
    accuracy["mean"] = sum(accuracy[name] for name in CORRUPTIONS) / len(CORRUPTIONS)
    return accuracy
