"""What a detector's raw head outputs mean, and the training loss that goes with them.

A captured graph ends at the raw head tensors (``capture``), in the order the head computes them.
Training needs them per level, in the layout its loss reads. ``HeadLayout.from_model`` reads the
head's hyper-parameters from the network's detection module, chosen by a table of the attributes
that identify each head family, not by class name::

    attribute   kind     per level (first attribute found wins)                                        loss
    anchors     anchor   B × na·(5 + nc [+ nm]) × H × W                    AnchorLoss  (YOLOv5, YOLOv7)
    reg_max     dfl      B × 4·reg_max × H × W, B × nc × H × W [, B × nm]  TalLoss     (YOLOv8, YOLO11)

Segmentation heads (an ``nm`` attribute) add a prototype tensor B × nm × Hp × Wp, the output
with the largest spatial size. ``arrange`` groups the outputs into levels by spatial size (larger
grids first, i.e. the strides in increasing order) and, inside a dfl level, tells the box, class
and mask-coefficient tensors apart by channel count, falling back to the head's own order
(box, class, coefficients) when two counts coincide.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

# (identifying attribute, kind), first match wins: anchor-free heads also cache an ``anchors`` tensor
HEAD_KINDS = (("reg_max", "dfl"), ("anchors", "anchor"))


class HeadLayoutError(ValueError):
    """A head this module cannot interpret; the message names what is missing or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Arranged:
    """Head outputs in loss layout: ``preds`` per level; mask ``coefs`` per level and ``protos``
    for segmentation heads of the dfl kind (anchor heads carry coefficients inside ``preds``)."""

    preds: list[torch.Tensor]
    coefs: list[torch.Tensor] | None = None
    protos: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    kind: str
    nc: int
    strides: tuple[float, ...]
    module: str  # qualified name of the detection module
    anchors_px: tuple[tuple[tuple[float, float], ...], ...] | None = None  # nl × na × (w, h) pixels
    reg_max: int | None = None
    nm: int | None = None  # mask coefficients (segmentation)

    @property
    def nl(self) -> int:
        return len(self.strides)

    @property
    def segmentation(self) -> bool:
        return self.nm is not None

    @classmethod
    def from_model(cls, network: nn.Module) -> HeadLayout:
        """The layout of ``network``'s last detection module (see the module docstring's table)."""
        found = None
        for name, module in network.named_modules():
            if not (hasattr(module, "nc") and hasattr(module, "stride")):
                continue
            kind = next((kind for attribute, kind in HEAD_KINDS if hasattr(module, attribute)), None)
            if kind is not None:
                found = (name, module, kind)
        if found is None:
            raise HeadLayoutError(f"{type(network).__name__}: no detection module with nc, stride and one of "
                                  f"{[a for a, _ in HEAD_KINDS]}; give the trainer a loss of your own (QATHook)")
        name, head, kind = found
        strides = tuple(float(s) for s in torch.as_tensor(head.stride).flatten())
        if not strides or any(s <= 0 for s in strides):
            raise HeadLayoutError(f"{name}.stride = {strides}: strides are not set (build the model first)")
        nm = int(head.nm) if hasattr(head, "nm") else None
        if kind == "anchor":
            anchors = torch.as_tensor(head.anchors, dtype=torch.float32)
            anchors = anchors.view(len(strides), -1, 2) * torch.tensor(strides).view(-1, 1, 1)
            anchors_px = tuple(tuple(tuple(anchor) for anchor in level) for level in anchors.tolist())
            return cls("anchor", int(head.nc), strides, name, anchors_px=anchors_px, nm=nm)
        return cls("dfl", int(head.nc), strides, name, reg_max=int(head.reg_max), nm=nm)

    # -------------------------------------------------------------------------------- layout
    def arrange(self, outputs: Sequence[torch.Tensor]) -> Arranged:
        outputs = list(outputs)
        protos = None
        if self.segmentation:
            area = [o.shape[-2] * o.shape[-1] for o in outputs]
            protos = outputs.pop(max(range(len(outputs)), key=area.__getitem__))
        groups: dict[tuple[int, int], list[torch.Tensor]] = {}
        for o in outputs:
            if o.dim() != 4:
                raise HeadLayoutError(f"{self.module}: head output of shape {tuple(o.shape)} is not B × C × H × W")
            groups.setdefault(tuple(o.shape[-2:]), []).append(o)
        levels = sorted(groups.values(), key=lambda g: -g[0].shape[-2] * g[0].shape[-1])
        if len(levels) != self.nl:
            raise HeadLayoutError(f"{self.module}: {len(levels)} output grid sizes "
                                  f"{[tuple(g[0].shape[-2:]) for g in levels]} for {self.nl} strides")
        if self.kind == "anchor":
            return Arranged([self._anchor_level(g) for g in levels], protos=protos)
        parts = [self._dfl_level(g) for g in levels]
        preds = [torch.cat((box, cls), 1) for box, cls, _ in parts]
        coefs = [coef for _, _, coef in parts] if self.segmentation else None
        return Arranged(preds, coefs, protos)

    def _anchor_level(self, group: list[torch.Tensor]) -> torch.Tensor:
        na = len(self.anchors_px[0])
        no = 5 + self.nc + (self.nm or 0)
        if len(group) != 1 or group[0].shape[1] != na * no:
            raise HeadLayoutError(f"{self.module}: expected one B × {na * no} × H × W tensor per level, got "
                                  f"{[tuple(t.shape) for t in group]}")
        t = group[0]
        b, _, h, w = t.shape
        return t.view(b, na, no, h, w).permute(0, 1, 3, 4, 2)

    def _dfl_level(self, group: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        wanted = [4 * self.reg_max, self.nc] + ([self.nm] if self.segmentation else [])
        channels = [t.shape[1] for t in group]
        if channels == wanted:
            ordered = group
        elif sorted(channels) == sorted(wanted) and len(set(wanted)) == len(wanted):
            ordered = [group[channels.index(c)] for c in wanted]
        else:
            raise HeadLayoutError(f"{self.module}: a level has tensors with {channels} channels; expected "
                                  f"{wanted} (box bins, classes{', mask coefficients' if self.segmentation else ''})")
        return ordered[0], ordered[1], ordered[2] if self.segmentation else None

    # -------------------------------------------------------------------------------- loss
    def make_loss(self, imgsz: int) -> HeadLoss:
        """The detection (and, for segmentation heads, mask) loss of this head at ``imgsz``."""
        from yoloq.tools import losses

        if self.kind == "anchor":
            gains = losses.anchor_based.yolov5_scaled_gains(self.nl, self.nc, imgsz)
            args = (torch.tensor(self.anchors_px), torch.tensor(self.strides), self.nc)
            loss = (losses.AnchorSegLoss(*args, nm=self.nm, **gains) if self.segmentation
                    else losses.AnchorLoss(*args, **gains))
        else:
            min_side = self.strides[1] if self.nl > 1 else 0.0  # as Ultralytics >= 8.4
            args = (torch.tensor(self.strides), self.nc, self.reg_max)
            loss = (losses.TalSegLoss(*args, min_candidate_side=min_side) if self.segmentation
                    else losses.TalLoss(*args, min_candidate_side=min_side))
        return HeadLoss(self, loss)


class HeadLoss(nn.Module):
    """``loss(raw_outputs, targets, masks=None) -> (total, parts)`` for a captured graph's outputs."""

    def __init__(self, layout: HeadLayout, loss: nn.Module):
        super().__init__()
        self.layout, self.loss = layout, loss

    def forward(self, outputs: Sequence[torch.Tensor], targets: torch.Tensor, masks: torch.Tensor | None = None):
        arranged = self.layout.arrange(outputs)
        if not self.layout.segmentation:
            return self.loss(arranged.preds, targets)
        if masks is None:
            raise HeadLayoutError(f"{self.layout.module} is a segmentation head: the loss needs instance masks "
                                  "(a dataset with polygon labels)")
        if self.layout.kind == "anchor":
            return self.loss(arranged.preds, arranged.protos, targets, masks)
        return self.loss(arranged.preds, arranged.coefs, arranged.protos, targets, masks)
