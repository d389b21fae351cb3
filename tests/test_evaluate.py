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
