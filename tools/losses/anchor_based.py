"""Anchor-based detection loss (YOLOv5, and YOLOv7 without its OTA assigner).

Head layout (training mode): level l gives ``B × na × H_l × W_l × (5 + nc)`` raw logits
(x, y, w, h, objectness, classes). Targets are ``N × 6`` rows ``[image, class, xc, yc, w, h]``
normalised to the input image; on level l they are scaled to grid units by (W_l, H_l).

Matching, per level, for target (x, y, w, h) in grid units and anchor (a_w, a_h) in grid units:
    the anchor fits when  max(r_w, 1/r_w, r_h, 1/r_h) < anchor_t,   r = (w / a_w, h / a_h);
    each fit is assigned to the cell ⌊(x, y)⌋ and to the neighbour cells whose centre lies within
    half a cell of (x, y): the left one when frac(x) < ½ and x > 1, the right one when
    frac(x) > ½ and x < W − 1, likewise above / below — so up to 3 cells per fitting anchor.
    (YOLOv5 writes the right test as frac(W − x) < ½; it differs only at frac(x) = 0 exactly, where
    YOLOv5 assigns the centre cell twice.)

Prediction in a matched cell (i, j) with anchor a, σ the logistic function:
    xy = 2σ(t_xy) − ½  (offset from the cell corner, in (−½, 3/2)),   wh = (2σ(t_wh))² · a.

Loss, B the batch size:
    L_box = Σ_l mean_matches(1 − CIoU(pred, target))
    L_obj = Σ_l balance_l · mean_cells BCE(t_obj, τ),  τ = max(CIoU, 0) detached on matched cells,
            0 elsewhere; a cell matched twice keeps its highest IoU (YOLOv5's ``sort_obj_iou``)
    L_cls = Σ_l mean_matches,classes BCE(t_cls, onehot smoothed to (1 − ε/2, ε/2)); only if nc > 1
    total = (λ_box L_box + λ_obj L_obj + λ_cls L_cls) · B, as YOLOv5 returns it.
YOLOv5's train.py rescales the gains by the number of levels, classes and image size before
building its loss; ``yolov5_scaled_gains`` does the same for a caller that wants it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .boxes import bbox_iou, xywh_to_xyxy


@dataclass(frozen=True)
class AnchorMatches:
    """Positive (image, anchor, cell) triples of one level, with what each one should predict.

    ``box`` is (x, y, w, h) in grid units, x and y measured from the matched cell's top-left corner;
    ``target`` is the row of ``targets`` each match came from.
    """

    image: torch.Tensor
    anchor: torch.Tensor
    gy: torch.Tensor
    gx: torch.Tensor
    box: torch.Tensor
    cls: torch.Tensor
    anchor_wh: torch.Tensor
    target: torch.Tensor


# Cell shifts of the centre cell and of the left, upper, right and lower neighbours.
_SHIFTS = ((0, 0), (-1, 0), (0, -1), (1, 0), (0, 1))


def match_anchors(targets: torch.Tensor, anchors: torch.Tensor, grid_hw: tuple[int, int],
                  anchor_t: float = 4.0) -> AnchorMatches:
    """Assign ``targets`` (N × 6, normalised) to ``anchors`` (na × 2, grid units) on an H × W grid."""
    height, width = int(grid_hw[0]), int(grid_hw[1])
    size = targets.new_tensor([width, height])
    xy_all, wh_all = targets[:, 2:4] * size, targets[:, 4:6] * size
    ratio = wh_all[None] / anchors[:, None]  # (na, N, 2)
    fits = torch.maximum(ratio, 1 / ratio).amax(-1) < anchor_t
    anchor, target = fits.nonzero(as_tuple=True)
    xy = xy_all[target]
    frac = xy % 1
    near_low = (frac < 0.5) & (xy > 1)
    near_high = (frac > 0.5) & (xy < size - 1)
    use = torch.stack((torch.ones_like(near_low[:, 0]), near_low[:, 0], near_low[:, 1],
                       near_high[:, 0], near_high[:, 1]))  # (5, n)
    which, fit = use.nonzero(as_tuple=True)
    shifts = torch.tensor(_SHIFTS, device=targets.device)[which]
    cell = xy[fit].long() + shifts
    target = target[fit]
    # The box keeps the unclamped cell, so a centre on the far image edge still regresses correctly.
    box = torch.cat((xy_all[target] - cell, wh_all[target]), dim=1)
    return AnchorMatches(
        image=targets[target, 0].long(),
        anchor=anchor[fit],
        gy=cell[:, 1].clamp(0, height - 1),
        gx=cell[:, 0].clamp(0, width - 1),
        box=box,
        cls=targets[target, 1].long(),
        anchor_wh=anchors[anchor[fit]],
        target=target,
    )


def yolov5_scaled_gains(nl: int, nc: int, img_size: int, box: float = 0.05, obj: float = 1.0,
                        cls: float = 0.5) -> dict[str, float]:
    """Gains as YOLOv5's train.py sets them: tuned for 3 levels, 80 classes and 640-pixel images."""
    layers = 3 / nl
    return {"box": box * layers, "obj": obj * (img_size / 640) ** 2 * layers, "cls": cls * nc / 80 * layers}


class AnchorLoss(nn.Module):
    """YOLOv5 loss; ``loss(preds, targets)`` returns ``(total, {"box", "obj", "cls"})``.

    ``nm`` extra channels after the class logits (YOLOv5-seg's mask coefficients) are accepted and
    left to ``AnchorSegLoss``.
    """

    def __init__(self, anchors_px: torch.Tensor, strides: torch.Tensor, nc: int, box: float = 0.05,
                 obj: float = 1.0, cls: float = 0.5, anchor_t: float = 4.0,
                 balance: tuple[float, ...] = (4.0, 1.0, 0.4), label_smoothing: float = 0.0,
                 nm: int = 0) -> None:
        super().__init__()
        anchors_px = torch.as_tensor(anchors_px, dtype=torch.float32)
        strides = torch.as_tensor(strides, dtype=torch.float32).flatten()
        if anchors_px.ndim != 3 or anchors_px.shape[-1] != 2:
            raise ValueError(f"AnchorLoss: anchors_px must be nl × na × 2, got {tuple(anchors_px.shape)}")
        if len(strides) != len(anchors_px) or len(balance) != len(anchors_px):
            raise ValueError(f"AnchorLoss: {len(anchors_px)} anchor levels, {len(strides)} strides, "
                             f"{len(balance)} balance weights; they must agree")
        self.register_buffer("anchors", anchors_px / strides.view(-1, 1, 1), persistent=False)
        self.register_buffer("strides", strides, persistent=False)
        self.nc, self.nm, self.anchor_t, self.balance = nc, nm, anchor_t, tuple(balance)
        self.gains = {"box": box, "obj": obj, "cls": cls}
        self.positive, self.negative = 1.0 - 0.5 * label_smoothing, 0.5 * label_smoothing

    def forward(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts, _ = self.matched_terms(preds, targets)
        total = (parts["box"] + parts["obj"] + parts["cls"]) * preds[0].shape[0]
        return total, {name: value.detach() for name, value in parts.items()}

    def matched_terms(self, preds: list[torch.Tensor],
                      targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[AnchorMatches]]:
        """Gain-weighted {box, obj, cls} (in the graph, not yet times B) and each level's matches;
        the segmentation loss adds its term on the same matches."""
        if len(preds) != len(self.anchors):
            raise ValueError(f"AnchorLoss: {len(preds)} levels of predictions for {len(self.anchors)} anchor levels")
        device = preds[0].device
        parts = {name: torch.zeros((), device=device) for name in ("box", "obj", "cls")}
        targets = targets.to(device=device, dtype=torch.float32)
        channels = 5 + self.nc + self.nm
        all_matches = []
        for level, pred in enumerate(preds):
            if pred.ndim != 5 or pred.shape[1] != self.anchors.shape[1] or pred.shape[-1] != channels:
                raise ValueError(f"AnchorLoss: level {level} has shape {tuple(pred.shape)}, expected "
                                 f"B × {self.anchors.shape[1]} × H × W × {channels}")
            matches = match_anchors(targets, self.anchors[level], pred.shape[2:4], self.anchor_t)
            box, obj, cls = self._level_terms(pred.float(), matches)
            parts["box"] = parts["box"] + box
            parts["obj"] = parts["obj"] + obj * self.balance[level]
            parts["cls"] = parts["cls"] + cls
            all_matches.append(matches)
        return {name: value * self.gains[name] for name, value in parts.items()}, all_matches

    def _level_terms(self, pred: torch.Tensor, m: AnchorMatches) -> tuple[torch.Tensor, ...]:
        """Unweighted (box, objectness, class) terms of one level."""
        zero = pred.new_zeros(())
        objectness_target = torch.zeros_like(pred[..., 4])
        if len(m.image) == 0:
            return zero, F.binary_cross_entropy_with_logits(pred[..., 4], objectness_target), zero
        picked = pred[m.image, m.anchor, m.gy, m.gx]
        xy = picked[:, :2].sigmoid() * 2 - 0.5
        wh = (picked[:, 2:4].sigmoid() * 2) ** 2 * m.anchor_wh
        ciou = bbox_iou(xywh_to_xyxy(torch.cat((xy, wh), 1)), xywh_to_xyxy(m.box), "ciou")
        box = (1.0 - ciou).mean()
        flat = ((m.image * pred.shape[1] + m.anchor) * pred.shape[2] + m.gy) * pred.shape[3] + m.gx
        objectness_target.view(-1).scatter_reduce_(0, flat, ciou.detach().clamp(min=0), "amax")
        obj = F.binary_cross_entropy_with_logits(pred[..., 4], objectness_target)
        cls = zero
        if self.nc > 1:  # a single class is carried by objectness alone, as in YOLOv5
            class_logits = picked[:, 5:5 + self.nc]
            class_target = torch.full_like(class_logits, self.negative)
            class_target[torch.arange(len(m.cls), device=pred.device), m.cls] = self.positive
            cls = F.binary_cross_entropy_with_logits(class_logits, class_target)
        return box, obj, cls
