"""Blocks of the ultralytics YOLOv8 / YOLO11 family, built on ``yoloq.models.common``.

Attribute names (``cv1``, ``m``, ``qkv``, ``ffn``, ``dfl`` ...) follow the ultralytics package,
because its checkpoints are loaded by ``state_dict``: the names are the file format. Where an
ultralytics block differs from a YOLOv5 one only in a kernel size or in a missing activation, the
YOLOv5 block from ``common`` is reused and the one differing child replaced.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from yoloq.models.common import C3, Bottleneck, Conv, Proto


def linear_conv(c_in: int, c_out: int, k: int = 1, s: int = 1, g: int = 1) -> Conv:
    """Conv + BN with no activation: attention projections and residual branches stay linear so
    that what is added back to the trunk is not clipped below zero."""
    conv = Conv(c_in, c_out, k, s, g=g)
    conv.act = nn.Identity()
    return conv


def dw_conv(c_in: int, c_out: int, k: int = 3) -> Conv:
    """Depth-wise Conv + BN + SiLU (one group per shared channel), as in YOLO11's class branch."""
    return Conv(c_in, c_out, k, g=math.gcd(c_in, c_out))


class Bottleneck3(Bottleneck):
    """YOLOv5's bottleneck with a 3x3 (not 1x1) first conv, as C2f and C3k2 use it."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c_in, c_out, shortcut, g, e)
        self.cv1 = Conv(c_in, int(c_out * e), 3)


class C2f(nn.Module):
    """CSP block that keeps every bottleneck's output: cv1 splits into two halves, bottlenecks
    chain on the second half, and cv2 fuses both halves plus all n intermediate maps."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5):
        super().__init__()
        self.c = int(c_out * e)
        self.cv1 = Conv(c_in, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c_out, 1)
        self.m = nn.ModuleList(Bottleneck3(self.c, self.c, shortcut, g, e=1.0) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class C3k(C3):
    """YOLOv5's C3 whose bottlenecks use two 3x3 convs."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c_in, c_out, n, shortcut, g, e)
        hidden = int(c_out * e)
        self.m = nn.Sequential(*(Bottleneck3(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))


class C3k2(C2f):
    """YOLO11's C2f: the chained blocks are 2-deep C3k blocks (m/l/x scales) or slim bottlenecks
    with half-width hidden convs (n/s scales)."""

    def __init__(
        self, c_in: int, c_out: int, n: int = 1, c3k: bool = False, e: float = 0.5, g: int = 1, shortcut: bool = True
    ):
        super().__init__(c_in, c_out, n, shortcut, g, e)
        self.m = nn.ModuleList(
            C3k(self.c, self.c, 2, shortcut, g) if c3k else Bottleneck3(self.c, self.c, shortcut, g) for _ in range(n)
        )


class Attention(nn.Module):
    """Multi-head self-attention over all H*W positions, with 1x1 convs as the projections and a
    depth-wise 3x3 conv on the values as positional encoding. Keys are half a head wide."""

    def __init__(self, dim: int, num_heads: int = 8, attn_ratio: float = 0.5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim**-0.5
        self.qkv = linear_conv(dim, dim + 2 * self.key_dim * num_heads)
        self.proj = linear_conv(dim, dim)
        self.pe = linear_conv(dim, dim, 3, g=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        per_head = self.qkv(x).view(b, self.num_heads, 2 * self.key_dim + self.head_dim, h * w)
        q, k, v = per_head.split((self.key_dim, self.key_dim, self.head_dim), 2)
        weights = ((q * self.scale).transpose(-2, -1) @ k).softmax(-1)  # positions x positions
        attended = (v @ weights.transpose(-2, -1)).view(b, c, h, w)
        return self.proj(attended + self.pe(v.reshape(b, c, h, w)))


class PSABlock(nn.Module):
    """Transformer-style block: attention then a 2x-wide conv feed-forward, each residual."""

    def __init__(self, c: int, attn_ratio: float = 0.5, num_heads: int = 4, shortcut: bool = True):
        super().__init__()
        self.attn = Attention(c, num_heads, attn_ratio)
        self.ffn = nn.Sequential(Conv(c, 2 * c, 1), linear_conv(2 * c, c, 1))
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x) if self.add else self.attn(x)
        return x + self.ffn(x) if self.add else self.ffn(x)


class C2PSA(nn.Module):
    """Attention on half the channels only (the other half bypasses it), at P5 where H*W is
    smallest and full attention is cheap."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, e: float = 0.5):
        super().__init__()
        if c_in != c_out:
            raise ValueError(f"C2PSA keeps its width: c_in {c_in} != c_out {c_out}")
        self.c = int(c_in * e)
        self.cv1 = Conv(c_in, 2 * self.c, 1)
        self.cv2 = Conv(2 * self.c, c_in, 1)
        self.m = nn.Sequential(*(PSABlock(self.c, 0.5, max(self.c // 64, 1)) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bypass, attended = self.cv1(x).split((self.c, self.c), 1)
        return self.cv2(torch.cat((bypass, self.m(attended)), 1))


class DFL(nn.Module):
    """Distribution focal loss decoding: each box side is predicted as a distribution over
    ``reg_max`` bins and decoded to its expectation, sum_i softmax(p)_i * i.

    The expectation is a fixed 1x1 conv with weights 0..reg_max-1 (not trained, but in the state
    dict of ultralytics checkpoints); capture recognises the class name and keeps it in the float
    decoder.
    """

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape  # batch, 4 * reg_max, anchors
        bins = x.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)  # b x reg_max x 4 x a
        return self.conv(bins).view(b, 4, a)


class ProtoT(Proto):
    """YOLOv5's Proto with a learned 2x2 stride-2 transposed conv in place of nearest upsampling."""

    def __init__(self, c_in: int, c_hidden: int = 256, c_out: int = 32):
        super().__init__(c_in, c_hidden, c_out)
        self.upsample = nn.ConvTranspose2d(c_hidden, c_hidden, 2, 2, 0, bias=True)
