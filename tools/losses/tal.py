"""Task-aligned detection loss for anchor-free heads (YOLOv8 / YOLO11).

Head layout: level l gives ``B × (4·R + nc) × H_l × W_l`` raw values, R = ``reg_max`` bin logits
for each box side (l, t, r, b) followed by the class logits. The anchor point of cell (i, j) is its
centre p = (j + ½, i + ½) in stride units. Targets are ``N × 6`` rows ``[image, class, xc, yc, w, h]``
normalised to the input image, whose size is the first level's grid times its stride.

Decoding: side k has the distribution P_k = softmax(z_k) over bins 0 … R−1 and the distance
d_k = Σ_i i·P_k(i) in stride units; the box is (p_x − d_l, p_y − d_t, p_x + d_r, p_y + d_b).

Assignment (TOOD, Feng et al. 2021, as YOLOv8 uses it), without gradient, in pixels:
  1. the candidates of ground truth g are the anchors whose point lies strictly inside g;
  2. alignment t_ga = s_ga^α · u_ga^β, s the predicted probability of g's class at a, u = max(CIoU, 0);
  3. the positives of g are its top-k candidates by t;
  4. an anchor positive for several ground truths keeps the one it overlaps most (highest u among
     all ground truths it is a candidate of, as Ultralytics does);
  5. soft target of a positive a of g: t̂_a = t_ga · max_pos(g) u / (max_pos(g) t + ε), so each
     ground truth's best-aligned anchor aims at that ground truth's best IoU.

Loss, with S = max(Σ t̂, 1) over the batch and the boxes in stride units:
    L_cls = Σ_{anchors, classes} BCE(logit, t̂ · onehot) / S
    L_box = Σ_pos t̂_a · (1 − CIoU(pred_a, gt_a)) / S
    L_dfl = Σ_pos t̂_a · ¼ Σ_k DFL(z_k, y_k) / S,   y = ltrb of gt_a from p_a, clamped to [0, R − 1.01]
    DFL(z, y) = −((⌊y⌋ + 1 − y) · log P(⌊y⌋) + (y − ⌊y⌋) · log P(⌊y⌋ + 1))      (Li et al. 2020)
    total = (λ_box L_box + λ_cls L_cls + λ_dfl L_dfl) · B
This is Ultralytics' ``v8DetectionLoss`` convention: it returns the gain-weighted parts times B and
logs them without the factor B; the parts returned here are the logged ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .boxes import bbox_iou, ltrb_to_xyxy, xywh_to_xyxy, xyxy_to_ltrb, xyxy_to_xywh


@dataclass(frozen=True)
class TalTargets:
    """What each anchor point should predict: ``fg`` (B, A), ``gt_index`` (B, A), ``boxes`` (B, A, 4)
    xyxy in the units of the ground-truth boxes, ``scores`` (B, A, nc) soft class targets."""

    fg: torch.Tensor
    gt_index: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor


def anchor_points(grid_hws: list[tuple[int, int]], strides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres (A, 2) in stride units, row-major per level, and each one's stride (A, 1)."""
    points, point_strides = [], []
    for (height, width), stride in zip(grid_hws, strides):
        ys, xs = torch.meshgrid(torch.arange(height, device=strides.device),
                                torch.arange(width, device=strides.device), indexing="ij")
        points.append(torch.stack((xs, ys), -1).view(-1, 2) + 0.5)
        point_strides.append(stride.expand(height * width, 1))
    return torch.cat(points).to(strides.dtype), torch.cat(point_strides)


def pack_targets(targets: torch.Tensor, batch_size: int,
                 img_hw: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad ``N × 6`` normalised targets to per-image rows: labels (B, G), xyxy pixel boxes (B, G, 4), valid (B, G)."""
    image = targets[:, 0].long()
    order = torch.argsort(image, stable=True)
    targets, image = targets[order], image[order]
    counts = torch.bincount(image, minlength=batch_size)
    most = int(counts.max()) if len(image) else 0
    slot = torch.arange(len(image), device=targets.device) - (counts.cumsum(0) - counts)[image]
    labels = torch.zeros(batch_size, most, dtype=torch.long, device=targets.device)
    boxes = targets.new_zeros(batch_size, most, 4)
    valid = torch.zeros(batch_size, most, dtype=torch.bool, device=targets.device)
    scale = targets.new_tensor([img_hw[1], img_hw[0], img_hw[1], img_hw[0]])
    labels[image, slot] = targets[:, 1].long()
    boxes[image, slot] = xywh_to_xyxy(targets[:, 2:6] * scale)
    valid[image, slot] = True
    return labels, boxes, valid


def _candidates(points: torch.Tensor, gt_boxes: torch.Tensor, valid: torch.Tensor, min_side: float,
                eps: float = 1e-9) -> torch.Tensor:
    """(B, G, A): anchor points strictly inside a valid ground truth, its sides floored at ``min_side``."""
    centre_wh = xyxy_to_xywh(gt_boxes)
    centre_wh = torch.cat((centre_wh[..., :2], centre_wh[..., 2:].clamp(min=min_side)), -1)
    distances = xyxy_to_ltrb(points[None, None], xywh_to_xyxy(centre_wh)[:, :, None])
    return (distances.amin(-1) > eps) & valid[..., None]


@torch.no_grad()
def task_aligned_assign(scores: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor,
                        gt_labels: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor,
                        topk: int = 10, alpha: float = 0.5, beta: float = 6.0, min_side: float = 0.0,
                        eps: float = 1e-9) -> TalTargets:
    """Assign ground truths to anchor points (module docstring, steps 1–5).

    ``scores`` (B, A, nc) probabilities, ``boxes`` (B, A, 4) predicted xyxy, ``points`` (A, 2),
    ``gt_labels`` (B, G), ``gt_boxes`` (B, G, 4) xyxy, ``gt_valid`` (B, G); one unit for all boxes.
    """
    batch, num_points, nc = scores.shape
    num_gt = gt_boxes.shape[1]
    if num_gt == 0:
        return TalTargets(fg=torch.zeros(batch, num_points, dtype=torch.bool, device=scores.device),
                          gt_index=torch.zeros(batch, num_points, dtype=torch.long, device=scores.device),
                          boxes=torch.zeros_like(boxes), scores=torch.zeros_like(scores))
    candidate = _candidates(points, gt_boxes, gt_valid, min_side)
    overlap = torch.zeros(candidate.shape, dtype=boxes.dtype, device=boxes.device)
    align = torch.zeros_like(overlap)
    b, g, a = candidate.nonzero(as_tuple=True)
    overlap[b, g, a] = bbox_iou(gt_boxes[b, g], boxes[b, a], "ciou").clamp(min=0)
    align[b, g, a] = scores[b, a, gt_labels[b, g]].pow(alpha) * overlap[b, g, a].pow(beta)

    top = align.topk(min(topk, num_points), dim=-1).indices
    positive = torch.zeros_like(candidate).scatter_(-1, top, True) & candidate
    shared = positive.sum(1, keepdim=True) > 1
    nearest = overlap.masked_fill(~candidate, -1).argmax(1, keepdim=True)
    best = torch.arange(num_gt, device=boxes.device).view(1, -1, 1) == nearest
    positive = torch.where(shared, best & candidate, positive)

    align = align * positive
    best_overlap = (overlap * positive).amax(-1, keepdim=True)
    normalised = align * best_overlap / (align.amax(-1, keepdim=True) + eps)
    fg = positive.any(1)
    gt_index = positive.to(torch.uint8).argmax(1)
    rows = torch.arange(batch, device=boxes.device)[:, None]
    target_scores = F.one_hot(gt_labels[rows, gt_index], nc) * (normalised.amax(1) * fg)[..., None]
    return TalTargets(fg=fg, gt_index=gt_index, boxes=gt_boxes[rows, gt_index], scores=target_scores.to(scores.dtype))


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL of bin logits ``(..., R)`` against real targets ``(...)`` in [0, R − 1), per element."""
    left = target.long()
    weight_right = target - left
    log_p = F.log_softmax(logits, dim=-1)
    near = log_p.gather(-1, torch.stack((left, left + 1), -1))
    return -(near[..., 0] * (1 - weight_right) + near[..., 1] * weight_right)


class TalLoss(nn.Module):
    """YOLOv8 / YOLO11 loss; ``loss(preds, targets)`` returns ``(total, {"box", "cls", "dfl"})``.

    ``min_candidate_side`` floors ground-truth sides (pixels) when choosing candidates, so a box
    smaller than a cell still has anchor points inside it; Ultralytics ≥ 8.4 uses the second stride.
    """

    def __init__(self, strides: torch.Tensor, nc: int, reg_max: int = 16, box: float = 7.5,
                 cls: float = 0.5, dfl: float = 1.5, topk: int = 10, alpha: float = 0.5,
                 beta: float = 6.0, min_candidate_side: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("strides", torch.as_tensor(strides, dtype=torch.float32).flatten(), persistent=False)
        self.register_buffer("bins", torch.arange(reg_max, dtype=torch.float32), persistent=False)
        self.nc, self.reg_max = nc, reg_max
        self.gains = {"box": box, "cls": cls, "dfl": dfl}
        self.assign = {"topk": topk, "alpha": alpha, "beta": beta, "min_side": min_candidate_side}

    def flatten(self, preds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Levels → bin logits (B, A, 4, R) and class logits (B, A, nc)."""
        if len(preds) != len(self.strides):
            raise ValueError(f"TalLoss: {len(preds)} levels of predictions for {len(self.strides)} strides")
        channels = 4 * self.reg_max + self.nc
        for level, pred in enumerate(preds):
            if pred.ndim != 4 or pred.shape[1] != channels:
                raise ValueError(f"TalLoss: level {level} has shape {tuple(pred.shape)}, "
                                 f"expected B × {channels} × H × W")
        flat = torch.cat([pred.flatten(2) for pred in preds], 2).transpose(1, 2).float()
        dist, logits = flat.split((4 * self.reg_max, self.nc), dim=-1)
        return dist.reshape(*dist.shape[:2], 4, self.reg_max), logits

    def image_hw(self, preds: list[torch.Tensor]) -> tuple[float, float]:
        """Input image size in pixels: the first level's grid times its stride."""
        return preds[0].shape[2] * float(self.strides[0]), preds[0].shape[3] * float(self.strides[0])

    def forward(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts, _ = self.assigned_terms(preds, targets)
        total = (parts["box"] + parts["cls"] + parts["dfl"]) * preds[0].shape[0]
        return total, {name: value.detach() for name, value in parts.items()}

    def assigned_terms(self, preds: list[torch.Tensor],
                       targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], TalTargets]:
        """Gain-weighted {box, cls, dfl} (in the graph, not yet times B) and the assignment behind
        them, its boxes in pixels; the segmentation loss adds its term to the same assignment."""
        dist, logits = self.flatten(preds)
        batch = logits.shape[0]
        points, point_strides = anchor_points([tuple(p.shape[2:]) for p in preds], self.strides)
        labels, gt_boxes, valid = pack_targets(targets.to(logits.device, torch.float32), batch, self.image_hw(preds))
        pred_boxes = ltrb_to_xyxy(points, dist.softmax(-1) @ self.bins)  # stride units
        assigned = task_aligned_assign(logits.detach().sigmoid(), pred_boxes.detach() * point_strides,
                                       points * point_strides, labels, gt_boxes, valid, **self.assign)
        normaliser = assigned.scores.sum().clamp(min=1)
        cls = F.binary_cross_entropy_with_logits(logits, assigned.scores, reduction="sum") / normaliser
        fg = assigned.fg
        weight = assigned.scores.sum(-1)[fg]
        target_boxes = assigned.boxes / point_strides  # stride units, like the predictions
        ciou = bbox_iou(pred_boxes[fg], target_boxes[fg], "ciou")
        box = ((1.0 - ciou) * weight).sum() / normaliser
        point_per_fg = points.expand(batch, -1, -1)[fg]
        target_ltrb = xyxy_to_ltrb(point_per_fg, target_boxes[fg]).clamp(0, self.reg_max - 1 - 0.01)
        dfl = (distribution_focal_loss(dist[fg], target_ltrb).mean(-1) * weight).sum() / normaliser
        parts = {"box": box * self.gains["box"], "cls": cls * self.gains["cls"], "dfl": dfl * self.gains["dfl"]}
        return parts, assigned
