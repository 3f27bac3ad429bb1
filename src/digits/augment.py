"""Random training augmentations on whole batches on the device, each image drawn its own way.

Images are normalised, so every operation but mirroring works on the ink alone (the image less its
background value `fill`) and puts the background back. Geometry first (mirror, shift, turn, scale, elastic
warp), then the pen (strokes thicker or thinner), then the ways a picture of a digit loses quality outside
MNIST: low resolution, blur, weak contrast.
"""

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from digits.errors import is_number, require


class Augment:
    """The augmentations a dataset config asks for; calling it on a batch applies them all."""

    # torchvision's per-sample path has no twin of these
    DEVICE_ONLY = ("elastic", "stroke", "low_res", "blur", "contrast")

    def __init__(
        self,
        translate: int = 0,
        rotate: float = 0.0,
        zoom: float = 0.0,
        elastic: float = 0.0,
        flip: bool = False,
        stroke: float = 0.0,
        low_res: int = 0,
        blur: float = 0.0,
        contrast: float = 0.0,
        degrade: float = 1.0,
        fill: float = 0.0,
    ) -> None:
        require(isinstance(translate, int) and 0 <= translate <= 8, "translate", translate, "0 (off) to 8 pixels")
        require(is_number(rotate) and 0 <= rotate <= 180, "rotate", rotate, "an angle from 0 (off) to 180 degrees")
        require(is_number(zoom) and 0 <= zoom <= 0.5, "zoom", zoom, "a scale range from 0 (off) to 0.5")
        require(is_number(elastic) and 0 <= elastic <= 4, "elastic", elastic, "0 (off) to 4 pixels of warp")
        require(isinstance(flip, bool), "flip", flip, "true or false")
        require(is_number(stroke) and 0 <= stroke <= 1, "stroke", stroke, "0 (off) to 1 (a pixel thicker or thinner)")
        ok_res = isinstance(low_res, int) and (low_res == 0 or 4 <= low_res <= 27)
        require(ok_res, "low_res", low_res, "0 (off), or the smallest side to shrink to, 4 to 27 pixels")
        require(is_number(blur) and 0 <= blur <= 3, "blur", blur, "0 (off) to a Gaussian sigma of 3 pixels")
        require(is_number(contrast) and 0 <= contrast < 1, "contrast", contrast, "0 (off) up to, not including, 1")
        require(is_number(degrade) and 0 < degrade <= 1, "degrade", degrade, "a share of the images in (0, 1]")
        self.translate, self.rotate, self.zoom, self.elastic = translate, float(rotate), float(zoom), float(elastic)
        self.flip, self.stroke = flip, float(stroke)
        self.low_res, self.blur, self.contrast = low_res, float(blur), float(contrast)
        self.degrade, self.fill = float(degrade), fill

    def __bool__(self) -> bool:
        return self.flip or self._on_ink()

    def _on_ink(self) -> bool:
        shape = (self.translate, self.rotate, self.zoom, self.elastic, self.stroke)
        return any(shape) or any((self.low_res, self.blur, self.contrast))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.flip:  # exact on the images themselves
            images = random_flip(images, generator)
        if not self._on_ink():
            return images
        ink = images - self.fill
        if self.translate:
            ink = random_translate(ink, self.translate, generator)
        if self.rotate or self.zoom or self.elastic:
            ink = random_warp(ink, self.rotate, self.zoom, self.elastic, generator)
        if self.stroke:
            ink = random_stroke(ink, self.stroke, generator)
        if self.low_res:
            ink = random_low_res(ink, self.low_res, generator)
        if self.blur:
            sigma = self._some(uniform(len(ink), 0.0, self.blur, ink.device, generator), 0.0, generator)
            ink = gaussian_blur(ink, sigma)
        if self.contrast:
            scale = self._some(uniform(len(ink), 1 - self.contrast, 1.0, ink.device, generator), 1.0, generator)
            ink = ink * scale[:, None, None, None]
        return ink + self.fill

    def _some(self, drawn: torch.Tensor, untouched: float, generator: torch.Generator) -> torch.Tensor:
        """Each image's draw with probability `degrade`, else the value that leaves it as it is."""
        if self.degrade == 1:
            return drawn
        chosen = torch.rand(len(drawn), device=drawn.device, generator=generator) < self.degrade
        return torch.where(chosen, drawn, untouched)


def uniform(n: int, low: float, high: float, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=device, generator=generator)


def random_translate(ink: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Move each image by its own random (dy, dx) in [-shift, shift]²."""
    dy, dx = shift - torch.randint(0, 2 * shift + 1, (2, len(ink)), device=ink.device, generator=generator)
    return translate(ink, dy, dx, shift)


def translate(ink: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, most: int) -> torch.Tensor:
    """Move each image by its own (dy, dx) pixels (down, right; each at most `most`), filling with no ink."""
    n, _, h, w = ink.shape
    padded = F.pad(ink, (most,) * 4)
    rows = (torch.arange(h, device=ink.device) + most - dy[:, None])[:, :, None]
    cols = (torch.arange(w, device=ink.device) + most - dx[:, None])[:, None, :]
    return padded[torch.arange(n, device=ink.device)[:, None, None], 0, rows, cols].unsqueeze(1)


def random_warp(
    ink: torch.Tensor, degrees: float, zoom: float, elastic: float, generator: torch.Generator
) -> torch.Tensor:
    """Turn each image by its own angle in [-degrees, degrees], scale it by a factor in [1 - zoom, 1 + zoom]
    about its centre, and bend it by a smooth random field of up to `elastic` pixels (bilinear)."""
    n, _, h, w = ink.shape
    turn, scale = uniform(2 * n, -1.0, 1.0, ink.device, generator).view(2, n)
    angle, factor = turn * math.radians(degrees), 1 + scale * zoom
    cos, sin, zero = angle.cos() / factor, angle.sin() / factor, torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    if elastic:
        # a coarse 4×4 field of random offsets, interpolated smoothly to every pixel (grid units: 2 / side)
        coarse = uniform(n * 2 * 16, -1.0, 1.0, ink.device, generator).view(n, 2, 4, 4)
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp(-1, 1)
        grid = grid + field.permute(0, 2, 3, 1) * (2 * elastic / torch.tensor([w, h], device=ink.device))
    return F.grid_sample(ink, grid, align_corners=False)


def thicken(ink: torch.Tensor) -> torch.Tensor:
    """Strokes a pixel thicker on every side: each pixel the most ink of its 3×3 neighbourhood."""
    return _over_neighbours(ink, (1, 1, 1, 1), 3, torch.maximum)


def thin(ink: torch.Tensor) -> torch.Tensor:
    """Strokes a pixel thinner: each pixel the least ink of its 2×2 neighbourhood (none beyond the edge)."""
    return _over_neighbours(ink, (0, 1, 0, 1), 2, torch.minimum)


def _over_neighbours(
    ink: torch.Tensor, pad: tuple[int, ...], size: int, pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Each pixel's `pick` over a size×size neighbourhood (the images `pad`ded with no ink), row then column.
    Shifted views, not max_pool2d: on a CPU, for one channel, they take an eighth of its time."""
    padded, (h, w) = F.pad(ink, pad), ink.shape[-2:]
    rows = functools.reduce(pick, (padded[..., i : i + h, :] for i in range(size)))
    return functools.reduce(pick, (rows[..., j : j + w] for j in range(size)))


def random_stroke(ink: torch.Tensor, most: float, generator: torch.Generator) -> torch.Tensor:
    """Each image's strokes moved towards `thicken`'s (weight w > 0) or `thin`'s (w < 0), its own w drawn in
    [-most, most]: the pens and fonts of people's digits, from hairlines to bold."""
    w = uniform(len(ink), -most, most, ink.device, generator)[:, None, None, None]
    return ink + w.clamp(min=0) * (thicken(ink) - ink) + (-w).clamp(min=0) * (thin(ink) - ink)


def random_flip(ink: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mirrored = torch.rand(len(ink), device=ink.device, generator=generator) < 0.5
    return torch.where(mirrored[:, None, None, None], ink.flip(-1), ink)


def random_low_res(ink: torch.Tensor, smallest: int, generator: torch.Generator) -> torch.Tensor:
    """Half the images, at random, shrunk to one side drawn per batch in [smallest, 27] pixels and scaled back
    up: the soft strokes of a low-resolution scan."""
    side = int(torch.randint(smallest, ink.shape[-1], (1,), device=ink.device, generator=generator))
    chosen = torch.rand(len(ink), device=ink.device, generator=generator) < 0.5
    return on_some(ink, chosen, lambda some: resample(some, side))


def on_some(ink: torch.Tensor, chosen: torch.Tensor, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The `chosen` images changed by `change`, the others as they are: `change` runs on the chosen alone, which
    on a CPU costs a fraction of running it on all and picking with torch.where."""
    out = ink.clone()
    out[chosen] = change(ink[chosen])
    return out


def resample(ink: torch.Tensor, side: int) -> torch.Tensor:
    """Images shrunk to side×side (each pixel the mean of what it covers) and scaled back up bilinearly."""
    small = F.interpolate(ink, size=(side, side), mode="area")
    return F.interpolate(small, size=ink.shape[-2:], mode="bilinear", align_corners=False)


def gaussian_blur(ink: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred by a Gaussian of its own sigma in pixels (0 leaves it as it is, and costs nothing)."""
    blurred = sigma > 0
    if not blurred.all():
        return on_some(ink, blurred, lambda some: gaussian_blur(some, sigma[blurred])) if blurred.any() else ink
    n, _, h, w = ink.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=ink.device, dtype=ink.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma.clamp(min=1e-3)[:, None].to(ink.dtype) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    planes = F.pad(ink.view(1, n, h, w), (radius,) * 4)  # one plane per image, each with its own kernel
    planes = F.conv2d(planes, kernel.view(n, 1, -1, 1), groups=n)
    return F.conv2d(planes, kernel.view(n, 1, 1, -1), groups=n).view(n, 1, h, w)
