"""Plain `nn.Module` classifiers for 1×28×28 images, each built only from its constructor arguments.

`MLP` is a stack of dense layers; `ConvNet` puts blocks of convolutions (each block ends in a
2×2 max-pool) in front of the same dense stack. LeNet-5, the Keras example CNN, the lab CNN and
the BatchNorm/Dropout CNN are all `ConvNet`s: see `conf/model/` and `conf/experiment/`.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn

from digits.errors import DigitsError, require

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}

IntOrInts = int | Sequence[int]
FloatOrFloats = float | Sequence[float]


def _as_list(value: IntOrInts | FloatOrFloats, n: int | None = None) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    return values * n if n is not None and len(values) == 1 else values


def _check_widths(name: str, widths: IntOrInts) -> list[int]:
    values = _as_list(widths)
    ok = len(values) >= 1 and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in values)
    require(ok, name, widths, "a positive integer or a list of them")
    return values


def _check_activation(activation: str) -> type[nn.Module]:
    require(activation in ACTIVATIONS, "activation", activation, f"one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def _check_dropout(name: str, p: float) -> float:
    require(isinstance(p, int | float) and 0 <= p < 1, name, p, "a probability in [0, 1)")
    return float(p)


def dense_stack(
    in_features: int,
    widths: Sequence[int],
    activation: type[nn.Module],
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Linear → [BatchNorm] → activation → [Dropout] for each width; the classifier is not included."""
    require(isinstance(batch_norm, bool), "batch_norm", batch_norm, "true or false")
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Linear(in_features, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(activation())
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_features = width
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """Flatten → dense layers of `hidden_size` (an int for one layer, a list for several) → classes."""

    def __init__(
        self,
        hidden_size: IntOrInts = 128,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        widths = _check_widths("hidden_size", hidden_size)
        act = _check_activation(activation)
        in_features = math.prod(in_shape)
        self.features = nn.Flatten()
        self.hidden = dense_stack(in_features, widths, act, batch_norm, _check_dropout("dropout", dropout))
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.features(x)))


class ConvNet(nn.Module):
    """Conv blocks, then the MLP's dense stack.

    `channels` lists the blocks, each a list of conv widths followed by a 2×2 max-pool:
    LeNet-5 is `[[6], [16]]`, the Keras example CNN `[[32, 64]]`. `kernel_size` is one size for
    every conv or one per conv; `conv_dropout` is applied after each block's pool (one value for
    all blocks or one per block); `dropout` after each hidden dense layer. `global_pool` takes each channel's
    maximum over the last feature map instead of flattening it: a digit moved by the pools' whole stride
    gives the same features, away from the image's edges.
    """

    def __init__(
        self,
        channels: Sequence[Sequence[int]] = ((6,), (16,)),
        kernel_size: IntOrInts = 5,
        hidden_size: IntOrInts = (120, 84),
        activation: str = "relu",
        batch_norm: bool = False,
        conv_dropout: FloatOrFloats = 0.0,
        dropout: float = 0.0,
        padding: int = 0,
        global_pool: bool = False,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        blocks = [_check_widths("channels", block) for block in channels]
        require(len(blocks) >= 1, "channels", channels, "at least one block of conv widths")
        n_convs = sum(len(block) for block in blocks)
        kernels = _check_widths("kernel_size", kernel_size)
        require(len(kernels) in (1, n_convs), "kernel_size", kernel_size, f"one size or {n_convs}")
        kernels = _as_list(kernels, n_convs)
        drops = [_check_dropout("conv_dropout", p) for p in _as_list(conv_dropout, len(blocks))]
        require(len(drops) == len(blocks), "conv_dropout", conv_dropout, f"one value or {len(blocks)}")
        widths = _check_widths("hidden_size", hidden_size)
        act = _check_activation(activation)
        _check_fits(in_shape[1:], blocks, kernels, padding, kernel_size)
        require(isinstance(global_pool, bool), "global_pool", global_pool, "true or false")

        layers: list[nn.Module] = []
        in_channels, k = in_shape[0], iter(kernels)
        for block, p in zip(blocks, drops, strict=True):
            for out_channels in block:
                layers.append(nn.Conv2d(in_channels, out_channels, next(k), padding=padding))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out_channels))
                layers.append(act())
                in_channels = out_channels
            layers.append(nn.MaxPool2d(2))
            if p:
                layers.append(nn.Dropout(p))
        if global_pool:
            layers.append(nn.AdaptiveMaxPool2d(1))
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            in_features = self.features(torch.zeros(1, *in_shape)).shape[1]
        self.hidden = dense_stack(in_features, widths, act, batch_norm, _check_dropout("dropout", dropout))
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.features(x)))


def _feature_size(size: int, blocks: list[list[int]], kernels: list[int], padding: int) -> int:
    """Side of the last feature map, or 0 once a conv or pool has nothing left to work on."""
    k = iter(kernels)
    for block in blocks:
        for _ in block:
            size = size + 2 * padding - next(k) + 1
            if size < 1:
                return 0
        size //= 2
        if size < 1:
            return 0
    return size


def _check_fits(hw: Sequence[int], blocks: list[list[int]], kernels: list[int], padding: int, asked: IntOrInts) -> None:
    side = min(hw)
    if _feature_size(side, blocks, kernels, padding) >= 1:
        return
    if len(set(kernels)) == 1:
        fits = [k for k in range(1, side + 1) if _feature_size(side, blocks, [k] * len(kernels), padding) >= 1]
        allowed = f"1 to {max(fits)} for {hw[0]}×{hw[1]} inputs through {blocks}" if fits else "(none fit)"
    else:
        allowed = f"sizes whose feature maps stay ≥ 1 pixel on {hw[0]}×{hw[1]} inputs"
    raise DigitsError(f"kernel_size={asked!r} is too large; expected {allowed}")


def count_parameters(net: nn.Module) -> int:
    """Trainable parameters, the figure Keras' `model.summary()` calls 'Trainable params'."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
