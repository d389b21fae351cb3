"""Segmentation losses: polygon rasterisation, the YOLOv8-seg loss against Ultralytics'
``v8SegmentationLoss`` part by part, and the YOLOv5-seg loss on hand-checkable cases (the official
YOLOv5 code is not installed, so it cannot be the oracle).
"""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from yoloq.tools.losses import (AnchorLoss, AnchorSegLoss, TalLoss, TalSegLoss, polygons_to_masks,
                                rasterize_polygon)
from conftest import ANCHORS_PX, GRIDS, STRIDES, TARGETS

NM = 4  # prototype masks, so mask coefficients per anchor; prototypes are 16 × 16 for the 64 × 64 image

pytestmark = pytest.mark.usefixtures("one_thread")


def ellipse(xc: float, yc: float, w: float, h: float, points: int = 24) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack((xc + w / 2 * np.cos(t), yc + h / 2 * np.sin(t)), 1).astype(np.float32)


def ellipse_segments(targets: torch.Tensor, batch: int) -> list[list[np.ndarray]]:
    return [[ellipse(*row[2:].tolist()) for row in targets if row[0] == b] for b in range(batch)]


# --- rasterisation -----------------------------------------------------------------------------

def test_rectangle_covers_exactly_the_pixel_centres_inside():
    mask = rasterize_polygon(np.array([[1.2, 2.0], [5.6, 2.0], [5.6, 4.9], [1.2, 4.9]]), (8, 8))
    expected = np.zeros((8, 8), dtype=bool)
    expected[2:5, 1:6] = True  # centres x ∈ {1.5 … 5.5}, y ∈ {2.5, 3.5, 4.5}
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("size", [(40, 40), (50, 70)])
def test_polygon_area_within_a_pixel_border(size):
    # A triangle and a 24-gon, normalised, rasterised at two mask sizes.
    shapes = [np.array([[0.1, 0.1], [0.9, 0.2], [0.4, 0.85]]), ellipse(0.5, 0.5, 0.6, 0.4)]
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.8, 0.75], [0, 1, 0.5, 0.5, 0.6, 0.4]])
    masks = polygons_to_masks([shapes], targets, size)
    assert masks.shape == (2, *size) and masks.dtype == torch.uint8
    for polygon, mask in zip(shapes, masks):
        points = polygon * np.array([size[1], size[0]])
        x, y = points[:, 0], points[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        perimeter = np.linalg.norm(points - np.roll(points, -1, 0), axis=1).sum()
        assert abs(int(mask.sum()) - area) <= 0.5 * perimeter + 4, (int(mask.sum()), area)
    # The centroid is inside, the corners are not.
    assert masks[1, size[0] // 2, size[1] // 2] == 1 and masks[1, 0, 0] == 0


def test_polygons_follow_each_images_target_rows():
    square = lambda x0: np.array([[x0, 0.0], [x0 + 0.5, 0.0], [x0 + 0.5, 0.5], [x0, 0.5]])
    targets = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    masks = polygons_to_masks([[square(0.0)], [square(0.5), square(0.0)]], targets, (4, 4))
    assert masks[0, 0, 2:].all() and not masks[0, 0, :2].any()  # image 1's first polygon
    assert masks[1, 0, :2].all() and masks[2, 0, :2].all()
    with pytest.raises(ValueError, match="no polygon"):
        polygons_to_masks([[square(0.0)]], targets, (4, 4))
    with pytest.raises(ValueError, match="more polygons"):
        polygons_to_masks([[square(0.0)], [square(0.0)] * 3], targets, (4, 4))


# --- YOLOv8-seg against Ultralytics ------------------------------------------------------------

def _ultralytics_case():
    from ultralytics.nn.tasks import SegmentationModel

    torch.manual_seed(0)
    model = SegmentationModel("yolov8n-seg.yaml", nc=80, verbose=False).train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 256, 256))
    targets = torch.tensor([[0, 3, 0.50, 0.50, 0.40, 0.30], [0, 17, 0.30, 0.60, 0.20, 0.50],
                            [0, 3, 0.45, 0.55, 0.30, 0.30], [1, 0, 0.70, 0.20, 0.25, 0.15],
                            [1, 55, 0.52, 0.50, 0.03, 0.04], [1, 9, 0.5, 0.5, 6 / 256, 6 / 256]])
    masks = polygons_to_masks(ellipse_segments(targets, 2), targets, out["proto"].shape[2:])
    for b in range(2):  # disjoint instances, so Ultralytics' one-map-per-image format holds them all
        mine = (targets[:, 0] == b).nonzero().flatten()
        for k in range(1, len(mine)):
            masks[mine[k]] &= (masks[mine[:k]].sum(0) == 0).to(torch.uint8)
    return model, out, targets, masks


def _overlap_format(masks: torch.Tensor, targets: torch.Tensor, batch: int) -> torch.Tensor:
    """Ultralytics' ``overlap_mask`` input: per image one map, k + 1 on its k-th target's pixels."""
    maps = torch.zeros(batch, *masks.shape[1:])
    for b in range(batch):
        for k, row in enumerate((targets[:, 0] == b).nonzero().flatten().tolist()):
            maps[b][masks[row] > 0] = k + 1
    return maps


def _our_layout(raw: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    sizes = [f.shape[2] * f.shape[3] for f in raw["feats"]]
    levels = zip(raw["boxes"].split(sizes, 2), raw["scores"].split(sizes, 2),
                 raw["mask_coefficient"].split(sizes, 2), raw["feats"])
    preds, coefs = [], []
    for boxes, scores, coef, feat in levels:
        preds.append(torch.cat((boxes, scores), 1).view(boxes.shape[0], -1, *feat.shape[2:]))
        coefs.append(coef.reshape(coef.shape[0], -1, *feat.shape[2:]))
    return preds, coefs


@pytest.mark.parametrize("overlap", [False, True])
def test_tal_seg_loss_matches_ultralytics(overlap):
    pytest.importorskip("ultralytics")
    from ultralytics.utils.loss import v8SegmentationLoss

    model, out, targets, masks = _ultralytics_case()
    model.args = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5, overlap_mask=overlap)
    their_masks = _overlap_format(masks, targets, 2) if overlap else masks
    batch = {"batch_idx": targets[:, 0], "cls": targets[:, 1:2], "bboxes": targets[:, 2:], "masks": their_masks}
    oracle = v8SegmentationLoss(model)
    ours = TalSegLoss(model.model[-1].stride, nc=80, min_candidate_side=16.0)  # Ultralytics 8.4
    # As in test_losses: sharpened distances give small ground truths real overlaps.
    centre = torch.rand(2, 4, 1, out["boxes"].shape[2], generator=torch.Generator().manual_seed(1)) * 4 + 0.3
    sharpened = out["boxes"] - 2 * (torch.arange(16.0).view(1, 1, 16, 1) - centre).pow(2).flatten(1, 2)
    for boxes in (out["boxes"], sharpened):
        raw = dict(out, boxes=boxes)
        expected_total, expected = oracle(raw, batch)
        preds, coefs = _our_layout(raw)
        total, parts = ours(preds, coefs, raw["proto"], targets, masks)
        assert parts["seg"] > 0
        for name in ("box", "seg", "cls", "dfl"):
            torch.testing.assert_close(parts[name], expected[f"{name}_loss"], rtol=1e-4, atol=0)
        torch.testing.assert_close(total, expected_total.sum(), rtol=1e-4, atol=0)


# --- tiny heads --------------------------------------------------------------------------------

class TinySeg(nn.Module):
    """Per level a 3×3 conv to ``per_level`` channels; prototypes from a conv on an upsampled P3."""

    def __init__(self, per_level: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.feats = [torch.randn(2, 8, h, w) for h, w in GRIDS]
        self.heads = nn.ModuleList(nn.Conv2d(8, per_level, 3, padding=1) for _ in GRIDS)
        self.proto = nn.Conv2d(8, NM, 3, padding=1)

    def forward(self):
        protos = self.proto(F.interpolate(self.feats[0], scale_factor=2.0))
        return [head(f) for f, head in zip(self.feats, self.heads)], protos


def _tal_seg(model: TinySeg, loss: TalSegLoss, targets, masks):
    raw, protos = model()
    return loss(*loss.split(raw), protos, targets, masks)


def _anchor_seg(model: TinySeg, loss: AnchorSegLoss, targets, masks, nc: int = 3):
    raw, protos = model()
    preds = [r.view(r.shape[0], 3, 5 + nc + NM, *r.shape[2:]).permute(0, 1, 3, 4, 2) for r in raw]
    return loss(preds, protos, targets, masks)


def _masks(targets: torch.Tensor) -> torch.Tensor:
    return polygons_to_masks(ellipse_segments(targets, 2), targets, (16, 16))


CASES = {
    "tal": (lambda: TinySeg(64 + 3 + NM), lambda: TalSegLoss(STRIDES, nc=3), _tal_seg),
    "anchor": (lambda: TinySeg(3 * (5 + 3 + NM)), lambda: AnchorSegLoss(ANCHORS_PX, STRIDES, nc=3, nm=NM),
               _anchor_seg),
}


@pytest.mark.parametrize("kind", CASES)
def test_gradients_reach_prototypes_and_coefficients(kind):
    make_model, make_loss, run = CASES[kind]
    model, loss = make_model(), make_loss()
    raw, protos = model()
    raw = [r.detach().requires_grad_() for r in raw]
    protos = protos.detach().requires_grad_()
    model.forward = lambda: (raw, protos)
    total, parts = run(model, loss, TARGETS, _masks(TARGETS))
    assert parts["seg"] > 0 and torch.isfinite(total)
    total.backward()
    assert protos.grad.abs().sum() > 0
    coefficient_grads = [r.grad[:, -NM:] if kind == "tal" else
                         r.grad.view(2, 3, 5 + 3 + NM, *r.shape[2:])[:, :, -NM:] for r in raw]
    assert sum(g.abs().sum() for g in coefficient_grads) > 0


@pytest.mark.parametrize("kind", CASES)
def test_images_without_targets(kind):
    make_model, make_loss, run = CASES[kind]
    model, loss = make_model(), make_loss()
    total, parts = run(model, loss, torch.zeros(0, 6), torch.zeros(0, 16, 16))
    assert parts["seg"] == 0 and parts["box"] == 0 and torch.isfinite(total)
    total.backward()
    assert model.proto.weight.grad is not None  # zero, but the graph reaches every output
    only_first = TARGETS[TARGETS[:, 0] == 0]  # the second image of the batch has none
    total, parts = run(model, loss, only_first, _masks(only_first))
    assert parts["seg"] > 0 and torch.isfinite(total)


@pytest.mark.parametrize("kind", CASES)
def test_detection_parts_are_the_detection_loss(kind):
    make_model, make_loss, run = CASES[kind]
    model, loss = make_model(), make_loss()
    _, parts = run(model, loss, TARGETS, _masks(TARGETS))
    raw, _ = model()
    if kind == "tal":
        _, detection = TalLoss(STRIDES, nc=3)(loss.split(raw)[0], TARGETS)
    else:
        preds = [r.view(2, 3, 5 + 3 + NM, *r.shape[2:]).permute(0, 1, 3, 4, 2)[..., :8] for r in raw]
        _, detection = AnchorLoss(ANCHORS_PX, STRIDES, nc=3)(preds, TARGETS)
    for name, value in detection.items():
        torch.testing.assert_close(parts[name], value)


@pytest.mark.parametrize("kind", CASES)
def test_seg_loss_falls_under_a_few_optimiser_steps(kind):
    make_model, make_loss, run = CASES[kind]
    model, loss = make_model(), make_loss()
    masks = _masks(TARGETS)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    history = []
    for _ in range(40):
        total, parts = run(model, loss, TARGETS, masks)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append(parts["seg"].item())
    assert history[-1] < 0.5 * history[0], history


# --- YOLOv5-seg by hand ------------------------------------------------------------------------

def _one_level_anchor_case(coefs: torch.Tensor, protos: torch.Tensor, targets: torch.Tensor):
    """One level of 4 × 4 cells at stride 8 (a 32 × 32 image, 8 × 8 prototypes), one anchor of
    16 × 16 px, no classes; every cell of image b predicts the mask coefficients ``coefs[b]``."""
    loss = AnchorSegLoss(torch.tensor([[[16.0, 16.0]]]), torch.tensor([8.0]), nc=1, nm=protos.shape[1],
                         balance=(1.0,))
    pred = torch.zeros(len(coefs), 1, 4, 4, 6 + protos.shape[1])
    pred[..., 6:] = coefs[:, None, None, None]
    square = lambda r: np.array([[r[2] - r[4] / 2, r[3] - r[5] / 2], [r[2] + r[4] / 2, r[3] - r[5] / 2],
                                 [r[2] + r[4] / 2, r[3] + r[5] / 2], [r[2] - r[4] / 2, r[3] + r[5] / 2]])
    segments = [[square(r.tolist()) for r in targets if r[0] == b] for b in range(len(coefs))]
    masks = polygons_to_masks(segments, targets, protos.shape[2:])
    return loss([pred], protos, targets, masks)


def test_anchor_seg_loss_by_hand():
    # Constant prototype 1, so every mask logit is the coefficient c of its image. A ground-truth
    # mask that fills its box gives BCE softplus(−c) on each of its box's pixels, and the
    # 1/(Hp·Wp) mean over the crop divided by the box's image fraction is exactly that per-pixel
    # loss. Image 0 has two targets and image 1 one: YOLOv5 averages per image, then sums images.
    targets = torch.tensor([[0, 0, 0.25, 0.25, 0.5, 0.5], [0, 0, 0.75, 0.75, 0.5, 0.5],
                            [1, 0, 0.5, 0.5, 0.5, 0.5]])
    coefs = torch.tensor([[0.3], [-1.2]])
    _, parts = _one_level_anchor_case(coefs, torch.ones(2, 1, 8, 8), targets)
    expected = 0.05 / 2 * (math.log1p(math.exp(-0.3)) + math.log1p(math.exp(1.2)))
    assert parts["seg"].item() == pytest.approx(expected, rel=1e-5)


def test_anchor_seg_loss_is_low_for_a_perfect_mask():
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.5, 0.5]])
    inside = torch.zeros(8, 8)
    inside[2:6, 2:6] = 1
    protos = (20 * (2 * inside - 1))[None, None]
    _, right = _one_level_anchor_case(torch.tensor([[1.0]]), protos, targets)
    _, wrong = _one_level_anchor_case(torch.tensor([[-1.0]]), protos, targets)
    assert right["seg"] < 1e-8 and wrong["seg"] > 0.05 * 19  # BCE ≈ 20 per pixel when inverted


def test_masks_at_the_wrong_resolution_are_rejected():
    with pytest.raises(ValueError, match="prototype size"):
        _tal_seg(TinySeg(64 + 3 + NM), TalSegLoss(STRIDES, nc=3), TARGETS,
                 polygons_to_masks(ellipse_segments(TARGETS, 2), TARGETS, (64, 64)))
