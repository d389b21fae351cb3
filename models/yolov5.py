"""YOLOv5 (v6.0+ layout: 6x6 stem conv, C3 blocks, SPPF) with the anchor-based Detect head, and
YOLOv5-seg (Segment head = Detect + mask coefficients + Proto).

The module tree reproduces the official repository's, index for index (``model.0.conv.weight``,
``model.24.anchors`` ...), because official checkpoints are loaded by ``state_dict``. The layer
table below is the official one at depth 1 and width 1; scales shrink it by depth/width
multiples exactly as the official builder does (repeats rounded, channels rounded up to 8).

Eval-mode outputs are those of official v6/v7: Detect gives ``(decoded B x N x (5+nc), raw)``
where ``raw`` is the list of per-level ``B x na x ny x nx x no`` tensors; Segment gives
``(decoded, protos, raw)``. Training mode gives ``raw`` (``(raw, protos)`` for Segment).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from yoloq.models.common import C3, SPPF, Concat, Conv, Proto, round_channels, route, scaled_depth

# (depth_multiple, width_multiple) per scale, as in the official yolov5{n,s,m,l,x}.yaml files.
SCALES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}

# Pixel anchors (w, h) per level P3/8, P4/16, P5/32.
DEFAULT_ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
STRIDES = (8, 16, 32)

# (source layer(s), repeats, block, args) at depth = width = 1. A source of -1 is the previous
# layer. "C3/noskip" is a C3 whose bottlenecks have no residual add (the neck's C3 blocks).
LAYOUT = (
    (-1, 1, "Conv", (64, 6, 2, 2)),  # 0  P1/2 (v6.0 stem: one 6x6 conv instead of Focus)
    (-1, 1, "Conv", (128, 3, 2)),  # 1  P2/4
    (-1, 3, "C3", (128,)),
    (-1, 1, "Conv", (256, 3, 2)),  # 3  P3/8
    (-1, 6, "C3", (256,)),
    (-1, 1, "Conv", (512, 3, 2)),  # 5  P4/16
    (-1, 9, "C3", (512,)),
    (-1, 1, "Conv", (1024, 3, 2)),  # 7  P5/32
    (-1, 3, "C3", (1024,)),
    (-1, 1, "SPPF", (1024, 5)),  # 9  end of backbone
    (-1, 1, "Conv", (512, 1, 1)),
    (-1, 1, "Upsample", ()),
    ((-1, 6), 1, "Concat", ()),
    (-1, 3, "C3/noskip", (512,)),
    (-1, 1, "Conv", (256, 1, 1)),
    (-1, 1, "Upsample", ()),
    ((-1, 4), 1, "Concat", ()),
    (-1, 3, "C3/noskip", (256,)),  # 17 P3 output
    (-1, 1, "Conv", (256, 3, 2)),
    ((-1, 14), 1, "Concat", ()),
    (-1, 3, "C3/noskip", (512,)),  # 20 P4 output
    (-1, 1, "Conv", (512, 3, 2)),
    ((-1, 10), 1, "Concat", ()),
    (-1, 3, "C3/noskip", (1024,)),  # 23 P5 output
)
HEAD_SOURCES = (17, 20, 23)


class Detect(nn.Module):
    """Anchor-based head: one 1x1 conv per level predicting na x (5 + nc) values per cell.

    ``anchors`` is stored in grid units (pixels / stride), as in official checkpoints.
    """

    def __init__(
        self, nc: int, anchors: Sequence[Sequence[float]], channels: Sequence[int], strides=STRIDES, extra: int = 0
    ):
        super().__init__()
        self.nc = nc
        self.no = nc + 5 + extra  # box (4), objectness, classes, then any per-anchor extras
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        pixel_anchors = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)
        stride = torch.tensor(strides, dtype=torch.float32)
        self.register_buffer("anchors", pixel_anchors / stride.view(-1, 1, 1))
        # Not persistent: official checkpoints keep stride as a plain attribute, not a state key.
        self.register_buffer("stride", stride, persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in channels)

    def level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The raw prediction map of level ``i`` (subclasses add layers around the conv)."""
        return self.m[i](x)

    def forward(self, xs: list[torch.Tensor]):
        raw, decoded = [], []
        for i in range(self.nl):
            p = self.level(i, xs[i])
            bs, _, ny, nx = p.shape
            p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(p)
            if not self.training:
                decoded.append(self.decode(p, i).view(bs, -1, self.no))
        return raw if self.training else (torch.cat(decoded, 1), raw)

    def decode(self, p: torch.Tensor, level: int) -> torch.Tensor:
        xy, wh, scores = p.sigmoid().split((2, 2, self.no - 4), 4)
        return torch.cat((*self._boxes(xy, wh, level), scores), 4)

    def _boxes(self, xy_sig: torch.Tensor, wh_sig: torch.Tensor, level: int):
        """Centre offsets live in (-0.5, 1.5) cells and sizes in (0, 4) anchors: the bounded
        parameterisation of YOLOv5 (no exp), so large logits cannot explode the boxes."""
        ny, nx = xy_sig.shape[2], xy_sig.shape[3]
        ys = torch.arange(ny, device=xy_sig.device, dtype=xy_sig.dtype)
        xs = torch.arange(nx, device=xy_sig.device, dtype=xy_sig.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((gx, gy), 2).view(1, 1, ny, nx, 2) - 0.5
        anchor_px = (self.anchors[level] * self.stride[level]).view(1, self.na, 1, 1, 2)
        xy = (xy_sig * 2 + grid) * self.stride[level]
        wh = (wh_sig * 2) ** 2 * anchor_px
        return xy, wh

    def init_biases(self, image_size: int = 640) -> None:
        """Priors for training from scratch: about 8 objects per 640 image, uniform classes."""
        for conv, s in zip(self.m, self.stride.tolist()):
            b = conv.bias.detach().view(self.na, -1)
            b[:, 4] += math.log(8 / (image_size / s) ** 2)
            b[:, 5 : 5 + self.nc] += math.log(0.6 / (self.nc - 0.99))


class Segment(Detect):
    """Detect with nm mask coefficients per anchor, plus Proto on the P3 features."""

    def __init__(self, nc: int, anchors, channels: Sequence[int], nm: int = 32, npr: int = 256, strides=STRIDES):
        super().__init__(nc, anchors, channels, strides, extra=nm)
        self.nm = nm
        self.npr = npr
        self.proto = Proto(channels[0], npr, nm)

    def forward(self, xs: list[torch.Tensor]):
        protos = self.proto(xs[0])
        out = super().forward(xs)
        return (out, protos) if self.training else (out[0], protos, out[1])

    def decode(self, p: torch.Tensor, level: int) -> torch.Tensor:
        # Mask coefficients stay linear: they are combined with the prototypes before a sigmoid.
        xy, wh, scores, masks = p.split((2, 2, self.nc + 1, self.nm), 4)
        xy, wh = self._boxes(xy.sigmoid(), wh.sigmoid(), level)
        return torch.cat((xy, wh, scores.sigmoid(), masks), 4)


class YOLOv5(nn.Module):
    """The whole detector: ``model`` is the official 25-layer list, routed by ``sources``."""

    def __init__(
        self,
        depth_multiple: float,
        width_multiple: float,
        nc: int = 80,
        anchors: Sequence[Sequence[float]] = DEFAULT_ANCHORS,
        segment: bool = False,
        in_channels: int = 3,
        names: Sequence[str] | None = None,
    ):
        super().__init__()
        self.depth_multiple, self.width_multiple = depth_multiple, width_multiple
        layers, channels = build_layers(depth_multiple, width_multiple, in_channels)
        head_in = [channels[i + 1] for i in HEAD_SOURCES]  # channels[0] is the image
        if segment:
            npr = round_channels(256 * width_multiple)
            head = Segment(nc, anchors, head_in, nm=32, npr=npr)
        else:
            head = Detect(nc, anchors, head_in)
        head.init_biases()
        self.model = nn.Sequential(*layers, head)
        self.sources = tuple(src for src, *_ in LAYOUT) + (HEAD_SOURCES,)
        self.saved = frozenset(j for src in self.sources if not isinstance(src, int) for j in src if j >= 0)
        self.nc = nc
        self.names = list(names) if names is not None else [f"class{i}" for i in range(nc)]

    @property
    def stride(self) -> torch.Tensor:
        return self.model[-1].stride

    @property
    def anchors(self) -> torch.Tensor:
        """Anchors in pixels, ``nl x na x 2`` (the head stores them in grid units)."""
        head = self.model[-1]
        return head.anchors * head.stride.view(-1, 1, 1)

    def forward(self, x: torch.Tensor):
        return route(self.model, self.sources, self.saved, x)


def build_layers(depth_multiple: float, width_multiple: float, in_channels: int = 3):
    """The 24 layers before the head, and the output channels of each (index 0 = the input)."""
    channels = [in_channels]
    layers: list[nn.Module] = []
    for src, repeats, block, args in LAYOUT:
        c_in = channels[-1] if src == -1 else None
        if block == "Conv":
            c_out = round_channels(args[0] * width_multiple)
            layer = Conv(c_in, c_out, *args[1:])
        elif block.startswith("C3"):
            c_out = round_channels(args[0] * width_multiple)
            n = scaled_depth(repeats, depth_multiple)
            layer = C3(c_in, c_out, n, shortcut=block != "C3/noskip")
        elif block == "SPPF":
            c_out = round_channels(args[0] * width_multiple)
            layer = SPPF(c_in, c_out, args[1])
        elif block == "Upsample":
            c_out, layer = c_in, nn.Upsample(None, 2, "nearest")
        elif block == "Concat":
            c_out = sum(channels[-1] if j == -1 else channels[j + 1] for j in src)
            layer = Concat(1)
        else:
            raise ValueError(f"unknown block {block!r} in the YOLOv5 layout")
        layers.append(layer)
        channels.append(c_out)
    return layers, channels


def yolov5(scale: str, nc: int = 80, segment: bool = False, **kwargs) -> YOLOv5:
    """``yolov5("s")`` is YOLOv5s; ``segment=True`` gives YOLOv5s-seg."""
    if scale not in SCALES:
        raise ValueError(f"unknown YOLOv5 scale {scale!r}; valid: {sorted(SCALES)}")
    depth, width = SCALES[scale]
    return YOLOv5(depth, width, nc=nc, segment=segment, **kwargs)
