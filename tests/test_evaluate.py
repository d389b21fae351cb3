"""COCO ground truth, YOLOv5-style P/R, the evaluate() loop, and the real yolov5n figures."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from test_data import make_dataset
from yoloq.tools.coco_eval import (Metrics, ground_truth_dict, ground_truth_json,
                                   match_predictions, precision_recall)
from yoloq.tools.bootstrap import map_difference
from yoloq.tools.data import YoloDataset
from yoloq.tools.evaluate import add_eval_arguments, evaluate, format_metrics, main_eval


class Oracle(nn.Module):
    """Returns the labels of the images it will be shown, placed as letterbox places them.

    It computes the placement on its own (resize long side to imgsz rounding up, centre in the
    batch shape), so a wrong letterbox or a wrong mapping back shows up as a lost mAP.
    """

    def __init__(self, dataset: YoloDataset, anchor_free: bool = False, as_tuple: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.queue = list(dataset.records)
        self.imgsz, self.nc = dataset.imgsz, len(dataset.names)
        self.anchor_free, self.as_tuple = anchor_free, as_tuple

    def _rows(self, record, shape) -> torch.Tensor:
        gain = self.imgsz / max(record.width, record.height)
        width, height = math.ceil(record.width * gain), math.ceil(record.height * gain)
        left, top = (shape[1] - width) / 2, (shape[0] - height) / 2
        rows = torch.zeros(100, 5 + self.nc)
        for k, (cls, xc, yc, w, h) in enumerate(record.labels.tolist()):
            rows[k, :5] = torch.tensor([xc * width + left, yc * height + top, w * width, h * height, 1])
            rows[k, 5 + int(cls)] = 0.9
        return rows

    def forward(self, images: torch.Tensor):
        records, self.queue = self.queue[:len(images)], self.queue[len(images):]
        rows = torch.stack([self._rows(r, images.shape[2:]) for r in records])
        if self.anchor_free:  # YOLOv8: B x (4 + nc) x N, no objectness
            rows = torch.cat((rows[..., :4], rows[..., 5:]), 2).transpose(1, 2)
        return (rows, ["raw"]) if self.as_tuple else rows


@pytest.fixture
def yaml_file(tmp_path):
    return make_dataset(tmp_path / "ds")


@pytest.mark.parametrize("batch, rect, anchor_free, as_tuple", [
    (1, True, False, True), (2, True, True, False), (4, False, False, False)])
def test_oracle_scores_perfectly(yaml_file, tmp_path, batch, rect, anchor_free, as_tuple):
    dataset = YoloDataset(yaml_file, imgsz=320, batch=batch, rect=rect)
    model = Oracle(dataset, anchor_free, as_tuple).train()
    metrics = evaluate(model, yaml_file, imgsz=320, batch=batch, cache_dir=tmp_path / "cache",
                       rect=rect)
    assert metrics.map50_95 == pytest.approx(1.0) and metrics.map50 == pytest.approx(1.0)
    assert metrics.precision == pytest.approx(1.0) and metrics.recall == pytest.approx(1.0)
    assert metrics.per_class == {"person": pytest.approx(1.0), "bicycle": pytest.approx(1.0),
                                 "car": pytest.approx(1.0)}
    assert model.training and not model.queue  # mode restored, every image seen once


def test_silent_model_scores_zero(yaml_file, tmp_path, capsys):
    class Silent(nn.Module):
        def forward(self, images):
            return torch.zeros(len(images), 100, 8)

    metrics = evaluate(Silent(), yaml_file, imgsz=320, cache_dir=tmp_path)
    assert metrics == Metrics(0.0, 0.0, 0.0, 0.0, {"person": 0.0, "bicycle": 0.0, "car": 0.0})
    assert capsys.readouterr().out == ""


def test_unusable_model_output_is_an_error(yaml_file, tmp_path):
    class Dict(nn.Module):
        def forward(self, images):
            return {"boxes": images}

    with pytest.raises(TypeError, match="returned dict"):
        evaluate(Dict(), yaml_file, imgsz=320, cache_dir=tmp_path)


def test_ground_truth_json_is_cached_by_label_content(yaml_file, tmp_path, monkeypatch):
    dataset = YoloDataset(yaml_file, imgsz=320)
    monkeypatch.setenv("YOLOQ_CACHE", str(tmp_path / "env"))  # read at call time
    path = ground_truth_json(dataset)
    assert path.parent == tmp_path / "env" / "coco_gt"
    gt = json.loads(path.read_text())
    assert len(gt["images"]) == 6 and len(gt["annotations"]) == 6 and len(gt["categories"]) == 3
    wide = next(im for im in gt["images"] if im["file_name"] == "wide.jpg")
    box = next(a for a in gt["annotations"] if a["image_id"] == wide["id"] and a["category_id"] == 0)
    assert box["bbox"] == pytest.approx([160, 120, 320, 240]) and box["area"] == pytest.approx(320 * 240)
    assert box["iscrowd"] == 0 and gt == ground_truth_dict(dataset)
    assert ground_truth_json(dataset, tmp_path / "explicit").parent == tmp_path / "explicit"
    (yaml_file.parent / "labels" / "val" / "wide.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    assert ground_truth_json(YoloDataset(yaml_file, imgsz=320)) != path


def test_matching_takes_each_label_and_detection_once():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float64)
    det = torch.tensor([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 9, 0.8, 0], [20, 20, 30, 30, 0.7, 1],
                        [20, 20, 30, 30, 0.6, 0]], dtype=torch.float64)
    correct = match_predictions(det, torch.tensor([0.0, 0.0]), gt_boxes)
    assert correct[:, 0].tolist() == [True, False, False, True]  # wrong class never matches
    assert correct[1].sum() == 0 and correct[0].all()


def test_precision_recall_at_best_f1():
    # one class, 4 labels; detections by confidence: TP, TP, FP, TP. F1 is best (0.75) when all
    # four are kept: P = R = 3/4, against P = 1, R = 1/2 (F1 0.67) when only the first two are.
    tp = np.array([[1], [1], [0], [1]], dtype=float).repeat(10, 1)
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    precision, recall, ap = precision_recall(tp, conf, np.zeros(4), np.zeros(4))
    assert precision == pytest.approx(0.75) and recall == pytest.approx(0.75)
    # YOLOv5's AP: envelope 1 up to R 1/2, 3/4 up to R 3/4, then a straight line to (1, 0):
    # 0.5 + 0.1875 + 0.09375 = 0.78125, sampled at 101 recall points.
    assert ap.shape == (1, 10) and ap[0, 0] == pytest.approx(0.78125, abs=0.002)


def test_format_metrics_lists_summary_and_classes():
    table = format_metrics(Metrics(0.25, 0.5, 0.6, 0.4, {"person": 0.3, "car": 0.2}))
    lines = table.splitlines()
    assert lines[1].split() == ["all", "0.600", "0.400", "0.500", "0.250"]
    assert lines[2].split() == ["person", "0.300"] and len(lines) == 4


def test_cli_arguments():
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", "m.pt", "--data", "d.yaml", "--imgsz", "320", "--batch", "8"])
    assert (args.imgsz, args.batch, args.conf, args.iou, args.square) == (320, 8, 0.001, 0.6, False)


# The official YOLOv5 val.py (v7.0) on yolov5n.pt, COCO128, 640, conf 0.001, iou 0.6, rect.
OFFICIAL = {1: (0.352, 0.552), 8: (0.350, 0.551)}


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8])
def test_yolov5n_coco128_matches_official_val(shared_data, tmp_path, batch):
    from yoloq.models.checkpoint import load

    model = load(shared_data / "weights" / "yolov5n.pt")
    metrics = evaluate(model, shared_data / "coco128" / "data.yaml", imgsz=640, batch=batch,
                       cache_dir=tmp_path)
    official_map, official_map50 = OFFICIAL[batch]
    assert metrics.map50_95 == pytest.approx(official_map, abs=0.01)
    assert metrics.map50 == pytest.approx(official_map50, abs=0.01)
    assert metrics.matches.map50_95() == pytest.approx(metrics.map50_95, abs=1e-12)  # bootstrap's re-derivation
    if batch == 1:  # official P 0.603, R 0.505
        assert metrics.precision == pytest.approx(0.603, abs=0.02)
        assert metrics.recall == pytest.approx(0.505, abs=0.02)
    assert len(metrics.per_class) == 71


@pytest.mark.slow
def test_cli_verb_prints_the_table(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOLOQ_CACHE", str(tmp_path))
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args([
        "--model", str(shared_data / "weights" / "yolov5n.pt"),
        "--data", str(shared_data / "coco128" / "data.yaml"), "--imgsz", "320", "--max-images", "8"])
    assert main_eval(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "all" and 0.0 < float(lines[1].split()[-1]) <= 1.0


# --- instance masks ------------------------------------------------------------------------------

class SegOracle(Oracle):
    """``Oracle`` for a segmentation head: one prototype per label at the input resolution (logit
    ±10 on pycocotools' own rasterisation of the placed polygon) and one-hot coefficients, in the
    output format of yoloq's YOLOv8-seg (``((pred, protos), raw)``) or YOLOv5-seg
    (``(pred, protos, raw)``). ``shift`` moves every mask right by that many input pixels."""

    def __init__(self, dataset: YoloDataset, anchor_free: bool = True, shift: int = 0):
        super().__init__(dataset, anchor_free)
        self.segments, self.shift = dataset.segments, shift
        self.nm = max(len(r.labels) for r in dataset.records)

    def _protos(self, record, shape) -> tuple[torch.Tensor, torch.Tensor]:
        from pycocotools import mask as mask_utils

        gain = self.imgsz / max(record.width, record.height)
        size = np.array([math.ceil(record.width * gain), math.ceil(record.height * gain)])
        corner = (np.array([shape[1], shape[0]]) - size) / 2
        coefs, protos = torch.zeros(100, self.nm), torch.full((self.nm, *shape), -10.0)
        for k, polygon in enumerate(self.segments[record.image]):
            placed = (polygon * size + corner).reshape(-1).tolist()
            rle = mask_utils.merge(mask_utils.frPyObjects([placed], int(shape[0]), int(shape[1])))
            protos[k][torch.from_numpy(mask_utils.decode(rle).astype(bool))] = 10.0
            coefs[k, k] = 1.0
        return coefs, protos.roll(self.shift, dims=2)

    def forward(self, images: torch.Tensor):
        records = self.queue[:len(images)]
        rows = super().forward(images)[0]
        coefs, protos = (torch.stack(x) for x in zip(*(self._protos(r, images.shape[2:]) for r in records)))
        if self.anchor_free:
            return (torch.cat((rows, coefs.transpose(1, 2)), 1), protos), ["raw"]
        return torch.cat((rows, coefs), 2), protos, ["raw"]


def _square(x0: float, y0: float, x1: float, y1: float, cls: int) -> str:
    return f"{cls} {x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1}"


POLYGONS = {
    "wide.jpg": ("RGB", 640, 480, [_square(0.25, 0.25, 0.75, 0.75, 0),
                                   "1 0.1 0.15 0.4 0.15 0.25 0.35"]),  # a triangle
    "tall.png": ("L", 300, 500, ["2 0.2 0.15 0.8 0.15 0.8 0.65 0.5 0.4 0.2 0.65"]),  # concave
    "background.jpg": ("RGB", 320, 240, None),
}


@pytest.fixture
def polygon_yaml(tmp_path):
    return make_dataset(tmp_path / "seg", POLYGONS)


def test_polygon_ground_truth_has_masks(polygon_yaml, tmp_path):
    dataset = YoloDataset(polygon_yaml, imgsz=320, segments=True)
    gt = ground_truth_dict(dataset)
    wide = next(im for im in gt["images"] if im["file_name"] == "wide.jpg")
    square = next(a for a in gt["annotations"] if a["image_id"] == wide["id"] and a["category_id"] == 0)
    assert square["bbox"] == pytest.approx([160, 120, 320, 240])
    assert square["segmentation"] == [pytest.approx([160, 120, 480, 120, 480, 360, 160, 360])]
    assert square["area"] == pytest.approx(320 * 240)  # the polygon's area
    triangle = next(a for a in gt["annotations"] if a["category_id"] == 1)
    assert triangle["area"] == pytest.approx(0.5 * 0.3 * 640 * 0.2 * 480)
    boxes_only = YoloDataset(make_dataset(tmp_path / "det"), imgsz=320)
    assert all("segmentation" not in a for a in ground_truth_dict(boxes_only)["annotations"])


@pytest.mark.parametrize("batch, rect, anchor_free", [(1, True, True), (2, True, False), (2, False, True)])
def test_mask_oracle_scores_perfectly(polygon_yaml, tmp_path, batch, rect, anchor_free):
    dataset = YoloDataset(polygon_yaml, imgsz=320, batch=batch, rect=rect, segments=True)
    metrics = evaluate(SegOracle(dataset, anchor_free), polygon_yaml, imgsz=320, batch=batch,
                       cache_dir=tmp_path / "cache", rect=rect)
    assert metrics.map50_95 == pytest.approx(1.0) and metrics.map50 == pytest.approx(1.0)
    assert metrics.mask_map50_95 == pytest.approx(1.0) and metrics.mask_map50 == pytest.approx(1.0)


def test_shifted_masks_lose_mask_map_only(polygon_yaml, tmp_path):
    dataset = YoloDataset(polygon_yaml, imgsz=320, segments=True)
    metrics = evaluate(SegOracle(dataset, shift=12), polygon_yaml, imgsz=320, cache_dir=tmp_path)
    assert metrics.map50_95 == pytest.approx(1.0)
    assert 0.0 < metrics.mask_map50_95 < 0.9 and metrics.mask_map50 == pytest.approx(1.0)
    # the bootstrap's mask tables re-derive pycocotools' segm mAP and see the loss in masks alone
    assert metrics.mask_matches.map50_95() == pytest.approx(metrics.mask_map50_95, abs=1e-12)
    exact = evaluate(SegOracle(YoloDataset(polygon_yaml, imgsz=320, segments=True)), polygon_yaml, imgsz=320,
                     cache_dir=tmp_path)
    assert map_difference(exact, metrics, resamples=50).delta == pytest.approx(0.0, abs=1e-9)
    masks = map_difference(exact, metrics, resamples=50, masks=True)
    assert masks.delta == pytest.approx(100 * (metrics.mask_map50_95 - 1.0)) and masks.high <= 0
    with pytest.raises(ValueError, match="no mask matches"):
        map_difference(exact, evaluate(Oracle(dataset), polygon_yaml, imgsz=320, cache_dir=tmp_path), masks=True)


def test_masks_need_polygon_labels(yaml_file, tmp_path):
    class BoxesWithProtos(Oracle):  # a segmentation model on a detection dataset
        def forward(self, images):
            rows = torch.cat((super().forward(images)[0], torch.zeros(len(images), 100, 2)), 2)
            return rows, torch.zeros(len(images), 2, *images.shape[2:]), ["raw"]

    dataset = YoloDataset(yaml_file, imgsz=320)
    metrics = evaluate(BoxesWithProtos(dataset), yaml_file, imgsz=320, cache_dir=tmp_path)
    assert metrics.map50_95 == pytest.approx(1.0) and metrics.mask_map50_95 is None


def test_predicted_masks_resample_crop_and_unletterbox():
    from yoloq.tools.data import Letterbox
    from yoloq.tools.mask_eval import predicted_masks

    # Prototypes at stride 4 over a 32 × 32 input: channel 0 is +1 on prototype columns 2 and 3
    # and −1 elsewhere, so its bilinear logit crosses 0 at input x = 8 and 16; channel 1 likewise
    # on rows.
    protos = -torch.ones(2, 8, 8)
    protos[0, :, 2:4] = 1.0
    protos[1, 2:4, :] = 1.0
    columns, rows = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    whole, left = torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([[0.0, 0.0, 12.0, 32.0]])
    identity = Letterbox((32, 32), 1.0, (0.0, 0.0))
    band = torch.zeros(32, 32, dtype=torch.bool)
    band[:, 8:16] = True  # pixel centres 8.5 … 15.5
    assert torch.equal(predicted_masks(columns, protos, whole, identity, (32, 32))[0], band)
    cropped = predicted_masks(columns, protos, left, identity, (32, 32))[0]
    assert torch.equal(cropped, band & (torch.arange(32) < 12))  # centres up to 11.5 ≤ 12
    # A 32 × 16 original padded by 8 rows above and below: its rows 0–7 are input rows 8–15.
    padded = Letterbox((16, 32), 1.0, (0.0, 8.0))
    assert predicted_masks(rows, protos, whole, padded, (32, 32))[0, :8].all()
    assert not predicted_masks(rows, protos, whole, padded, (32, 32))[0, 8:].any()
    # A 16 × 16 original enlarged twice: its pixel centre u + ½ sits at input 2u + 1, so u ∈ 4 … 7.
    half = Letterbox((16, 16), 2.0, (0.0, 0.0))
    assert predicted_masks(columns, protos, whole / 2, half, (32, 32))[0, 0].nonzero().flatten().tolist() == [4, 5, 6, 7]


def test_format_metrics_shows_mask_maps():
    table = format_metrics(Metrics(0.25, 0.5, 0.6, 0.4, {"person": 0.3}, 0.2, 0.45))
    assert table.splitlines()[0].split()[-2:] == ["mask50", "mask50-95"]
    assert table.splitlines()[1].split() == ["all", "0.600", "0.400", "0.500", "0.250", "0.450", "0.200"]


def test_coco128_seg_oracle_scores_perfectly(shared_data, tmp_path):
    yaml_path = shared_data / "coco128-seg" / "data.yaml"
    if not yaml_path.is_file():
        pytest.skip(f"{yaml_path} not found")
    dataset = YoloDataset(yaml_path, imgsz=640, batch=2, max_images=4, segments=True)
    metrics = evaluate(SegOracle(dataset), yaml_path, imgsz=640, batch=2, max_images=4, cache_dir=tmp_path)
    assert metrics.map50_95 == pytest.approx(1.0) and metrics.map50 == pytest.approx(1.0)
    assert metrics.mask_map50_95 == pytest.approx(1.0, abs=0.02) and metrics.mask_map50 == pytest.approx(1.0)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["yolov8n-seg", "yolov5n-seg"])
def test_random_segmentation_model_runs_end_to_end(shared_data, tmp_path, name):
    from yoloq.models.zoo import BUILDERS

    yaml_path = shared_data / "coco128-seg" / "data.yaml"
    if not yaml_path.is_file():
        pytest.skip(f"{yaml_path} not found")
    torch.manual_seed(0)
    # The initial class priors are ~1e-5: a conf of 1e-6 keeps 300 detections (and masks) per image.
    metrics = evaluate(BUILDERS[name](), yaml_path, imgsz=320, max_images=4, conf=1e-6, cache_dir=tmp_path)
    values = (metrics.map50_95, metrics.map50, metrics.mask_map50_95, metrics.mask_map50)
    assert all(v is not None and math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
