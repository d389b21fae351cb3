"""NMS against a brute-force reference: greedy per-class suppression written box by box.

Boxes sit on an integer grid so that the class offsets of the vectorised NMS add exactly in
float32, and the reference computes IoU with float32 scalars in the same order of operations:
both sides then see bit-identical IoUs and must keep exactly the same boxes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from yoloq.tools.nms import box_iou, nms, non_max_suppression, xywh_to_xyxy


def reference_iou(a, b) -> np.float32:
    f = np.float32
    area_a, area_b = (f(a[2]) - f(a[0])) * (f(a[3]) - f(a[1])), (f(b[2]) - f(b[0])) * (f(b[3]) - f(b[1]))
    w = max(min(f(a[2]), f(b[2])) - max(f(a[0]), f(b[0])), f(0))
    h = max(min(f(a[3]), f(b[3])) - max(f(a[1]), f(b[1])), f(0))
    inter = w * h
    return inter / (area_a + area_b - inter)


def reference_nms(boxes: list, scores: list, threshold: float) -> list[int]:
    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda k: -scores[k]):
        if all(not reference_iou(boxes[k], boxes[i]) > np.float32(threshold) for k in kept):
            kept.append(i)
    return kept


def reference_yolo_nms(rows: np.ndarray, objectness: bool, conf: float, iou: float,
                       max_det: int) -> list[tuple]:
    """One image: every (box, class) pair above conf, greedy NMS within each class."""
    detections = []
    for row in rows:
        x, y, w, h = (float(v) for v in row[:4])
        box = (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
        if objectness and not row[4] > conf:
            continue
        scores = row[5:] * row[4] if objectness else row[4:]
        detections += [(box, float(s), c) for c, s in enumerate(scores) if s > conf]
    kept = []
    for cls in {d[2] for d in detections}:
        mine = [d for d in detections if d[2] == cls]
        kept += [mine[i] for i in reference_nms([d[0] for d in mine], [d[1] for d in mine], iou)]
    return sorted(kept, key=lambda d: -d[1])[:max_det]


@st.composite
def grid_boxes(draw, max_boxes: int = 40):
    n = draw(st.integers(1, max_boxes))
    corners = draw(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60),
                                      st.integers(1, 30), st.integers(1, 30)),
                            min_size=n, max_size=n))
    return [(x, y, x + w, y + h) for x, y, w, h in corners]


@settings(max_examples=200, deadline=None)
@given(boxes=grid_boxes(), threshold=st.sampled_from([0.1, 0.3, 0.45, 0.5, 0.6, 0.7, 0.9]),
       block=st.sampled_from([1, 3, 7, 128]), seed=st.integers(0, 2**31 - 1))
def test_nms_matches_greedy_reference(boxes, threshold, block, seed):
    scores = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed)).float()
    kept = nms(torch.tensor(boxes, dtype=torch.float32), scores, threshold, block=block)
    assert kept.tolist() == reference_nms(boxes, scores.tolist(), threshold)


def _prediction(boxes, nc: int, seed: int, objectness: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xyxy = np.asarray(boxes, dtype=np.float32)
    xywh = np.concatenate(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1)
    scores = rng.random((len(boxes), nc + objectness)).astype(np.float32)
    return np.concatenate((xywh, scores), 1)


def _assert_same_detections(actual: torch.Tensor, expected: list[tuple]) -> None:
    assert len(actual) == len(expected)
    for row, (box, score, cls) in zip(actual.tolist(), expected):
        assert row[:4] == pytest.approx(box) and row[4] == pytest.approx(score, rel=1e-6)
        assert row[5] == cls


@settings(max_examples=100, deadline=None)
@given(images=st.lists(grid_boxes(30), min_size=1, max_size=3), nc=st.integers(1, 4),
       conf=st.sampled_from([0.001, 0.25, 0.5]), iou=st.sampled_from([0.45, 0.6]),
       max_det=st.sampled_from([5, 300]), objectness=st.booleans(), seed=st.integers(0, 10**6))
def test_non_max_suppression_matches_reference(images, nc, conf, iou, max_det, objectness, seed):
    n = max(len(b) for b in images)
    padded = [b + [(0, 0, 1, 1)] * (n - len(b)) for b in images]  # filler rows, scores 0 below
    rows = np.stack([_prediction(b, nc, seed + i, objectness) for i, b in enumerate(padded)])
    for i, b in enumerate(images):
        rows[i, len(b):, 4:] = 0.0
    prediction = torch.from_numpy(rows)
    if not objectness:
        prediction = prediction.transpose(1, 2)  # YOLOv8 layout: B x (4 + nc) x N
        layout = "anchor_free"
    else:
        layout = "anchors"
    results = non_max_suppression(prediction, conf, iou, layout=layout, max_det=max_det)
    assert len(results) == len(images)
    for image_rows, result in zip(rows, results):
        _assert_same_detections(result, reference_yolo_nms(image_rows, objectness, conf, iou, max_det))


def test_auto_layout_recognises_both_heads():
    anchors = torch.zeros(2, 500, 85)
    anchors[0, 0] = torch.tensor([50.0, 50, 20, 20, 0.9] + [0.0] * 79 + [0.8])
    anchor_free = torch.zeros(2, 84, 500)
    anchor_free[0, :, 0] = torch.tensor([50.0, 50, 20, 20] + [0.0] * 79 + [0.72])
    for prediction in (anchors, anchor_free):
        result = non_max_suppression(prediction, 0.25, 0.6)
        assert [len(r) for r in result] == [1, 0]
        assert result[0].tolist() == [pytest.approx([40, 40, 60, 60, 0.72, 79])]


def test_classes_do_not_suppress_each_other_but_agnostic_does():
    # one box scored high for two classes: kept once per class unless NMS ignores classes
    prediction = torch.tensor([[[50.0, 50, 20, 20, 1.0, 0.9, 0.8], [51, 50, 20, 20, 1.0, 0.7, 0.1]]])

    def classes(**options):
        return non_max_suppression(prediction, 0.05, 0.6, layout="anchors", **options)[0][:, 5]

    assert classes().tolist() == [0, 1]
    assert classes(agnostic=True).tolist() == [0]
    assert classes(multi_label=False).tolist() == [0]


def test_empty_and_invalid_inputs():
    assert [len(r) for r in non_max_suppression(torch.zeros(3, 100, 7))] == [0, 0, 0]
    with pytest.raises(ValueError, match="B x N x C"):
        non_max_suppression(torch.zeros(100, 7))
    with pytest.raises(ValueError, match="thresholds"):
        non_max_suppression(torch.zeros(1, 100, 7), conf_thres=2.0)
    with pytest.raises(ValueError, match="layout"):
        non_max_suppression(torch.zeros(1, 100, 7), layout="yolox")


def test_box_helpers():
    xyxy = xywh_to_xyxy(torch.tensor([[10.0, 20, 4, 6]]))
    assert xyxy.tolist() == [[8, 17, 12, 23]]
    iou = box_iou(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30]]))
    assert iou.tolist() == [[pytest.approx(1 / 3), 0.0]]


@pytest.mark.parametrize("max_keep", [1, 5, 130, 1000])
def test_max_keep_stops_early_with_the_same_first_boxes(max_keep):
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(600, 2, generator=g) * 500
    boxes = torch.cat((xy, xy + torch.rand(600, 2, generator=g) * 60 + 1), 1)
    scores = torch.rand(600, generator=g)
    full = nms(boxes, scores, 0.5, block=64)
    assert torch.equal(nms(boxes, scores, 0.5, block=64, max_keep=max_keep), full[:max_keep])


@pytest.mark.parametrize("objectness", [False, True])
def test_mask_coefficients_ride_along(objectness):
    # Three boxes of two classes, each row followed by nm = 3 coefficients that name the row.
    boxes = [(0, 0, 10, 10), (1, 0, 11, 10), (30, 30, 40, 40)]
    rows = torch.from_numpy(_prediction(boxes, nc=2, seed=0, objectness=objectness))
    coefs = torch.arange(3.0)[:, None] * 10 + torch.arange(3.0)
    with_coefs = torch.cat((rows, coefs), 1)[None]
    plain = rows[None]
    if not objectness:
        with_coefs, plain = with_coefs.transpose(1, 2), plain.transpose(1, 2)
    layout = "anchors" if objectness else "anchor_free"
    expected = non_max_suppression(plain, 0.05, 0.5, layout=layout)[0]
    got = non_max_suppression(with_coefs, 0.05, 0.5, layout=layout, nm=3)[0]
    assert got.shape == (len(expected), 9) and torch.equal(got[:, :6], expected)
    source = [[float(box[0]) for box in boxes].index(row[0].item()) for row in got]  # x1 names the box
    assert torch.equal(got[:, 6:], coefs[source])
    with pytest.raises(ValueError, match="nm = 3 leaves no class scores"):
        non_max_suppression(with_coefs[..., :6] if objectness else with_coefs[:, :6], 0.05, 0.5,
                            layout=layout, nm=3)
