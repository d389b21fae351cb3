"""Blocks that YOLOv7 adds to the YOLOv5 set: MP/SP pooling, SPPCSPC, RepConv, and the IDetect
head with its implicit-knowledge layers (ImplicitA adds a learned vector, ImplicitM scales by one).

As in ``common.py``, attribute names are those of the official WongKinYiu/yolov7 code, because
its checkpoints are loaded by ``state_dict`` (``rbr_dense.0.weight``, ``ia.0.implicit`` ...).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from yoloq.models.common import BN_EPS, BN_MOMENTUM, Conv
from yoloq.models.yolov5 import STRIDES, Detect


def leaky_conv(c_in: int, c_out: int, k: int = 1, s: int = 1) -> Conv:
    """The Conv of YOLOv7-tiny: the same module (so the same state keys) with LeakyReLU(0.1),
    which the official yaml passes as the activation argument instead of SiLU."""
    conv = Conv(c_in, c_out, k, s)
    conv.act = nn.LeakyReLU(0.1)
    return conv


def batch_norm(channels: int) -> nn.BatchNorm2d:
    # The official builder sets these on every BatchNorm2d after construction, RepConv's included.
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MP(nn.Module):
    """Stride-k max-pool: the downsampling path of YOLOv7's transition blocks."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class SP(nn.Module):
    """Size-preserving max-pool, one branch of YOLOv7-tiny's spatial pyramid."""

    def __init__(self, k: int = 3, s: int = 1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class SPPCSPC(nn.Module):
    """CSP-split spatial pyramid pooling: one half goes 1x1 -> 3x3 -> 1x1 -> parallel 5/9/13 pools
    -> 1x1 -> 3x3, the other half is a bare 1x1, and a 1x1 fuses both."""

    def __init__(self, c_in: int, c_out: int, e: float = 0.5, k: Sequence[int] = (5, 9, 13)):
        super().__init__()
        hidden = int(2 * c_out * e)
        self.cv1 = Conv(c_in, hidden, 1, 1)
        self.cv2 = Conv(c_in, hidden, 1, 1)
        self.cv3 = Conv(hidden, hidden, 3, 1)
        self.cv4 = Conv(hidden, hidden, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=size, stride=1, padding=size // 2) for size in k)
        self.cv5 = Conv(4 * hidden, hidden, 1, 1)
        self.cv6 = Conv(hidden, hidden, 3, 1)
        self.cv7 = Conv(2 * hidden, c_out, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1] + [pool(x1) for pool in self.m], 1)))
        return self.cv7(torch.cat((y1, self.cv2(x)), 1))


def _folded(weight: torch.Tensor, bn: nn.BatchNorm2d, kernel: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one bias-carrying conv, its kernel zero-padded to
    ``kernel`` (a centred 1x1 tap equals a 3x3 kernel with zeros around it at padding 1)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    pad = (kernel - weight.shape[-1]) // 2
    return nn.functional.pad(weight * scale.view(-1, 1, 1, 1), [pad] * 4), bn.bias - bn.running_mean * scale


class RepConv(nn.Module):
    """RepVGG block: a 3x3 conv-BN, a 1x1 conv-BN and (when shapes allow) a BN of the input, summed
    before the activation. The branches are trained separately and, being linear up to the sum,
    are re-parameterised after training into one 3x3 conv by ``fuse_repvgg_block``."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1, g: int = 1):
        super().__init__()
        if k != 3:
            raise ValueError(f"RepConv re-parameterises 3x3 kernels only, got k={k}")
        self.deploy = False
        self.groups, self.in_channels, self.out_channels = g, c_in, c_out
        self.act = nn.SiLU()
        self.rbr_identity = batch_norm(c_in) if c_in == c_out and s == 1 else None
        self.rbr_dense = nn.Sequential(nn.Conv2d(c_in, c_out, k, s, 1, groups=g, bias=False), batch_norm(c_out))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(c_in, c_out, 1, s, 0, groups=g, bias=False), batch_norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.rbr_reparam(x))
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return self.act(y)

    @torch.no_grad()
    def fuse_repvgg_block(self) -> None:
        """Replace the branches by ``rbr_reparam``, the single 3x3 conv (with bias) that computes
        their sum in eval mode; the name is the official deploy-time one."""
        if self.deploy:
            return
        dense, one = self.rbr_dense, self.rbr_1x1
        weight, bias = _folded(dense[0].weight, dense[1])
        w1, b1 = _folded(one[0].weight, one[1])
        weight, bias = weight + w1, bias + b1
        if self.rbr_identity is not None:
            # The identity is a 1x1 (grouped) conv whose kernel is one on each channel's own input.
            per_group = self.in_channels // self.groups
            eye = torch.zeros(self.out_channels, per_group, 1, 1, dtype=weight.dtype, device=weight.device)
            eye[torch.arange(self.out_channels), torch.arange(self.out_channels) % per_group] = 1
            wi, bi = _folded(eye, self.rbr_identity)
            weight, bias = weight + wi, bias + bi
        stride = dense[0].stride
        self.rbr_reparam = nn.Conv2d(self.in_channels, self.out_channels, 3, stride, 1, groups=self.groups).to(weight)
        self.rbr_reparam.weight.copy_(weight)
        self.rbr_reparam.bias.copy_(bias)
        del self.rbr_dense, self.rbr_1x1
        self.rbr_identity = None
        self.deploy = True


class ImplicitA(nn.Module):
    """A learned per-channel offset added to the head's input ("implicit knowledge", YOLOR)."""

    def __init__(self, channel: int, mean: float = 0.0, std: float = 0.02):
        super().__init__()
        self.channel, self.mean, self.std = channel, mean, std
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit + x


class ImplicitM(nn.Module):
    """A learned per-channel scale on the head's output, initialised around one."""

    def __init__(self, channel: int, mean: float = 1.0, std: float = 0.02):
        super().__init__()
        self.channel, self.mean, self.std = channel, mean, std
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit * x


class IDetect(Detect):
    """YOLOv5's anchor head with ImplicitA before and ImplicitM after each level's 1x1 conv.

    Decoding and the eval output contract are Detect's. ``anchor_grid`` (pixel anchors) is a state
    key of official checkpoints; it is kept for loading only, decoding uses ``anchors * stride``.
    """

    def __init__(self, nc: int, anchors: Sequence[Sequence[float]], channels: Sequence[int], strides=STRIDES):
        super().__init__(nc, anchors, channels, strides)
        pixel = self.anchors * self.stride.view(-1, 1, 1)
        self.register_buffer("anchor_grid", pixel.view(self.nl, 1, -1, 1, 1, 2).clone())
        self.ia = nn.ModuleList(ImplicitA(c) for c in channels)
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in channels)

    def level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.im[i](self.m[i](self.ia[i](x)))
