"""Tiny named models shared by tests, docs and the demo.

They are written the way YOLO code is written (shape-dependent Python in the head, ``chunk`` into a
list, state cached during forward, a fixed DFL convolution) so that capture and the passes are
exercised without any third-party package, in milliseconds.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvBnAct(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1, act: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU() if act is None else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SplitBlock(nn.Module):
    """C2f-style: ``list(x.chunk(2, 1))`` then a growing list, which plain symbolic_trace rejects."""

    def __init__(self, c: int, n: int = 1):
        super().__init__()
        self.cv1 = ConvBnAct(c, c, 1)
        self.m = nn.ModuleList(ConvBnAct(c // 2, c // 2) for _ in range(n))
        self.cv2 = ConvBnAct((2 + n) * c // 2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class Pyramid(nn.Module):
    """SPPF-style: repeated max pooling on one tensor, concatenated."""

    def __init__(self, c: int):
        super().__init__()
        self.cv1 = ConvBnAct(c, c // 2, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = ConvBnAct(c * 2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class TinyDetect(nn.Module):
    """Anchor-free head with a DFL decode, anchors rebuilt in forward when the input size changes."""

    shape = None  # caches filled by forward, declared as unset class defaults as YOLO heads do
    anchors = torch.empty(0)

    def __init__(self, nc: int, ch: tuple[int, ...], reg_max: int = 4):
        super().__init__()
        self.nc, self.reg_max, self.nl = nc, reg_max, len(ch)
        self.box = nn.ModuleList(nn.Sequential(ConvBnAct(c, 16), nn.Conv2d(16, 4 * reg_max, 1)) for c in ch)
        self.cls = nn.ModuleList(nn.Sequential(ConvBnAct(c, 16), nn.Conv2d(16, nc, 1)) for c in ch)
        self.dfl = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1)
        self.stride = torch.tensor([8.0, 16.0][: self.nl])

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raw = [torch.cat((self.box[i](x), self.cls[i](x)), 1) for i, x in enumerate(xs)]
        b = raw[0].shape[0]
        if self.shape != raw[0].shape:  # cached state written during forward
            self.anchors, self.strides = self._make_anchors(raw)
            self.shape = raw[0].shape
        flat = torch.cat([r.view(b, 4 * self.reg_max + self.nc, -1) for r in raw], 2)
        box, cls = flat.split((4 * self.reg_max, self.nc), 1)
        dist = self.dfl(box.view(b, 4, self.reg_max, -1).transpose(2, 1).softmax(1)).view(b, 4, -1)
        lt, rb = dist.chunk(2, 1)
        xyxy = torch.cat((self.anchors - lt, self.anchors + rb), 1) * self.strides
        return torch.cat((xyxy, cls.sigmoid()), 1), raw

    def _make_anchors(self, raw: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        points, strides = [], []
        for r, s in zip(raw, self.stride):
            h, w = r.shape[2:]
            sy, sx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            points.append(torch.stack((sx, sy), 0).view(2, -1))
            strides.append(torch.full((1, h * w), float(s)))
        return torch.cat(points, 1), torch.cat(strides, 1)


class TinyYolo(nn.Module):
    """A two-level YOLO in miniature: stem, split block, pyramid pooling, upsample + concat, head."""

    def __init__(self, nc: int = 4, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(ConvBnAct(3, w, 3, 2), ConvBnAct(w, w * 2, 3, 2), ConvBnAct(w * 2, w * 2, 3, 2))
        self.block = SplitBlock(w * 2)
        self.down = ConvBnAct(w * 2, w * 4, 3, 2)
        self.sppf = Pyramid(w * 4)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = ConvBnAct(w * 6, w * 2, 1, act=nn.LeakyReLU(0.1))
        self.head = TinyDetect(nc, (w * 2, w * 4))

    def forward(self, x: torch.Tensor):
        p3 = self.block(self.stem(x))
        p4 = self.sppf(self.down(p3))
        p3 = self.fuse(torch.cat((self.up(p4), p3), 1))
        return self.head([p3, p4])


class ShapeBranch(nn.Module):
    """Plain module whose Python control flow depends on the input's size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.big = nn.Conv2d(8, 4, 1)
        self.small = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.big(y) if x.shape[-1] >= 64 else self.small(y)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics so folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def tiny_yolo(nc: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(TinyYolo(nc)).eval()


def conv_bn_act() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(nn.Sequential(ConvBnAct(3, 8), ConvBnAct(8, 8, act=nn.LeakyReLU(0.1)), nn.Conv2d(8, 4, 1))).eval()


def conv_two_bns() -> nn.Module:
    """A conv whose output feeds two BNs: folding into one would change the other."""

    class TwoBns(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.bn1(y) + self.bn2(y)

    torch.manual_seed(0)
    return _randomise_bn(TwoBns()).eval()


def bn_after_pool() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))).eval()


def bn_without_running_stats() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU()).eval()


def conv_softmax() -> nn.Module:
    """Conv followed by a non-pointwise module: fusion must not fire."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Softmax(dim=1), nn.Conv2d(8, 4, 1)).eval()


def shape_branch() -> nn.Module:
    torch.manual_seed(0)
    return ShapeBranch().eval()


TINY_MODELS = {
    "tiny-yolo": tiny_yolo,
    "conv-bn-act": conv_bn_act,
    "conv-two-bns": conv_two_bns,
    "bn-after-pool": bn_after_pool,
    "bn-without-running-stats": bn_without_running_stats,
    "conv-softmax": conv_softmax,
    "shape-branch": shape_branch,
}
