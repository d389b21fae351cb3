"""Instance-segmentation losses: YOLOv8 / YOLO11-seg (task-aligned) and YOLOv5-seg (anchor-based).

Both heads predict masks as YOLACT does (Bolya et al. 2019): an image has nm prototype maps
P ∈ ℝ^{nm × Hp × Wp} (stride 4), each positive prediction a carries nm coefficients c_a, and its
mask logits are m_a = c_a · P (sigmoid for the mask). The positives and the ground truth g each one
is paired with are exactly those of the detection loss: ``TalLoss``'s task-aligned assignment, or
``AnchorLoss``'s anchor matching; ``M_g`` is g's rasterised mask at the prototype resolution
(``polygons_to_masks``).

Each positive is scored inside g's box only, at the prototype resolution: with (x1, y1, x2, y2)
the box in mask pixels, (w, h) its size as a fraction of the image and 𝟙_g(i, j) = [x1 ≤ i < x2]·
[y1 ≤ j < y2] on pixel indices,
    ℓ_a = (1 / (Hp·Wp)) Σ_{i,j} 𝟙_g · BCE(m_a(i, j), M_g(i, j)) / (w·h)  ≈ mean BCE over the box,
so small objects weigh as much as large ones.

YOLOv8-seg (Ultralytics ``v8SegmentationLoss``), N_pos the number of positive anchor points:
    L_seg = λ_box · Σ_pos ℓ_a / N_pos,     total = (L_box + L_seg + L_cls + L_dfl) · B
YOLOv5-seg (its ``utils/segment/loss.py``), per level l and image b the matches of b on l:
    L_seg = λ_box / B · Σ_l Σ_b mean_{matches} ℓ_a,     total = (L_box + L_seg + L_obj + L_cls) · B
Both reuse the box gain λ_box for the mask term, as the originals do, and return the parts already
weighted (the logged values); masks must come at the prototype resolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .anchor_based import AnchorLoss
from .boxes import xywh_to_xyxy
from .tal import TalLoss


def box_window(boxes: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(n, H, W) 0/1 float: pixel indices i, j with x1 ≤ i < x2 and y1 ≤ j < y2 (boxes in mask pixels)."""
    x1, y1, x2, y2 = boxes[:, :, None, None].unbind(1)
    cols = torch.arange(size_hw[1], device=boxes.device, dtype=boxes.dtype)
    rows = torch.arange(size_hw[0], device=boxes.device, dtype=boxes.dtype)[:, None]
    return ((cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)).to(boxes.dtype)


def instance_mask_losses(coefs: torch.Tensor, protos: torch.Tensor, image: torch.Tensor,
                         gt_masks: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """ℓ_a of the module docstring for n positives: ``coefs`` (n, nm), ``image`` (n,) indexing
    ``protos`` (B, nm, Hp, Wp), ``gt_masks`` (n, Hp, Wp), ``boxes_xyxy`` (n, 4) normalised to the image.

    One image at a time, so the (n, Hp, Wp) logits never hold a copy of the prototypes per positive.
    """
    height, width = protos.shape[2:]
    scale = boxes_xyxy.new_tensor([width, height, width, height])
    area = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
    losses = coefs.new_zeros(len(coefs))
    for b in image.unique().tolist():
        mine = (image == b).nonzero(as_tuple=True)[0]
        logits = (coefs[mine] @ protos[b].flatten(1)).view(-1, height, width)
        bce = F.binary_cross_entropy_with_logits(logits, gt_masks[mine], reduction="none")
        window = box_window(boxes_xyxy[mine] * scale, (height, width))
        losses = losses.index_put((mine,), (bce * window).mean((1, 2)) / area[mine])
    return losses


def _checked_masks(masks: torch.Tensor, protos: torch.Tensor, targets: torch.Tensor, who: str) -> torch.Tensor:
    if masks.ndim != 3 or len(masks) != len(targets) or tuple(masks.shape[1:]) != tuple(protos.shape[2:]):
        raise ValueError(f"{who}: masks must be N × Hp × Wp = {len(targets)} × {protos.shape[2]} × "
                         f"{protos.shape[3]} (one per target, at the prototype size), got {tuple(masks.shape)}")
    return masks.to(protos.device, torch.float32)


def _untouched(*tensors: torch.Tensor) -> torch.Tensor:
    """Zero that still depends on every tensor, so each one gets a (zero) gradient when nothing
    is matched (DistributedDataParallel rejects parameters left out of the graph)."""
    return sum((t.float() * 0).sum() for t in tensors)


class TalSegLoss(nn.Module):
    """YOLOv8 / YOLO11-seg loss; ``loss(preds, coefs, protos, targets, masks)`` returns
    ``(total, {"box", "seg", "cls", "dfl"})``.

    ``preds`` are ``TalLoss``'s levels, ``coefs`` the per-level B × nm × H × W mask coefficients,
    ``protos`` B × nm × Hp × Wp, ``masks`` N × Hp × Wp (one per target row). The other keyword
    arguments are ``TalLoss``'s (gains, assignment).
    """

    def __init__(self, strides: torch.Tensor, nc: int, reg_max: int = 16, **tal_options) -> None:
        super().__init__()
        self.detection = TalLoss(strides, nc, reg_max, **tal_options)

    def split(self, raw: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A yoloq Segment head's levels (box bins, classes, coefficients) → (preds, coefs)."""
        channels = 4 * self.detection.reg_max + self.detection.nc
        return [r[:, :channels] for r in raw], [r[:, channels:] for r in raw]

    def forward(self, preds: list[torch.Tensor], coefs: list[torch.Tensor], protos: torch.Tensor,
                targets: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts, assigned = self.detection.assigned_terms(preds, targets)
        masks = _checked_masks(masks, protos, targets, "TalSegLoss")
        batch = protos.shape[0]
        flat_coefs = torch.cat([c.flatten(2) for c in coefs], 2).transpose(1, 2).float()  # (B, A, nm)
        image, anchor = assigned.fg.nonzero(as_tuple=True)
        if not len(image):
            seg = _untouched(flat_coefs, protos)
        else:
            targets = targets.to(protos.device)
            order = torch.argsort(targets[:, 0].long(), stable=True)
            counts = torch.bincount(targets[:, 0].long(), minlength=batch)
            rows = order[(counts.cumsum(0) - counts)[image] + assigned.gt_index[image, anchor]]
            img_h, img_w = self.detection.image_hw(preds)
            boxes = assigned.boxes[image, anchor] / assigned.boxes.new_tensor([img_w, img_h, img_w, img_h])
            losses = instance_mask_losses(flat_coefs[image, anchor], protos.float(), image, masks[rows], boxes)
            seg = losses.sum() / len(image)
        parts = {"box": parts["box"], "seg": seg * self.detection.gains["box"],
                 "cls": parts["cls"], "dfl": parts["dfl"]}
        total = (parts["box"] + parts["seg"] + parts["cls"] + parts["dfl"]) * batch
        return total, {name: value.detach() for name, value in parts.items()}


class AnchorSegLoss(nn.Module):
    """YOLOv5-seg loss; ``loss(preds, protos, targets, masks)`` returns
    ``(total, {"box", "seg", "obj", "cls"})``.

    ``preds`` are levels of B × na × H × W × (5 + nc + nm) (``AnchorLoss``'s layout, then the mask
    coefficients), ``protos`` B × nm × Hp × Wp, ``masks`` N × Hp × Wp (one per target row).
    Keyword arguments are ``AnchorLoss``'s (gains, anchor_t, balance, label smoothing).
    """

    def __init__(self, anchors_px: torch.Tensor, strides: torch.Tensor, nc: int, nm: int = 32,
                 **anchor_options) -> None:
        super().__init__()
        self.detection = AnchorLoss(anchors_px, strides, nc, nm=nm, **anchor_options)

    def forward(self, preds: list[torch.Tensor], protos: torch.Tensor, targets: torch.Tensor,
                masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts, matches = self.detection.matched_terms(preds, targets)
        masks = _checked_masks(masks, protos, targets, "AnchorSegLoss")
        targets = targets.to(protos.device, torch.float32)
        batch, first_coef = protos.shape[0], 5 + self.detection.nc
        seg = protos.new_zeros((), dtype=torch.float32)
        for pred, m in zip(preds, matches):
            if not len(m.image):
                continue
            coefs = pred[m.image, m.anchor, m.gy, m.gx, first_coef:].float()
            boxes = xywh_to_xyxy(targets[m.target, 2:6])
            losses = instance_mask_losses(coefs, protos.float(), m.image, masks[m.target], boxes)
            per_image = torch.zeros(batch, device=losses.device).index_add(0, m.image, losses)
            counts = torch.bincount(m.image, minlength=batch)
            seg = seg + (per_image / counts.clamp(min=1)).sum()
        if not any(len(m.image) for m in matches):
            seg = _untouched(protos, *preds)
        parts = {"box": parts["box"], "seg": seg * self.detection.gains["box"] / batch,
                 "obj": parts["obj"], "cls": parts["cls"]}
        total = (parts["box"] + parts["seg"] + parts["obj"] + parts["cls"]) * batch
        return total, {name: value.detach() for name, value in parts.items()}
