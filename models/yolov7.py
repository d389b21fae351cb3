"""YOLOv7 and YOLOv7-tiny (WongKinYiu/yolov7, cfg/training/*.yaml) with the IDetect head.

The layer lists are the official yaml's, row for row, so that indices, module names and state
keys equal those of official training checkpoints (``model.102.rbr_dense.0.weight``,
``model.105.ia.0.implicit`` ...). YOLOv7 has no Bottleneck-style blocks: an ELAN block *is* a run of
yaml rows (two 1x1 branches, a chain of 3x3 convs, a Concat of some of their outputs, a 1x1), so
the tables below are built by small functions that emit those rows. Sources are written as in the
yaml (negative = relative to the row) and made absolute when the model is built.

Outputs follow yoloq's YOLOv5 Detect: eval gives ``(decoded B x N x (5+nc), raw per level)``,
training gives the raw list, so the decoder, NMS and capture are shared.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from yoloq.models.common import Concat, Conv
from yoloq.models.yolov5 import DEFAULT_ANCHORS, YOLOv5
from yoloq.models.yolov7_blocks import MP, SP, SPPCSPC, IDetect, RepConv, leaky_conv

# Pixel anchors (w, h) per level P3/8, P4/16, P5/32 of cfg/training/yolov7.yaml. yolov7-tiny.yaml
# keeps YOLOv5's anchors (DEFAULT_ANCHORS).
YOLOV7_ANCHORS = ((12, 16, 19, 36, 40, 28), (36, 75, 76, 55, 72, 146), (142, 110, 192, 243, 459, 401))

Row = tuple  # (source(s), block, args); args of Conv/RepConv are (c_out, k, s)


def elan(c_branch: int, c_tap: int, n_taps: int, concat: Sequence[int], c_out: int) -> list[Row]:
    """Efficient layer aggregation: two 1x1 branches of the same input, ``n_taps`` chained 3x3
    convs on the second, a Concat of the rows named by ``concat`` (relative), a fusing 1x1."""
    rows = [(-1, "Conv", (c_branch, 1, 1)), (-2, "Conv", (c_branch, 1, 1))]
    rows += [(-1, "Conv", (c_tap, 3, 1))] * n_taps
    return rows + [(tuple(concat), "Concat", ()), (-1, "Conv", (c_out, 1, 1))]


def transition(c: int, extra: Sequence[int] = ()) -> list[Row]:
    """YOLOv7's downsampling: max-pool + 1x1 on one path, 1x1 + strided 3x3 on the other, both
    concatenated (with the absolute rows in ``extra``: the neck's lateral inputs)."""
    return [(-1, "MP", ()), (-1, "Conv", (c, 1, 1)), (-3, "Conv", (c, 1, 1)), (-1, "Conv", (c, 3, 2)),
            ((-1, -3, *extra), "Concat", ())]


def _backbone_elan(c: int, c_out: int) -> list[Row]:
    return elan(c, c, 4, (-1, -3, -5, -6), c_out)


def _neck_elan(c: int, c_out: int) -> list[Row]:
    return elan(c, c // 2, 4, (-1, -2, -3, -4, -5, -6), c_out)


def _tiny_elan(c: int) -> list[Row]:
    return elan(c, c, 2, (-1, -2, -3, -4), 2 * c)


def _lateral(c: int, source: int) -> list[Row]:
    """Top-down path: 1x1 + 2x upsample, concatenated with a 1x1 of the backbone row ``source``."""
    return [(-1, "Conv", (c, 1, 1)), (-1, "Upsample", ()), (source, "Conv", (c, 1, 1)), ((-1, -2), "Concat", ())]


YOLOV7_LAYOUT: tuple[Row, ...] = (
    (-1, "Conv", (32, 3, 1)), (-1, "Conv", (64, 3, 2)), (-1, "Conv", (64, 3, 1)),  # 0-2, P1/2
    (-1, "Conv", (128, 3, 2)), *_backbone_elan(64, 256),  # 3-11, P2/4
    *transition(128), *_backbone_elan(128, 512),  # 12-24, P3/8
    *transition(256), *_backbone_elan(256, 1024),  # 25-37, P4/16
    *transition(512), *_backbone_elan(256, 1024),  # 38-50, P5/32
    (-1, "SPPCSPC", (512,)),  # 51
    *_lateral(256, 37), *_neck_elan(256, 256),  # 52-63
    *_lateral(128, 24), *_neck_elan(128, 128),  # 64-75, P3 out
    *transition(128, (63,)), *_neck_elan(256, 256),  # 76-88, P4 out
    *transition(256, (51,)), *_neck_elan(512, 512),  # 89-101, P5 out
    (75, "RepConv", (256, 3, 1)), (88, "RepConv", (512, 3, 1)), (101, "RepConv", (1024, 3, 1)),  # 102-104
)

YOLOV7_TINY_LAYOUT: tuple[Row, ...] = (
    (-1, "Conv", (32, 3, 2)), (-1, "Conv", (64, 3, 2)), *_tiny_elan(32),  # 0-7, P2/4
    (-1, "MP", ()), *_tiny_elan(64),  # 8-14, P3/8
    (-1, "MP", ()), *_tiny_elan(128),  # 15-21, P4/16
    (-1, "MP", ()), *_tiny_elan(256),  # 22-28, P5/32
    # 29-37: SPPCSPC written out as rows, with SP pools instead of a ModuleList.
    (-1, "Conv", (256, 1, 1)), (-2, "Conv", (256, 1, 1)), (-1, "SP", (5,)), (-2, "SP", (9,)), (-3, "SP", (13,)),
    ((-1, -2, -3, -4), "Concat", ()), (-1, "Conv", (256, 1, 1)), ((-1, -7), "Concat", ()), (-1, "Conv", (256, 1, 1)),
    *_lateral(128, 21), *_tiny_elan(64),  # 38-47
    *_lateral(64, 14), *_tiny_elan(32),  # 48-57, P3 out
    (-1, "Conv", (128, 3, 2)), ((-1, 47), "Concat", ()), *_tiny_elan(64),  # 58-65, P4 out
    (-1, "Conv", (256, 3, 2)), ((-1, 37), "Concat", ()), *_tiny_elan(128),  # 66-73, P5 out
    (57, "Conv", (128, 3, 1)), (65, "Conv", (256, 3, 1)), (73, "Conv", (512, 3, 1)),  # 74-76
)

VARIANTS = {  # name: (layout, default anchors, activation of Conv rows)
    "yolov7": (YOLOV7_LAYOUT, YOLOV7_ANCHORS, "silu"),
    "yolov7-tiny": (YOLOV7_TINY_LAYOUT, DEFAULT_ANCHORS, "leaky"),
}


def _absolute(src, i: int):
    """The yaml's sources with every relative index except -1 (the previous row, which YOLOv5's
    routing passes along without storing) made absolute."""
    if isinstance(src, int):
        return src if src >= -1 else i + src
    return tuple(j if j >= -1 else i + j for j in src)


def build_layers(layout: Sequence[Row], act: str, in_channels: int = 3):
    """The layers of ``layout``, their absolute sources, and each layer's output channels."""
    channels, layers, sources = [], [], []
    conv = leaky_conv if act == "leaky" else Conv
    for i, (src, block, args) in enumerate(layout):
        src = _absolute(src, i)
        inputs = [channels[j] if j >= 0 else (channels[-1] if channels else in_channels)
                  for j in ((src,) if isinstance(src, int) else src)]
        c_in = c_out = inputs[0]
        if block == "Conv":
            layer, c_out = conv(c_in, *args), args[0]
        elif block == "RepConv":
            layer, c_out = RepConv(c_in, *args), args[0]
        elif block == "SPPCSPC":
            layer, c_out = SPPCSPC(c_in, *args), args[0]
        elif block == "MP":
            layer = MP(*args)
        elif block == "SP":
            layer = SP(*args)
        elif block == "Upsample":
            layer = nn.Upsample(None, 2, "nearest")
        elif block == "Concat":
            layer, c_out = Concat(1), sum(inputs)
        else:
            raise ValueError(f"unknown block {block!r} in a YOLOv7 layout")
        layers.append(layer)
        sources.append(src)
        channels.append(c_out)
    return layers, sources, channels


class YOLOv7(nn.Module):
    """The whole detector: ``model`` is the official layer list ending in IDetect.

    Routing, ``stride`` and ``anchors`` are YOLOv5's: ``sources`` holds -1 (the previous layer) or
    absolute indices, and ``saved`` the layers whose outputs are kept for later rows.
    """

    forward = YOLOv5.forward
    stride = YOLOv5.stride
    anchors = YOLOv5.anchors

    def __init__(
        self,
        variant: str = "yolov7",
        nc: int = 80,
        anchors: Sequence[Sequence[float]] | None = None,
        in_channels: int = 3,
        names: Sequence[str] | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown YOLOv7 variant {variant!r}; valid: {sorted(VARIANTS)}")
        layout, default_anchors, act = VARIANTS[variant]
        layers, sources, channels = build_layers(layout, act, in_channels)
        head_sources = (len(layers) - 3, len(layers) - 2, len(layers) - 1)  # both yamls end in the P3-P5 convs
        head = IDetect(nc, anchors if anchors is not None else default_anchors, [channels[i] for i in head_sources])
        head.init_biases()
        self.variant = variant
        self.model = nn.Sequential(*layers, head)
        self.sources = (*sources, head_sources)
        self.saved = frozenset(j for src in self.sources for j in ((src,) if isinstance(src, int) else src) if j >= 0)
        self.nc = nc
        self.names = list(names) if names is not None else [f"class{i}" for i in range(nc)]

    def fuse_repvgg(self) -> YOLOv7:
        """Re-parameterise every RepConv into one 3x3 conv (the official deploy form)."""
        for m in self.modules():
            if isinstance(m, RepConv):
                m.fuse_repvgg_block()
        return self


def yolov7(variant: str = "yolov7", nc: int = 80, **kwargs) -> YOLOv7:
    """``yolov7("yolov7-tiny", nc=20)``: a freshly initialised model in training mode."""
    return YOLOv7(variant, nc=nc, **kwargs)


def layer_names(variant: str) -> list[str]:
    """Class names of the layer list, as the checkpoint loader compares them."""
    return [block for _, block, _ in VARIANTS[variant][0]] + ["IDetect"]
