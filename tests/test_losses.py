"""Detection losses: box IoUs, the YOLOv5 anchor matcher and loss, the task-aligned assigner and loss.

The YOLOv8 loss is checked part by part against Ultralytics' own ``v8DetectionLoss`` on the raw
training outputs of a randomly initialised yolov8n.
"""
from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from yoloq.tools.losses import AnchorLoss, TalLoss, bbox_iou
from yoloq.tools.losses.anchor_based import match_anchors
from yoloq.tools.losses.tal import distribution_focal_loss, task_aligned_assign
from conftest import ANCHORS_PX, GRIDS, STRIDES, TARGETS

KINDS = ("iou", "giou", "diou", "ciou")


pytestmark = pytest.mark.usefixtures("one_thread")


# --- boxes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_identical_boxes_score_one(kind):
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [10.0, 5.0, 40.0, 9.0]])
    torch.testing.assert_close(bbox_iou(boxes, boxes.clone(), kind), torch.ones(2), atol=1e-6, rtol=0)


def test_disjoint_boxes():
    a, b = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([2.0, 0.0, 3.0, 1.0])
    assert bbox_iou(a, b, "iou") == 0
    # Hull 3 × 1, union 2: GIoU = 0 − (3 − 2) / 3.
    assert bbox_iou(a, b, "giou").item() == pytest.approx(-1 / 3, abs=1e-6)
    assert bbox_iou(a, b, "diou") < 0 and bbox_iou(a, b, "ciou") < 0


def test_ciou_hand_computed():
    a, b = torch.tensor([0.0, 0.0, 2.0, 2.0]), torch.tensor([1.0, 0.0, 3.0, 4.0])
    iou = 2 / (4 + 8 - 2)  # overlap 1 × 2
    rho2, c2 = 1**2 + 1**2, 3**2 + 4**2  # centres (1, 1) and (2, 2); hull 3 × 4
    v = 4 / math.pi**2 * (math.atan(2 / 4) - math.atan(2 / 2)) ** 2
    alpha = v / (1 - iou + v)
    assert bbox_iou(a, b, "ciou").item() == pytest.approx(iou - rho2 / c2 - alpha * v, abs=1e-6)
    assert bbox_iou(a, b, "diou").item() == pytest.approx(iou - rho2 / c2, abs=1e-6)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        bbox_iou(torch.zeros(4), torch.zeros(4), "eiou")


# --- anchor-based ------------------------------------------------------------------------------

def test_match_anchors_hand_case():
    # Grid units: centre (3.3, 5.7), size 2 × 2 on an 8 × 8 grid.
    target = torch.tensor([[0, 4, 3.3 / 8, 5.7 / 8, 2 / 8, 2 / 8]])
    anchors = torch.tensor([[1.0, 1.0], [2.0, 2.0], [10.0, 10.0]])  # ratios 2, 1, 5 against anchor_t 4
    m = match_anchors(target, anchors, (8, 8), anchor_t=4.0)
    got = sorted(zip(m.anchor.tolist(), m.gx.tolist(), m.gy.tolist()))
    # Centre cell (3, 5), left neighbour (frac x = .3) and lower neighbour (frac y = .7).
    assert got == sorted((a, gx, gy) for a in (0, 1) for gx, gy in ((3, 5), (2, 5), (3, 6)))
    assert (m.cls == 4).all() and (m.image == 0).all()
    offsets = m.box[:, :2] + torch.stack((m.gx, m.gy), 1)
    torch.testing.assert_close(offsets, torch.tensor([[3.3, 5.7]]).expand_as(offsets))
    assert ((m.box[:, :2] > -0.5) & (m.box[:, :2] < 1.5)).all()


def test_match_anchors_near_the_border_has_no_outside_neighbour():
    target = torch.tensor([[0, 0, 0.6 / 8, 0.4 / 8, 1 / 8, 1 / 8]])
    m = match_anchors(target, torch.tensor([[1.0, 1.0]]), (8, 8))
    # frac x = .6 → right neighbour; frac y = .4 would point up, but y < 1 has no cell above.
    assert sorted(zip(m.gx.tolist(), m.gy.tolist())) == [(0, 0), (1, 0)]


def _tiny_heads(out_channels: int, seed: int = 0):
    torch.manual_seed(seed)
    feats = [torch.randn(2, 8, h, w) for h, w in GRIDS]
    heads = nn.ModuleList(nn.Conv2d(8, out_channels, 3, padding=1) for _ in GRIDS)
    return feats, heads


def _anchor_preds(feats, heads, nc: int):
    return [head(f).view(f.shape[0], 3, 5 + nc, *f.shape[2:]).permute(0, 1, 3, 4, 2) for f, head in zip(feats, heads)]


def _overfit(loss_fn, feats, heads, forward, steps: int = 100) -> list[tuple[float, dict]]:
    """(total, parts) at the first and the last of ``steps`` Adam steps on one fixed batch."""
    optimiser = torch.optim.Adam(heads.parameters(), lr=2e-2)
    history = []
    for _ in range(steps):
        total, parts = loss_fn(forward(feats, heads), TARGETS)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append((total.item(), parts))
    return [history[0], history[-1]]


def test_anchor_loss_is_finite_and_positive():
    feats, heads = _tiny_heads(3 * 8)
    total, parts = AnchorLoss(ANCHORS_PX, STRIDES, nc=3)(_anchor_preds(feats, heads, 3), TARGETS)
    assert set(parts) == {"box", "obj", "cls"}
    assert torch.isfinite(total) and total > 0 and all(v > 0 for v in parts.values())
    torch.testing.assert_close(total.detach(), sum(parts.values()) * 2)


def test_anchor_loss_without_targets_is_objectness_only():
    feats, heads = _tiny_heads(3 * 8)
    _, parts = AnchorLoss(ANCHORS_PX, STRIDES, nc=3)(_anchor_preds(feats, heads, 3), torch.zeros(0, 6))
    assert parts["box"] == 0 and parts["cls"] == 0 and parts["obj"] > 0


def test_anchor_loss_gradient_reaches_every_level():
    feats, heads = _tiny_heads(3 * 8)
    preds = [p.detach().requires_grad_() for p in _anchor_preds(feats, heads, 3)]
    total, _ = AnchorLoss(ANCHORS_PX, STRIDES, nc=3)(preds, TARGETS)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in preds)


def test_anchor_loss_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="balance"):
        AnchorLoss(ANCHORS_PX, STRIDES, nc=3, balance=(4.0, 1.0))


def test_anchor_loss_overfits_a_tiny_head():
    feats, heads = _tiny_heads(3 * 8)
    loss = AnchorLoss(ANCHORS_PX, STRIDES, nc=3)
    (first, first_parts), (last, last_parts) = _overfit(loss, feats, heads, lambda f, h: _anchor_preds(f, h, 3))
    assert last < 0.2 * first, (first, last)
    assert last_parts["box"] < 0.5 * first_parts["box"], (first_parts, last_parts)


# --- task-aligned ------------------------------------------------------------------------------

def _one_level_case(pred_wh=(32.0, 24.0)):
    """8 × 8 cells of stride 8; each anchor predicts a fixed-size box centred on itself."""
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    points = (torch.stack((xs, ys), -1).view(-1, 2) + 0.5) * 8
    half = torch.tensor(pred_wh) / 2
    boxes = torch.cat((points - half, points + half), 1)[None]
    scores = torch.full((1, 64, 2), 0.5)
    return scores, boxes, points


def test_assigner_takes_the_top_k_candidates_inside_the_ground_truth():
    scores, boxes, points = _one_level_case()
    gt = torch.tensor([[[10.0, 10.0, 42.0, 34.0]]])
    args = (torch.tensor([[1]]), gt, torch.tensor([[True]]))
    inside = ((points > gt[0, 0, :2]) & (points < gt[0, 0, 2:])).all(1)
    assert inside.sum() == 12  # x ∈ {12, 20, 28, 36}, y ∈ {12, 20, 28}
    out = task_aligned_assign(scores, boxes, points, *args, topk=10)
    assert out.fg.sum() == 10 and not (out.fg[0] & ~inside).any()
    metric = 0.5**0.5 * bbox_iou(gt[0].expand(64, 4), boxes[0], "ciou").clamp(min=0) ** 6
    expected = metric.masked_fill(~inside, -1).topk(10).indices
    assert set(out.fg[0].nonzero().flatten().tolist()) == set(expected.tolist())
    best_iou = bbox_iou(gt[0].expand(64, 4), boxes[0], "ciou")[out.fg[0]].max()
    torch.testing.assert_close(out.scores[0, :, 1].max(), best_iou)
    assert (out.scores[0, :, 0] == 0).all() and (out.scores[0, ~out.fg[0]] == 0).all()
    assert task_aligned_assign(scores, boxes, points, *args, topk=20).fg.sum() == 12


def test_assigner_gives_a_shared_anchor_to_the_ground_truth_it_overlaps_most():
    scores, boxes, points = _one_level_case(pred_wh=(16.0, 16.0))
    gt = torch.tensor([[[8.0, 8.0, 24.0, 24.0], [8.0, 8.0, 40.0, 40.0]]])
    out = task_aligned_assign(scores, boxes, points, torch.tensor([[0, 1]]), gt, torch.tensor([[True, True]]))
    anchor = 1 * 8 + 1  # point (12, 12), inside both; its 16 × 16 box overlaps the first one more
    assert out.fg[0, anchor] and out.gt_index[0, anchor] == 0 and out.scores[0, anchor, 0] > 0


def test_assigner_floors_tiny_boxes_only_when_asked():
    scores, boxes, points = _one_level_case(pred_wh=(8.0, 8.0))
    gt = torch.tensor([[[29.0, 29.0, 35.0, 35.0]]])  # 6 × 6 px between the centres 28 and 36
    args = (torch.tensor([[0]]), gt, torch.tensor([[True]]))
    assert not task_aligned_assign(scores, boxes, points, *args).fg.any()
    assert task_aligned_assign(scores, boxes, points, *args, min_side=16.0).fg.any()


def test_dfl_is_near_zero_for_a_sharp_distribution_on_the_target_bin():
    target = torch.tensor([3.0, 7.0])
    sharp = torch.full((2, 16), -30.0).scatter(1, target.long()[:, None], 30.0)
    spread = torch.zeros(2, 16)
    sharp_loss, spread_loss = distribution_focal_loss(sharp, target), distribution_focal_loss(spread, target)
    torch.testing.assert_close(spread_loss, torch.full((2,), math.log(16)))
    assert (sharp_loss < 1e-6 * spread_loss).all()
    # Between two bins, the best distribution splits its mass linearly: 0.7 / 0.3 for a target 0.3.
    candidates = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1], [1.0 - 1e-6, 1e-6]]).log()
    losses = distribution_focal_loss(candidates, torch.full((4,), 0.3))
    assert losses.argmin() == 0


def _tal_preds(feats, heads):
    return [head(f) for f, head in zip(feats, heads)]


def test_tal_loss_without_targets_has_only_class_loss():
    feats, heads = _tiny_heads(64 + 3)
    preds = _tal_preds(feats, heads)
    total, parts = TalLoss(STRIDES, nc=3)(preds, torch.zeros(0, 6))
    assert parts["box"] == 0 and parts["dfl"] == 0 and parts["cls"] > 0
    total.backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in heads)


def test_tal_loss_overfits_a_tiny_head():
    feats, heads = _tiny_heads(64 + 3)
    (first, first_parts), (last, last_parts) = _overfit(TalLoss(STRIDES, nc=3), feats, heads, _tal_preds)
    assert last < 0.2 * first, (first, last)
    assert last_parts["box"] < 0.5 * first_parts["box"], (first_parts, last_parts)


def test_tal_loss_matches_ultralytics():
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.loss import v8DetectionLoss

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=80, verbose=False).train()
    model.args = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 256, 256))
    targets = torch.tensor([[0, 3, 0.50, 0.50, 0.40, 0.30], [0, 17, 0.30, 0.60, 0.20, 0.50],
                            [0, 3, 0.45, 0.55, 0.30, 0.30], [1, 0, 0.70, 0.20, 0.25, 0.15],
                            [1, 55, 0.52, 0.50, 0.03, 0.04], [1, 9, 0.5, 0.5, 6 / 256, 6 / 256]])
    batch = {"batch_idx": targets[:, 0], "cls": targets[:, 1:2], "bboxes": targets[:, 2:]}
    oracle = v8DetectionLoss(model)
    ours = TalLoss(model.model[-1].stride, nc=80, min_candidate_side=16.0)  # Ultralytics 8.4 floors at stride 2
    # Random initial distances are ~7.5 cells; a second run pulls them to 0.3–4.3 cells so that
    # small ground truths get real overlaps and the assigner has choices to make.
    centre = torch.rand(2, 4, 1, out["boxes"].shape[2], generator=torch.Generator().manual_seed(1)) * 4 + 0.3
    sharpened = out["boxes"] - 2 * (torch.arange(16.0).view(1, 1, 16, 1) - centre).pow(2).flatten(1, 2)
    for boxes in (out["boxes"], sharpened):
        raw = dict(out, boxes=boxes)
        expected_total, expected = oracle(raw, batch)
        sizes = [f.shape[2] * f.shape[3] for f in raw["feats"]]
        levels = zip(boxes.split(sizes, 2), raw["scores"].split(sizes, 2), raw["feats"])
        preds = [torch.cat((b, s), 1).view(*b.shape[:1], -1, *f.shape[2:]) for b, s, f in levels]
        total, parts = ours(preds, targets)
        for name in ("box", "cls", "dfl"):
            torch.testing.assert_close(parts[name], expected[f"{name}_loss"], rtol=1e-3, atol=0)
        torch.testing.assert_close(total, expected_total.sum(), rtol=1e-3, atol=0)
