"""Image files as a model's inputs: found (files, directories, globs, list files), read faithfully and within
bounds, and framed the way the dataset's own images were."""

import glob
import io
import itertools
import math
import os
import stat
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from digits.errors import DigitsError, is_int, is_number, require

SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
# the decoders Pillow may try on a file, whatever its name: not EPS (Pillow hands it to Ghostscript) nor any
# other format a camera, scanner or drawing program would not write (JPEG includes phones' MPO)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
MAX_PIXELS = 40_000_000  # a phone photo is 12-50 MP; beyond this a file is refused before it is decoded
MAX_FRAMES = 100  # of an animation, looked at for one with ink: each may be 40 MP, their number is unbounded
MAX_BYTES = 256 * 2**20  # over twice an uncompressed 40 MP RGB TIFF; beyond this a file is refused before it is read
INK = 0.1  # the least contrast, after the paper's tone is taken off, that counts as ink
MIN_RULED = 64  # pixels: on a smaller image a ruled line and a digit's stroke are too alike to tell apart
RULE_COVER = 0.75  # ink covers a printed line for at least this share of its length (a faint one has gaps)
RULE_WIDTH = 0.025  # a printed line is at most this share of the image's height wide (a stroke is wider)
RULE_FAINT = 0.6  # one printed line alone is at most this share of the writing's darkness (a stroke is not)
RULE_TILT = 4  # degrees: a ruled line on a photo taken a little askew
MIN_MARK = 4  # pixels: ink that spans fewer, tall or wide, is a speck or a dot (a 3×3 image of a digit is not one)
MARK_SHARE = 1 / 200  # of the image's longer side: a digit in a photo of a page spans more than a speck of dust
NOISE = 5  # ink stands this many times the paper's noise above it: a pixel of grain does so once in 3.5 million


@dataclass(frozen=True)
class ImageSpec:
    """What a dataset's images are to the models trained on it: the class names, the pixels' mean and std they
    are normalised by, and how its makers framed each object in 28×28 (scaled into a `frame_box`-pixel box,
    centred by its centre of mass or else by that box). The values are checked: they may come from a
    checkpoint."""

    classes: Sequence[str]
    mean: float
    std: float
    frame_box: int = 20
    frame_by_mass: bool = True

    def __post_init__(self) -> None:
        named = isinstance(self.classes, list | tuple) and all(isinstance(c, str) for c in self.classes)
        require(named and len(self.classes) >= 2, "classes", self.classes, "a list of two or more class names")
        require(is_number(self.mean) and 0 <= self.mean <= 1, "mean", self.mean, "the pixels' mean in [0, 1]")
        ok_std = is_number(self.std) and 0 < self.std <= 1
        require(ok_std, "std", self.std, "the pixels' standard deviation in (0, 1]")
        ok_box = is_int(self.frame_box) and 1 <= self.frame_box <= 28
        require(ok_box, "frame_box", self.frame_box, "a side from 1 to 28 pixels")
        require(isinstance(self.frame_by_mass, bool), "frame_by_mass", self.frame_by_mass, "true or false")

    def model_input(self, views: torch.Tensor) -> torch.Tensor:
        """Framed 28×28 images in [0, 1] (`model_view`'s) as a batch the model takes: normalised, one channel."""
        return ((views - self.mean) / self.std).unsqueeze(1)


def find_inputs(entries: Iterable[str]) -> Iterator[Path]:
    """Each entry as the files it names: a file as itself, a directory as the images below it (recursively,
    sorted; hidden ones left out, as a pattern leaves them: macOS's `._` copies, `.thumbnails/`), a pattern
    with `*`, `?` or `[` as the files it matches (`**` for any depth). A name that is none of these is
    yielded as it is, to be reported as missing."""
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = (Path(folder, name) for folder, files in folders_below(str(path)) for name in files)
            images = (p for p in found if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
            yield from sorted(p for p in images if p.is_file())
        elif not path.exists() and any(c in entry for c in "*?["):
            yield from sorted({Path(p) for p in expand(str(path)) if os.path.isfile(p)})
        else:
            yield path


def folders_below(top: str) -> Iterator[tuple[str, list[str]]]:
    """`top` and the folders below it, each with the names in it that are not folders; hidden folders left out,
    symlinked ones followed, each real folder once.
    Ours, not `glob`'s `**`: that walks into a link back up the tree (`loop -> ..`) again on every pass, and
    through two such links its paths multiply until memory runs out."""
    seen = {os.path.realpath(top)}
    for here, dirs, files in os.walk(top, followlinks=True):
        kept = []
        for name in sorted(dirs, key=lambda d: (os.path.islink(os.path.join(here, d)), d)):  # real names first
            real = os.path.realpath(os.path.join(here, name))
            if not name.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(name)
        dirs[:] = sorted(kept)
        yield here, files


def expand(pattern: str) -> Iterator[str]:
    """The names a pattern matches, as `glob` gives them, but with each `**` walked by `folders_below`."""
    parts = Path(pattern).parts
    if "**" not in parts:
        yield from glob.glob(pattern)
        return
    at = parts.index("**")
    rest = parts[at + 1 :] or ("*",)
    for head in glob.glob(os.path.join(*parts[:at])) if at else [os.curdir]:
        for folder, _ in folders_below(head):
            yield from expand(os.path.join(glob.escape(folder), *rest))


def read_gray(path: Path) -> torch.Tensor:
    """A file as H×W floats in [0, 1], white paper 1, as its pixels are meant to be seen: EXIF orientation
    applied, 16-bit, 32-bit, float and palette images converted at full depth, a transparent canvas as white
    paper, the first frame with anything on it of an animation (frames decoded one at a time, up to that one,
    and no further than `MAX_FRAMES`).

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
    # their decoders registered, Image.open has every one of FORMATS; here, not at import: training imports
    # this module, and never opens a file
    import PIL.TiffImagePlugin
    import PIL.WebPImagePlugin  # noqa: F401

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            if image.width * image.height > MAX_PIXELS:
                raise DigitsError(f"{image.width}×{image.height} pixels is over the limit of {MAX_PIXELS:,}")
            for frame in itertools.islice(ImageSequence.Iterator(image), MAX_FRAMES):
                gray = to_gray(ImageOps.exif_transpose(frame) if frame.getexif() else frame)
                if gray.max() - gray.min() > INK:
                    return gray
                first = gray if first is None else first
    except DigitsError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DigitsError(f"over the limit of {MAX_PIXELS:,} pixels (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise DigitsError(f"not an image in a format read here ({', '.join(FORMATS)})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DigitsError(f"not a readable image ({type(err).__name__})") from None
    return first


def to_gray(image: Image.Image) -> torch.Tensor:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit, 32-bit or float gray: scaled by its depth
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise DigitsError("pixels that are not numbers (NaN or infinity)")
        low, high = min(values.min(), 0.0), values.max()
        if image.mode == "F":  # floats in [0, 1] as they are, any other range by its largest value
            full = max(high, 1.0)
        else:
            full = 65535.0 if image.mode.startswith("I;16") or high <= 65535 else high
        return torch.from_numpy((values - low) / (full - low)).float()
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
    sheet is not ink, nor are the lines of a ruled or squared sheet. Raises `DigitsError` where no ink stands
    out from the paper.
    """
    tone = border_median(x)
    if tone > 0.5:  # dark ink on light paper: flip to MNIST's white on black
        x = 1 - x
    paper, noise = paper_under(x)
    if 0.25 < tone < 0.75:  # a grey sheet, or a light one in shadow: the ink is what stands out the most
        other = 1 - x
        other_paper, other_noise = paper_under(other)
        if (other - other_paper).max() > (x - paper).max():
            x, paper, noise = other, other_paper, other_noise
    ink = x - paper
    if ink.max().item() < max(INK, NOISE * noise):
        raise DigitsError("no ink found: the image is blank or has no contrast")
    if x.shape == (28, 28):
        return x
    framed = frame(ink, box, by_mass, noise)
    if not framed.any():
        raise DigitsError("no ink found: nothing but the paper's grain and its ruled lines")
    return framed


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
    paper's grain (under NOISE × `noise`) and ruled lines (`ruled_lines`) cleared, its bounding box scaled to
    fit `box`×`box` (aspect kept) and stretched to full contrast again, then placed on a 28×28 canvas, centred
    by its centre of mass (MNIST: a 20-pixel box) or by its box (Fashion-MNIST: 28). Raises `DigitsError` where
    the ink is a mark too small to be a digit (`MIN_MARK`, `MARK_SHARE`)."""
    contrast = max(ink.max().item(), 1e-6)
    grain = NOISE * noise / contrast
    ink = (ink / contrast).clamp(0, 1)
    lines = ruled_lines(ink, max(INK, grain))  # on the grain too: a faint line in a shadow has gaps without it
    if grain > 0:
        ink = torch.where(ink > grain, ink, 0)
    ink = torch.where(lines, 0, ink)
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
    tall, wide = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
    least = max(MIN_MARK, math.ceil(MARK_SHARE * max(ink.shape)))
    if max(tall, wide) < least:
        raise DigitsError(f"no digit found: the only ink is a {wide}×{tall}-pixel mark (a digit spans {least} or more)")
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


def ruled_lines(ink: torch.Tensor, level: float) -> torch.Tensor:
    """The pixels of white-on-black ink (full contrast) that are a ruled or squared sheet's printed lines where
    no writing crosses or runs along them: straight lines across the whole image, near-horizontal or
    near-vertical, thin beside it (`printed_lines`). Where the writing meets a line, the line's pixels stay,
    so no stroke is cut. Pixels over `level` are ink; a line is followed down to half of it."""
    mask = ink > level
    if min(ink.shape) < MIN_RULED:
        return torch.zeros_like(mask)
    across, width_across = printed_lines(ink, level) if reaches_across(mask) else (torch.zeros_like(mask), 0)
    down, width_down = printed_lines(ink.T, level) if reaches_across(mask.T) else (torch.zeros_like(mask.T), 0)
    down = down.T
    # the soft edge of a ruling's line that runs just outside the image
    across[:width_across], across[across.shape[0] - width_across :] = True, True
    down[:, :width_down], down[:, down.shape[1] - width_down :] = True, True
    writing = mask & ~across & ~down
    # a line's pixel is the writing's where the writing goes on just beyond the line's width, on either side
    meets_across = shifted(writing, width_across + 1, 0) | shifted(writing, -width_across - 1, 0)
    meets_down = shifted(writing, width_down + 1, 1) | shifted(writing, -width_down - 1, 1)
    return (across & ~meets_across) | (down & ~meets_down)


def reaches_across(mask: torch.Tensor) -> bool:
    """Whether ink reaches both the left and the right edge, as a line across the image does."""
    edge = max(2, mask.shape[1] // 20)
    return bool(mask[:, :edge].any() and mask[:, -edge:].any())


def printed_lines(ink: torch.Tensor, level: float) -> tuple[torch.Tensor, int]:
    """The near-horizontal printed lines of white-on-black ink (full contrast, ink over `level`), and the
    widest one's width in pixels.

    At the tilt (up to RULE_TILT degrees) where lines stand out most, the bands of lines-through-the-image
    that ink covers (down to half of `level`: a faint line in a shadow has gaps at the full level) for
    RULE_COVER of their length and at most RULE_WIDTH of the image's height (or 2 pixels) wide, and their
    soft edges. Two or more are a ruling; one alone (a ruled sheet's one line in the picture, or a digit's bar
    on a tight crop) only where it is fainter than the writing, as printed lines are, or nothing else is
    written."""
    h, w = ink.shape
    mask = ink > level
    none = torch.zeros_like(mask)
    step = 1 + w // 512  # every step-th column measures a line's coverage as well as all of them
    rows, cols = (ink[:, ::step] > level / 2).nonzero(as_tuple=True)
    cols = cols * step
    columns = torch.arange(0, w, step)

    def measured(tilts: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """For each tilt: its score and which lines are printed."""
        slopes = torch.tensor(tilts).deg2rad().tan()[:, None]
        pad = math.ceil(w * slopes.abs().max().item()) + 1
        n = h + 2 * pad
        each = torch.arange(len(tilts))[:, None]
        lines = (rows - cols * slopes).round().long() + pad  # the line through each pixel, where it meets column 0
        covered = torch.bincount((lines + each * n).flatten(), minlength=len(tilts) * n).view(-1, n).float()
        starts = (-columns * slopes).round().long() + pad + each * (n + 1)  # column c crosses lines starts..+h-1
        size = len(tilts) * (n + 1)
        enter, leave = (torch.bincount(at.flatten(), minlength=size)[:size] for at in (starts, starts + h))
        length = (enter - leave).view(-1, n + 1).cumsum(1)[:, :n].float()  # how many columns each line crosses
        coverage = covered / length.clamp(min=1)
        across = torch.where(length >= len(columns) / 4, coverage, 0)  # the tilt is chosen on lines across
        scores = across.pow(4).mean(1)  # the tilt that gathers the lines into the fewest, fullest ones
        # a line that leaves the image near a corner counts too, at the tilt of those that cross it
        return scores, (coverage >= RULE_COVER) & (length >= 4), slopes[:, 0], pad

    tilts = [float(t) for t in range(-RULE_TILT, RULE_TILT + 1)]  # a degree apart, then finer about the best
    for half in (0.5, 0.25):
        best = tilts[int(measured(tilts)[0].argmax())]
        tilts = [best - half, best, best + half]
    scores, printed_at, slopes, pad = measured(tilts)
    on, slope = printed_at[int(scores.argmax())], slopes[int(scores.argmax())].item()
    edges = torch.diff(on.int(), prepend=torch.zeros(1, dtype=torch.int), append=torch.zeros(1, dtype=torch.int))
    starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
    thin = (ends - starts) <= max(2, round(RULE_WIDTH * h))
    if not thin.any():
        return none, 0
    printed = torch.zeros_like(on)
    for start, end in zip(starts[thin].tolist(), ends[thin].tolist(), strict=True):
        printed[max(start - 1, 0) : end + 1] = True  # and its soft edges, which ink covers less
    found = printed[(torch.arange(h)[:, None] - torch.arange(w)[None, :] * slope).round().long() + pad]
    if thin.sum() == 1:
        writing = ink[mask & ~found]
        writing = writing[:: 1 + len(writing) // 1_000_000]  # a quantile of a million pixels is as good
        lined = ink[mask & found]  # none where the line is fainter than the bar for ink throughout
        if len(writing) and len(lined) and lined.median() > RULE_FAINT * writing.quantile(0.9):
            return none, 0
    return found, int((ends - starts)[thin].max()) + 2


def shifted(mask: torch.Tensor, by: int, dim: int) -> torch.Tensor:
    """A mask moved `by` pixels along `dim`, what moves in from outside False."""
    out = torch.zeros_like(mask)
    n = mask.shape[dim]
    if abs(by) >= n:
        return out
    if by >= 0:
        out.narrow(dim, by, n - by).copy_(mask.narrow(dim, 0, n - by))
    else:
        out.narrow(dim, 0, n + by).copy_(mask.narrow(dim, -by, n + by))
    return out


def border_median(x: torch.Tensor) -> float:
    """The median of the border pixels: the paper's tone."""
    border = torch.cat([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    return border.median().item()
