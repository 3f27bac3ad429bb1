"""Image files as a model's inputs: found (files, directories, globs, list files), read faithfully and within
bounds, and framed the way the dataset's own images were."""

import glob
import io
import math
import stat
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from digits.errors import DigitsError

SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
MAX_PIXELS = 40_000_000  # a phone photo is 12-50 MP; beyond this a file is refused before it is decoded
MAX_BYTES = 256 * 2**20  # over twice an uncompressed 40 MP RGB TIFF; beyond this a file is refused before it is read
INK = 0.1  # the least contrast, after the paper's tone is taken off, that counts as ink
NOISE = 5  # ink stands this many times the paper's noise above it: a pixel of grain does so once in 3.5 million


def find_inputs(entries: Iterable[str]) -> Iterator[Path]:
    """Each entry as the files it names: a file as itself, a directory as the images below it (recursively,
    sorted), a pattern with `*`, `?` or `[` as the files it matches (`**` for any depth). A name that is
    none of these is yielded as it is, to be reported as missing."""
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        elif not path.exists() and any(c in entry for c in "*?["):
            yield from sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        else:
            yield path


def read_gray(path: Path) -> torch.Tensor:
    """A file as H×W floats in [0, 1], white paper 1, as its pixels are meant to be seen: EXIF orientation
    applied, 16-bit and palette images converted at full depth, a transparent canvas as white paper, the
    first frame with anything on it of an animation (frames decoded one at a time, up to that one).

    Errors name what is wrong, not the file: the caller's row does.
    """
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block the read or never end it
            raise DigitsError("not a regular file")
        if info.st_size > MAX_BYTES:
            raise DigitsError(f"{info.st_size:,} bytes is over the limit of {MAX_BYTES:,}")
        data = path.read_bytes()
    except OSError as err:
        raise DigitsError(err.strerror or type(err).__name__) from None
    if not data:
        raise DigitsError("the file is empty")
    first = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise DigitsError(f"{image.width}×{image.height} pixels is over the limit of {MAX_PIXELS:,}")
            for frame in ImageSequence.Iterator(image):
                gray = to_gray(ImageOps.exif_transpose(frame) if frame.getexif() else frame)
                if gray.max() - gray.min() > INK:
                    return gray
                first = gray if first is None else first
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DigitsError(f"over the limit of {MAX_PIXELS:,} pixels (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DigitsError(f"not a readable image ({type(err).__name__})") from None
    return first


def to_gray(image: Image.Image) -> torch.Tensor:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit) gray: scaled by its own depth
        values = np.asarray(image, dtype=np.float64)
        full = 65535.0 if image.mode.startswith("I;16") or values.max() <= 65535 else float(values.max())
        return torch.from_numpy(values / full).float()
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # drawn on a transparent sheet
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    gray = image.convert("L")
    return torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(gray.height, gray.width).float() / 255


def model_view(x: torch.Tensor, box: int, by_mass: bool) -> torch.Tensor:
    """A gray image (paper 1 or 0) as the 28×28 white-on-black picture the model sees, before normalisation.

    A 28×28 image is taken as it is (the datasets' own format); any other size is framed the way the
    dataset's own images were (`frame`), its paper taken off first: light falling off across a photographed
    sheet is not ink. Raises `DigitsError` where no ink stands out from the paper.
    """
    if border_median(x) > 0.5:  # dark ink on light paper: flip to MNIST's white on black
        x = 1 - x
    paper, noise = paper_under(x)
    ink = x - paper
    if ink.max().item() < max(INK, NOISE * noise):
        raise DigitsError("no ink found: the image is blank or has no contrast")
    return x if x.shape == (28, 28) else frame(ink, box, by_mass, noise)


def paper_under(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The paper's tone under white-on-black ink, as a smooth surface (a quadratic in the pixel coordinates,
    which takes a lamp's fall-off or a shadow across the sheet), fitted to the image's edges less the ink
    that reaches them; and the spread of the paper's grain and the camera's noise about it."""
    h, w = x.shape
    if min(h, w) < 8:
        return torch.full_like(x, border_median(x)), 0.0
    small = F.adaptive_avg_pool2d(x[None, None], (min(h, 64), min(w, 64)))[0, 0]  # the fit needs no more
    edges = edge_mask(*small.shape)
    basis = quadratic(*small.shape)[edges].double()
    values = small[edges].double()
    keep = torch.ones_like(values, dtype=torch.bool)
    for _ in range(5):  # refit without what rises above the paper: ink that reaches the edges
        a = basis[keep]
        coef = torch.linalg.solve(a.T @ a + 1e-9 * torch.eye(6, dtype=a.dtype), a.T @ values[keep])  # least squares
        rise = values - basis @ coef
        fitted, keep = keep, rise <= 3 * 1.4826 * rise[keep].abs().median() + 0.02
        if torch.equal(keep, fitted):
            break
    paper = quadratic(h, w, coef.tolist())
    # ink only rises above the paper: the pixels below it are grain and noise alone, which a grid of a
    # million of them measures as well as a 50 MP photo's every pixel, and much faster
    step = max(1, math.isqrt(h * w // 1_000_000))
    rest = x[::step, ::step] - paper[::step, ::step]
    below = rest[edge_mask(*rest.shape) & (rest < 0)]
    return paper, 1.4826 * below.abs().median().item() if len(below) else 0.0


def quadratic(h: int, w: int, coef: list[float] | None = None) -> torch.Tensor:
    """The terms 1, u, v, u², uv, v² at each pixel of an h×w image, u and v from -1 to 1 across it (h×w×6);
    with `coef`, their weighted sum (h×w)."""
    v, u = torch.linspace(-1, 1, h)[:, None], torch.linspace(-1, 1, w)[None, :]
    if coef is None:
        return torch.stack(torch.broadcast_tensors(torch.ones(1, 1), u, v, u * u, u * v, v * v), dim=-1)
    c = coef
    return (c[0] + c[1] * u + c[3] * u * u) + v * (c[2] + c[4] * u + c[5] * v)  # three passes over a large photo


def edge_mask(h: int, w: int) -> torch.Tensor:
    """The pixels within an eighth of the shorter side of the image's edges."""
    band = max(1, min(h, w) // 8)
    inner = torch.zeros(h, w, dtype=torch.bool)
    inner[band : h - band, band : w - band] = True
    return ~inner


def frame(ink: torch.Tensor, box: int, by_mass: bool, noise: float = 0.0) -> torch.Tensor:
    """White-on-black ink, its paper taken off, as the datasets framed theirs: stretched to full contrast, the
    paper's grain (under NOISE × `noise`) cleared, its bounding box scaled to fit `box`×`box` (aspect kept)
    and stretched to full contrast again, then placed on a 28×28 canvas, centred by its centre of mass
    (MNIST: a 20-pixel box) or by its box (Fashion-MNIST: 28)."""
    contrast = max(ink.max().item(), 1e-6)
    grain = NOISE * noise / contrast
    ink = (ink / contrast).clamp(0, 1)
    if grain > 0:
        ink = torch.where(ink > grain, ink, 0)
    rows, cols = (ink > INK).nonzero(as_tuple=True)
    if grain > 0:
        # a noise pixel alone can pass the grain's bar in a large photo; its 3×3 neighbourhood's mean cannot
        near = sum(
            ink[(rows + dy).clamp(0, ink.shape[0] - 1), (cols + dx).clamp(0, ink.shape[1] - 1)]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )
        rows, cols = rows[near > 3 * grain], cols[near > 3 * grain]  # a mean of over grain / 3
    if not len(rows):
        return torch.zeros(28, 28)
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = box / max(ink.shape)
    h, w = (max(1, round(side * scale)) for side in ink.shape)
    ink = F.interpolate(ink[None, None], size=(h, w), mode="area" if scale < 1 else "bilinear")[0, 0]
    ink = ink / ink.max().clamp(min=1e-6)  # strokes softened by the scaling back to full contrast, as MNIST's are
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


def border_median(x: torch.Tensor) -> float:
    """The median of the border pixels: the paper's tone."""
    border = torch.cat([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    return border.median().item()
