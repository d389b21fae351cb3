"""YOLOv8 and YOLO11 (anchor-free, DFL box regression) and their -seg variants.

Both share one frame: a layer list routed by source indices (as in YOLOv5) ending in a decoupled
head that predicts, per cell of P3/P4/P5, a 16-bin distribution for each box side (``cv2``),
class logits (``cv3``) and, for segmentation, 32 mask coefficients (``cv4``) plus Proto maps.
YOLO11 swaps C2f for C3k2, adds C2PSA attention after SPPF, and makes the class branch
depth-wise. The module tree reproduces the ultralytics package's index for index
(``model.22.cv2.0.0.conv.weight``), because its checkpoints are loaded by ``state_dict``.

Eval outputs mirror ultralytics' first element and replace its dict of raw tensors by the list of
per-level ``B x (4*reg_max + nc [+ nm]) x H x W`` tensors:
Detect gives ``(decoded, raw)`` with ``decoded`` ``B x (4 + nc) x A`` (xywh in pixels, sigmoid
scores); Segment gives ``((decoded, protos), raw)`` with ``nm`` linear mask coefficients appended
to ``decoded``. Training mode gives ``raw`` (``(raw, protos)`` for Segment).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from yoloq.models.common import SPPF, Concat, Conv, round_channels, route, scaled_depth
from yoloq.models.ultralytics_blocks import DFL, C2f, C2PSA, C3k2, ProtoT, dw_conv

STRIDES = (8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture at depth = width = 1, and the official (depth, width, max_channels) per
    scale. ``c3k_scales``: ultralytics switches C3k2's inner blocks to C3k by scale *name*."""

    name: str
    layout: tuple  # (source(s), repeats, block, args) rows, as in the official YAML
    head_sources: tuple[int, ...]
    scales: Mapping[str, tuple[float, float, int]]
    legacy_head: bool  # True: YOLOv8's class branch of two dense 3x3 convs
    c3k_scales: frozenset[str] = frozenset()


_UP, _CAT = "Upsample", "Concat"
YOLOV8 = Family(
    "yolov8",
    layout=(
        (-1, 1, "Conv", (64, 3, 2)), (-1, 1, "Conv", (128, 3, 2)), (-1, 3, "C2f", (128, True)),
        (-1, 1, "Conv", (256, 3, 2)), (-1, 6, "C2f", (256, True)),  # 4: P3/8
        (-1, 1, "Conv", (512, 3, 2)), (-1, 6, "C2f", (512, True)),  # 6: P4/16
        (-1, 1, "Conv", (1024, 3, 2)), (-1, 3, "C2f", (1024, True)), (-1, 1, "SPPF", (1024, 5)),  # 9: P5/32
        (-1, 1, _UP, ()), ((-1, 6), 1, _CAT, ()), (-1, 3, "C2f", (512,)),
        (-1, 1, _UP, ()), ((-1, 4), 1, _CAT, ()), (-1, 3, "C2f", (256,)),  # 15: P3 out
        (-1, 1, "Conv", (256, 3, 2)), ((-1, 12), 1, _CAT, ()), (-1, 3, "C2f", (512,)),  # 18: P4 out
        (-1, 1, "Conv", (512, 3, 2)), ((-1, 9), 1, _CAT, ()), (-1, 3, "C2f", (1024,)),  # 21: P5 out
    ),
    head_sources=(15, 18, 21),
    scales={"n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768),
            "l": (1.00, 1.00, 512), "x": (1.00, 1.25, 512)},
    legacy_head=True,
)
YOLO11 = Family(
    "yolo11",
    layout=(
        (-1, 1, "Conv", (64, 3, 2)), (-1, 1, "Conv", (128, 3, 2)), (-1, 2, "C3k2", (256, False, 0.25)),
        (-1, 1, "Conv", (256, 3, 2)), (-1, 2, "C3k2", (512, False, 0.25)),  # 4: P3/8
        (-1, 1, "Conv", (512, 3, 2)), (-1, 2, "C3k2", (512, True)),  # 6: P4/16
        (-1, 1, "Conv", (1024, 3, 2)), (-1, 2, "C3k2", (1024, True)),
        (-1, 1, "SPPF", (1024, 5)), (-1, 2, "C2PSA", (1024,)),  # 10: P5/32
        (-1, 1, _UP, ()), ((-1, 6), 1, _CAT, ()), (-1, 2, "C3k2", (512, False)),
        (-1, 1, _UP, ()), ((-1, 4), 1, _CAT, ()), (-1, 2, "C3k2", (256, False)),  # 16: P3 out
        (-1, 1, "Conv", (256, 3, 2)), ((-1, 13), 1, _CAT, ()), (-1, 2, "C3k2", (512, False)),  # 19: P4 out
        (-1, 1, "Conv", (512, 3, 2)), ((-1, 10), 1, _CAT, ()), (-1, 2, "C3k2", (1024, True)),  # 22: P5 out
    ),
    head_sources=(16, 19, 22),
    scales={"n": (0.50, 0.25, 1024), "s": (0.50, 0.50, 1024), "m": (0.50, 1.00, 512),
            "l": (1.00, 1.00, 512), "x": (1.00, 1.50, 512)},
    legacy_head=False,
    c3k_scales=frozenset("mlx"),
)
FAMILIES = {f.name: f for f in (YOLOV8, YOLO11)}
BLOCKS = {"Conv": Conv, "C2f": C2f, "C3k2": C3k2, "SPPF": SPPF, "C2PSA": C2PSA}
REPEATED = frozenset({"C2f", "C3k2", "C2PSA"})  # blocks that take the repeat count as an argument


class Detect(nn.Module):
    """Anchor-free decoupled head: per level a box branch (``cv2``: 4 x reg_max bin logits) and
    a class branch (``cv3``: nc logits). ``extra`` channels (Segment's mask coefficients) are
    appended to each level's raw tensor and passed through decoding linearly."""

    def __init__(self, nc: int, channels: Sequence[int], reg_max: int = 16, legacy: bool = True, extra: int = 0):
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(channels), reg_max
        self.no = 4 * reg_max + nc + extra
        box_c = max(16, channels[0] // 4, 4 * reg_max)
        cls_c = max(channels[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(c, box_c, 3), Conv(box_c, box_c, 3), nn.Conv2d(box_c, 4 * reg_max, 1)) for c in channels
        )
        self.cv3 = nn.ModuleList(self._class_branch(c, cls_c, legacy) for c in channels)
        self.dfl = DFL(reg_max)
        # Not persistent: ultralytics checkpoints keep stride as a plain attribute, not a state key.
        self.register_buffer("stride", torch.tensor(STRIDES, dtype=torch.float32), persistent=False)

    def _class_branch(self, c_in: int, c_hidden: int, legacy: bool) -> nn.Sequential:
        if legacy:
            return nn.Sequential(Conv(c_in, c_hidden, 3), Conv(c_hidden, c_hidden, 3), nn.Conv2d(c_hidden, self.nc, 1))
        # YOLO11: each dense 3x3 becomes a depth-wise 3x3 then a 1x1, far cheaper at the same field.
        return nn.Sequential(
            nn.Sequential(dw_conv(c_in, c_in, 3), Conv(c_in, c_hidden, 1)),
            nn.Sequential(dw_conv(c_hidden, c_hidden, 3), Conv(c_hidden, c_hidden, 1)),
            nn.Conv2d(c_hidden, self.nc, 1),
        )

    def level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.cv2[i](x), self.cv3[i](x)), 1)

    def forward(self, xs: list[torch.Tensor]):
        raw = [self.level(i, x) for i, x in enumerate(xs)]
        return raw if self.training else (self.decode(raw), raw)

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Raw levels -> ``B x (4 + nc + extra) x A``: xywh pixels, sigmoid scores, extras."""
        b = raw[0].shape[0]
        flat = torch.cat([r.view(b, self.no, -1) for r in raw], 2)
        box, scores, extra = flat.split((4 * self.reg_max, self.nc, self.no - 4 * self.reg_max - self.nc), 1)
        points, strides = self.anchor_points(raw)
        left_top, right_bottom = self.dfl(box).chunk(2, 1)  # distances from the cell centre, in cells
        top_left, bottom_right = points - left_top, points + right_bottom
        xywh = torch.cat(((top_left + bottom_right) / 2, bottom_right - top_left), 1) * strides
        return torch.cat((xywh, scores.sigmoid(), extra), 1)

    def anchor_points(self, raw: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell centres ``2 x A`` (x, y in cells) and each one's stride ``1 x A``, level by level."""
        points, strides = [], []
        for i, r in enumerate(raw):
            h, w = r.shape[2:]
            ys = torch.arange(h, device=r.device, dtype=r.dtype) + 0.5
            xs = torch.arange(w, device=r.device, dtype=r.dtype) + 0.5
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack((gx, gy)).view(2, -1))
            strides.append(self.stride[i].to(r.dtype).expand(1, h * w))
        return torch.cat(points, 1), torch.cat(strides, 1)

    def init_biases(self, image_size: int = 640) -> None:
        """Priors for training from scratch: boxes about 2 bins wide per side, and about 5 objects
        per image spread over the classes."""
        for box, cls, s in zip(self.cv2, self.cv3, self.stride.tolist()):
            box[-1].bias.data[:] = 2.0
            cls[-1].bias.data[: self.nc] = math.log(5 / self.nc / (image_size / s) ** 2)


class Segment(Detect):
    """Detect plus ``nm`` mask coefficients per cell (``cv4``) and Proto maps on P3."""

    def __init__(self, nc: int, channels: Sequence[int], nm: int = 32, npr: int = 256, reg_max: int = 16,
                 legacy: bool = True):
        super().__init__(nc, channels, reg_max, legacy, extra=nm)
        self.nm, self.npr = nm, npr
        self.proto = ProtoT(channels[0], npr, nm)
        mask_c = max(channels[0] // 4, nm)
        self.cv4 = nn.ModuleList(
            nn.Sequential(Conv(c, mask_c, 3), Conv(mask_c, mask_c, 3), nn.Conv2d(mask_c, nm, 1)) for c in channels
        )

    def level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((super().level(i, x), self.cv4[i](x)), 1)

    def forward(self, xs: list[torch.Tensor]):
        protos = self.proto(xs[0])
        out = super().forward(xs)
        return (out, protos) if self.training else ((out[0], protos), out[1])


class YOLOv8(nn.Module):
    """A YOLOv8 or YOLO11 detector (``family``): ``model`` is the official layer list, routed by
    ``sources`` exactly as the ultralytics YAML routes it."""

    def __init__(self, family: Family | str, scale: str, nc: int = 80, segment: bool = False,
                 in_channels: int = 3, names: Sequence[str] | None = None):
        super().__init__()
        family = FAMILIES[family] if isinstance(family, str) else family
        if scale not in family.scales:
            raise ValueError(f"unknown {family.name} scale {scale!r}; valid: {sorted(family.scales)}")
        self.family, self.scale = family.name, scale
        layers, channels = build_layers(family, scale, in_channels)
        head_in = [channels[i + 1] for i in family.head_sources]  # channels[0] is the image
        if segment:
            _, width, max_channels = family.scales[scale]
            npr = round_channels(min(256, max_channels) * width)
            head = Segment(nc, head_in, nm=32, npr=npr, legacy=family.legacy_head)
        else:
            head = Detect(nc, head_in, legacy=family.legacy_head)
        head.init_biases()
        self.model = nn.Sequential(*layers, head)
        self.sources = tuple(src for src, *_ in family.layout) + (family.head_sources,)
        self.saved = frozenset(j for src in self.sources if not isinstance(src, int) for j in src if j >= 0)
        self.nc = nc
        self.names = list(names) if names is not None else [f"class{i}" for i in range(nc)]

    @property
    def stride(self) -> torch.Tensor:
        return self.model[-1].stride

    def forward(self, x: torch.Tensor):
        return route(self.model, self.sources, self.saved, x)


def build_layers(family: Family, scale: str, in_channels: int = 3) -> tuple[list[nn.Module], list[int]]:
    """The layers before the head, and the output channels of each (index 0 = the input).

    Scaling as ultralytics' builder does it: widths capped at ``max_channels`` *before* the width
    multiple, then rounded up to 8; repeats rounded, never to zero."""
    depth, width, max_channels = family.scales[scale]
    channels, layers = [in_channels], []
    for src, repeats, block, args in family.layout:
        if block == _UP:
            c_out, layer = channels[-1], nn.Upsample(None, 2, "nearest")
        elif block == _CAT:
            c_out, layer = sum(channels[j if j == -1 else j + 1] for j in src), Concat(1)
        elif block in BLOCKS:
            c_out = round_channels(min(args[0], max_channels) * width)
            extra = list(args[1:])
            if block in REPEATED:
                extra.insert(0, scaled_depth(repeats, depth))
            if block == "C3k2" and scale in family.c3k_scales:
                extra[1:2] = [True]
            layer = BLOCKS[block](channels[-1], c_out, *extra)
        else:
            raise ValueError(f"unknown block {block!r} in the {family.name} layout")
        layers.append(layer)
        channels.append(c_out)
    return layers, channels


def yolov8(scale: str, nc: int = 80, segment: bool = False, **kwargs) -> YOLOv8:
    """``yolov8("s")`` is YOLOv8s; ``segment=True`` gives YOLOv8s-seg."""
    return YOLOv8(YOLOV8, scale, nc=nc, segment=segment, **kwargs)


def yolo11(scale: str, nc: int = 80, segment: bool = False, **kwargs) -> YOLOv8:
    """``yolo11("s")`` is YOLO11s; ``segment=True`` gives YOLO11s-seg."""
    return YOLOv8(YOLO11, scale, nc=nc, segment=segment, **kwargs)


def _normalised_row(row: Sequence) -> tuple:
    """A layout row as comparable data: YAML lists become tuples, ``nn.Upsample`` is ``Upsample``,
    and the arguments of the parameter-free routing layers are dropped."""
    src, repeats, block, args = row
    block = block.removeprefix("nn.")
    src = tuple(src) if isinstance(src, (list, tuple)) else src
    return src, repeats, block, () if block in (_UP, _CAT) else tuple(args)


def match_yaml(yaml: Mapping) -> tuple[Family, bool] | None:
    """The family (and whether the head is Segment) whose layout an ultralytics model YAML
    dict describes, row for row; None when it is not one of ours."""
    rows = [_normalised_row(r) for r in (*yaml.get("backbone", ()), *yaml.get("head", ()))]
    if not rows:
        return None
    *body, (head_src, _, head, _) = rows
    for family in FAMILIES.values():
        same_body = body == [_normalised_row(r) for r in family.layout]
        if same_body and head_src == family.head_sources and head in ("Detect", "Segment"):
            return family, head == "Segment"
    return None
