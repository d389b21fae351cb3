"""Building blocks shared by the YOLO architectures in ``yoloq.models``.

Attribute names (``conv``, ``bn``, ``act``, ``cv1``, ``m`` ...) follow the official YOLOv5
repository on purpose: official checkpoints are loaded by ``state_dict``, so the names are the
file format. The blocks are plain eager PyTorch; capture turns them into FX graphs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# YOLOv5 trains with these BatchNorm settings (it overrides PyTorch's defaults after building),
# and the running statistics in its checkpoints were accumulated with them.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def route(layers: nn.Module, sources: tuple, saved: frozenset[int], x):
    """Run a YOLO layer list the way its YAML wires it: ``sources[i]`` is -1 (the previous
    output), an earlier index, or a tuple of them (a list input, for Concat and the heads);
    outputs whose index is in ``saved`` are kept for later layers."""
    kept: dict[int, object] = {}
    for i, (layer, src) in enumerate(zip(layers, sources)):
        if not isinstance(src, int):
            x = [x if j == -1 else kept[j] for j in src]
        elif src != -1:
            x = kept[src]
        x = layer(x)
        if i in saved:
            kept[i] = x
    return x


def same_padding(kernel: int) -> int:
    """Padding that keeps the spatial size at stride 1 for an odd kernel."""
    return kernel // 2


def round_channels(channels: float, divisor: int = 8) -> int:
    """Channel counts are rounded *up* to a multiple of ``divisor`` after width scaling."""
    return int(math.ceil(channels / divisor) * divisor)


def scaled_depth(repeats: int, depth_multiple: float) -> int:
    """Repeats scale with depth but never drop to zero; single blocks are never scaled."""
    return max(round(repeats * depth_multiple), 1) if repeats > 1 else repeats


class Conv(nn.Module):
    """Conv2d (no bias, BN supplies it) -> BatchNorm2d -> SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, same_padding(k) if p is None else p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 then 3x3 conv, with a residual add when the shapes allow it."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        hidden = int(c_out * e)
        self.cv1 = Conv(c_in, hidden, 1, 1)
        self.cv2 = Conv(hidden, c_out, 3, 1, g=g)
        self.add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block: a bottleneck stack on one half, a bare 1x1 on the other, fused by a 1x1."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        hidden = int(c_out * e)
        self.cv1 = Conv(c_in, hidden, 1, 1)
        self.cv2 = Conv(c_in, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c_out, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast form: three chained k x k max-pools (receptive fields k,
    2k-1, 3k-2) instead of three parallel ones, concatenated with their input."""

    def __init__(self, c_in: int, c_out: int, k: int = 5):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, c_out, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        p1 = self.m(x)
        p2 = self.m(p1)
        return self.cv2(torch.cat((x, p1, p2, self.m(p2)), 1))


class Concat(nn.Module):
    """Concatenation as a module, so that routing layers have an index in the layer list."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


class Proto(nn.Module):
    """Mask prototypes for segmentation: 3x3 conv, 2x nearest upsample, 3x3 conv, 1x1 to nm maps."""

    def __init__(self, c_in: int, c_hidden: int = 256, c_out: int = 32):
        super().__init__()
        self.cv1 = Conv(c_in, c_hidden, k=3)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.cv2 = Conv(c_hidden, c_hidden, k=3)
        self.cv3 = Conv(c_hidden, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))
