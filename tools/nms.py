"""Non-maximum suppression in plain torch ops (torchvision is not a dependency).

``non_max_suppression`` follows YOLOv5's ``utils.general.non_max_suppression`` as its ``val.py``
calls it (multi-label, class-aware): a box is kept once per class whose confidence passes
``conf_thres``, boxes of different classes are pushed apart by ``class * max_wh`` so one NMS over
the image never lets a class suppress another, at most ``max_nms`` candidates enter NMS and
``max_det`` leave it. Segmentation heads append ``nm`` mask coefficients to every row; they are
carried through to the kept detections untouched.

``nms`` gives the same indices as ``torchvision.ops.nms``: greedy in descending score order, a
box suppressed when its IoU with a kept box is strictly above the threshold. It works on blocks of
boxes: a block is first filtered by the boxes kept before it, then resolved inside itself by the
Cluster-NMS fixed point (Zheng et al. 2021), ``keep = alive & ~any(keep_i & iou_ij > t, i < j)``,
which reaches greedy NMS's answer exactly (entry j is final once every i < j is) and needs only
block x block memory.
"""
from __future__ import annotations

from typing import Literal

import torch

Layout = Literal["auto", "anchors", "anchor_free"]


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    xy, half = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat((xy - half, xy + half), dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) IoU of xyxy boxes, computed as torchvision does (no +1 on widths)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float,
        block: int = 128, max_keep: int | None = None) -> torch.Tensor:
    """Indices of the boxes greedy NMS keeps, in descending score order; with ``max_keep``, only
    the first ``max_keep`` of them (greedy order makes the rest irrelevant, so it stops there:
    a model whose boxes barely overlap would otherwise compare all 30,000 candidates)."""
    order = scores.argsort(descending=True, stable=True)
    boxes = boxes[order]
    keep = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    for start in range(0, len(order), block):
        chunk = boxes[start:start + block]
        kept_before = boxes[:start][keep[:start]]
        alive = torch.ones(len(chunk), dtype=torch.bool, device=boxes.device)
        if len(kept_before):
            alive = ~(box_iou(kept_before, chunk) > iou_thres).any(dim=0)
        suppresses = (box_iou(chunk, chunk) > iou_thres).triu_(diagonal=1)
        chunk_keep = alive
        while True:  # at most len(chunk) rounds; usually a handful
            update = alive & ~(suppresses & chunk_keep[:, None]).any(dim=0)
            if torch.equal(update, chunk_keep):
                break
            chunk_keep = update
        keep[start:start + block] = chunk_keep
        if max_keep is not None and int(keep.sum()) >= max_keep:
            break
    kept = order[keep]
    return kept if max_keep is None else kept[:max_keep]


def to_anchor_rows(prediction: torch.Tensor, layout: Layout = "auto") -> tuple[torch.Tensor, bool]:
    """Predictions as B x N x C rows and whether column 4 is an objectness score.

    YOLOv5 (anchors) gives B x N x (5 + nc): xywh, objectness, class scores. YOLOv8/11 (anchor
    free) give B x (4 + nc) x N: xywh, class scores. ``auto`` tells them apart by which axis is
    longer, since there are far more candidate boxes than classes.
    """
    if prediction.dim() != 3:
        raise ValueError(f"expected a B x N x C or B x C x N prediction, got {tuple(prediction.shape)}")
    if layout == "auto":
        layout = "anchor_free" if prediction.shape[1] < prediction.shape[2] else "anchors"
    if layout == "anchor_free":
        return prediction.transpose(1, 2), False
    if layout == "anchors":
        return prediction, True
    raise ValueError(f"unknown layout {layout!r}; expected 'auto', 'anchors' or 'anchor_free'")


def _candidates(rows: torch.Tensor, has_objectness: bool, conf_thres: float,
                multi_label: bool, nm: int = 0) -> torch.Tensor:
    """(k, 6 + nm) rows ``x1 y1 x2 y2 conf cls`` (+ the row's last nm values) of one image above
    the confidence threshold."""
    rows, extras = rows[:, :rows.shape[1] - nm], rows[:, rows.shape[1] - nm:]
    if has_objectness:
        keep = rows[:, 4] > conf_thres  # YOLOv5 first filters on objectness alone
        rows, extras = rows[keep], extras[keep]
        scores = rows[:, 5:] * rows[:, 4:5]
    else:
        scores = rows[:, 4:]
    boxes = xywh_to_xyxy(rows[:, :4])
    if multi_label and scores.shape[1] > 1:
        box_index, cls = (scores > conf_thres).nonzero(as_tuple=True)
        conf = scores[box_index, cls]
    else:
        conf, cls = scores.max(dim=1)
        box_index = (conf > conf_thres).nonzero(as_tuple=True)[0]
        conf, cls = conf[box_index], cls[box_index]
    return torch.cat((boxes[box_index], conf[:, None], cls[:, None].to(boxes.dtype), extras[box_index]), dim=1)


def non_max_suppression(prediction: torch.Tensor, conf_thres: float = 0.001,
                        iou_thres: float = 0.6, *, layout: Layout = "auto",
                        multi_label: bool = True, agnostic: bool = False, max_det: int = 300,
                        max_wh: float = 7680.0, max_nms: int = 30000, nm: int = 0) -> list[torch.Tensor]:
    """Per image, an (n, 6 + nm) tensor ``x1 y1 x2 y2 conf cls`` in input pixels, best first,
    followed by the last ``nm`` values of the row it came from (mask coefficients)."""
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"thresholds must be in [0, 1], got conf {conf_thres}, iou {iou_thres}")
    rows, has_objectness = to_anchor_rows(prediction, layout)
    if not 0 <= nm < rows.shape[2] - 4 - has_objectness:
        raise ValueError(f"nm = {nm} leaves no class scores in rows of {rows.shape[2]} values")
    results = []
    for image_rows in rows:
        det = _candidates(image_rows.float(), has_objectness, conf_thres, multi_label, nm)
        det = det[det[:, 4].argsort(descending=True, stable=True)[:max_nms]]
        offsets = det[:, 5:6] * (0.0 if agnostic else max_wh)
        kept = nms(det[:, :4] + offsets, det[:, 4], iou_thres, max_keep=max_det)
        results.append(det[kept])
    return results
