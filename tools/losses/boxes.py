"""Box helpers shared by the detection losses.

A box is the last axis of a ``(..., 4)`` tensor, in centre form ``xywh`` = (xc, yc, w, h) or corner
form ``xyxy`` = (x1, y1, x2, y2). Anchor-free heads describe a box by its distances
``ltrb`` = (l, t, r, b) from an anchor point p: ``xyxy = (p_x − l, p_y − t, p_x + r, p_y + b)``.

``bbox_iou`` scores aligned pairs (box i of ``a`` against box i of ``b``), with C the smallest box
enclosing both, ρ the distance between their centres and c the diagonal of C:

    IoU  = |A ∩ B| / |A ∪ B|
    GIoU = IoU − (|C| − |A ∪ B|) / |C|                       (Rezatofighi et al. 2019)
    DIoU = IoU − ρ² / c²                                      (Zheng et al. 2020)
    CIoU = IoU − ρ² / c² − α·v                                (Zheng et al. 2020)
           v = 4/π² · (atan(w_b / h_b) − atan(w_a / h_a))²,   α = v / ((1 − IoU) + v)

α is a trade-off weight, not something to optimise: it is held constant in backpropagation (as in
the authors' code and in the YOLO losses), so the aspect term's gradient flows only through v.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

IouKind = Literal["iou", "giou", "diou", "ciou"]
_KINDS = ("iou", "giou", "diou", "ciou")


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    centre, half = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat((centre - half, centre + half), dim=-1)


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    top_left, bottom_right = boxes[..., :2], boxes[..., 2:4]
    return torch.cat(((top_left + bottom_right) / 2, bottom_right - top_left), dim=-1)


def ltrb_to_xyxy(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """Corners of the box at distances ``ltrb`` from ``points`` (broadcast over leading axes)."""
    return torch.cat((points - ltrb[..., :2], points + ltrb[..., 2:]), dim=-1)


def xyxy_to_ltrb(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Distances from ``points`` to the sides of ``boxes``; negative when a point lies outside."""
    return torch.cat((points - boxes[..., :2], boxes[..., 2:] - points), dim=-1)


def bbox_iou(a: torch.Tensor, b: torch.Tensor, kind: IouKind = "ciou", eps: float = 1e-7) -> torch.Tensor:
    """IoU family of aligned ``xyxy`` box pairs ``(..., 4)`` → ``(...)`` (see the module docstring).

    ``eps`` keeps the divisions finite for empty boxes; identical boxes score 1 up to eps / area.
    """
    if kind not in _KINDS:
        raise ValueError(f"bbox_iou: kind must be one of {_KINDS}, got {kind!r}")
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    wa, ha, wb, hb = ax2 - ax1, ay2 - ay1, bx2 - bx1, by2 - by1
    inter_w = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
    inter_h = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)
    inter = inter_w * inter_h
    union = wa * ha + wb * hb - inter + eps
    iou = inter / union
    if kind == "iou":
        return iou
    hull_w = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)
    hull_h = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    if kind == "giou":
        hull = hull_w * hull_h + eps
        return iou - (hull - union) / hull
    # ρ² from the doubled centres, (x1 + x2) = 2·xc, hence the division by 4.
    rho2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4
    diou = iou - rho2 / (hull_w**2 + hull_h**2 + eps)
    if kind == "diou":
        return diou
    v = (4 / math.pi**2) * (torch.atan(wb / (hb + eps)) - torch.atan(wa / (ha + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return diou - alpha * v
