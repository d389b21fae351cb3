"""COCO-style evaluation of detections (and instance masks) on a YOLO-format dataset.

mAP comes from pycocotools' COCOeval (bbox, and segm when the labels are polygons and the model
predicts masks) against a ground-truth JSON converted once from the dataset's label files and
cached under a name that hashes them. Precision and recall come from
YOLOv5's own matching (``val.py`` ``process_batch`` + ``metrics.ap_per_class``): predictions
matched to labels at IoU 0.5, then P and R per class at the confidence where the mean F1 over
classes is highest, averaged over the classes that have labels. pycocotools reports no such
single operating point, and these are the P and R that YOLO users compare.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from yoloq.tools.bootstrap import MatchTable
from yoloq.tools.data import YoloDataset
from yoloq.tools.mask_eval import polygon_annotation
from yoloq.tools.nms import box_iou, xywh_to_xyxy

IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)


@dataclass(frozen=True)
class Metrics:
    """Detection accuracy; ``per_class`` maps each class present in the labels to its box AP50-95.

    The mask mAPs are those of a segmentation model on polygon labels, None otherwise.
    ``matches`` and ``mask_matches`` hold pycocotools' per-image box and mask matches, which
    ``bootstrap.map_difference`` resamples.
    """

    map50_95: float
    map50: float
    precision: float
    recall: float
    per_class: dict[str, float]
    mask_map50_95: float | None = None
    mask_map50: float | None = None
    matches: MatchTable | None = field(default=None, compare=False, repr=False)
    mask_matches: MatchTable | None = field(default=None, compare=False, repr=False)


def default_cache_dir() -> Path:
    """``$YOLOQ_CACHE/coco_gt`` if set (read now, not at import), else ~/.cache/yoloq/coco_gt."""
    root = os.environ.get("YOLOQ_CACHE") or Path.home() / ".cache" / "yoloq"
    return Path(root) / "coco_gt"


def ground_truth_dict(dataset: YoloDataset) -> dict:
    """The dataset's labels as a COCO ground-truth dict: pixel xywh boxes, ids = filename order.

    With polygon labels each annotation also carries its polygon, and its area is the polygon's
    (COCO's convention) rather than the box's.
    """
    images, annotations = [], []
    for record in sorted(dataset.records, key=lambda r: dataset.image_ids[r.image]):
        image_id = dataset.image_ids[record.image]
        images.append({"id": image_id, "file_name": record.image.name,
                       "width": record.width, "height": record.height})
        polygons = dataset.segments[record.image] if dataset.segments is not None else None
        for k, (cls, xc, yc, w, h) in enumerate(record.labels.tolist()):
            box = [(xc - w / 2) * record.width, (yc - h / 2) * record.height,
                   w * record.width, h * record.height]
            annotation = {"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": int(cls), "bbox": box, "area": box[2] * box[3],
                          "iscrowd": 0}
            if polygons is not None:
                annotation["segmentation"], annotation["area"] = polygon_annotation(
                    polygons[k], record.width, record.height)
            annotations.append(annotation)
    categories = [{"id": i, "name": name} for i, name in enumerate(dataset.names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _labels_hash(dataset: YoloDataset) -> str:
    digest = hashlib.sha256(json.dumps(dataset.names).encode())
    if dataset.segments is not None:  # the same files make a different JSON read as polygons
        digest.update(b"polygons")
    for record in sorted(dataset.records, key=lambda r: dataset.image_ids[r.image]):
        digest.update(f"{record.image.name}:{record.width}x{record.height}:".encode())
        digest.update(record.label_file.read_bytes() if record.has_label_file else b"-")
    return digest.hexdigest()[:20]


def ground_truth_json(dataset: YoloDataset, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached COCO ground-truth JSON of the dataset, written on first use."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{_labels_hash(dataset)}.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: readers never see half a file
        partial.write_text(json.dumps(ground_truth_dict(dataset)))
        os.replace(partial, path)
    return path


def match_predictions(det: torch.Tensor, gt_cls: torch.Tensor, gt_boxes: torch.Tensor,
                      iouv: torch.Tensor = IOU_THRESHOLDS) -> torch.Tensor:
    """(n, len(iouv)) bool: whether each detection ``xyxy conf cls`` is a true positive.

    YOLOv5's ``process_batch``: per IoU threshold, same-class pairs above it are taken greedily by
    IoU, each label and each detection at most once.
    """
    correct = np.zeros((len(det), len(iouv)), dtype=bool)
    if len(det) == 0 or len(gt_cls) == 0:
        return torch.from_numpy(correct)
    iou = box_iou(gt_boxes, det[:, :4])
    same_class = gt_cls[:, None] == det[:, 5]
    for t, threshold in enumerate(iouv.tolist()):
        gt_i, det_i = torch.where((iou >= threshold) & same_class)
        if len(gt_i) == 0:
            continue
        matches = torch.stack((gt_i, det_i, iou[gt_i, det_i]), 1).numpy().astype(np.float64)
        if len(matches) > 1:
            matches = matches[matches[:, 2].argsort()[::-1]]
            matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
            matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
        correct[matches[:, 1].astype(int), t] = True
    return torch.from_numpy(correct)


def _smooth(y: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    width = round(len(y) * fraction * 2) // 2 + 1  # box filter of an odd number of points
    ones = np.ones(width // 2)
    padded = np.concatenate((ones * y[0], y, ones * y[-1]))
    return np.convolve(padded, np.ones(width) / width, mode="valid")


def precision_recall(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray,
                     target_cls: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean P and R at the max-F1 confidence (YOLOv5's ``ap_per_class``), and per-class AP.

    ``tp`` is (n, 10) over IoU 0.5:0.95; the returned AP array is (classes with labels, 10) with
    YOLOv5's 101-point interpolation, kept for comparison with its figures.
    """
    order = np.argsort(-conf)
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    classes, counts = np.unique(target_cls, return_counts=True)
    grid = np.linspace(0, 1, 1000)
    p, r = np.zeros((len(classes), 1000)), np.zeros((len(classes), 1000))
    ap = np.zeros((len(classes), tp.shape[1]))
    for k, (cls, n_labels) in enumerate(zip(classes, counts)):
        mine = pred_cls == cls
        if not mine.any():
            continue
        tpc, fpc = tp[mine].cumsum(0), (1 - tp[mine]).cumsum(0)
        recall, precision = tpc / (n_labels + 1e-16), tpc / (tpc + fpc)
        r[k] = np.interp(-grid, -conf[mine], recall[:, 0], left=0)
        p[k] = np.interp(-grid, -conf[mine], precision[:, 0], left=1)
        for t in range(tp.shape[1]):
            envelope = np.concatenate(([1.0], precision[:, t], [0.0]))
            envelope = np.flip(np.maximum.accumulate(np.flip(envelope)))
            steps = np.concatenate(([0.0], recall[:, t], [1.0]))
            x = np.linspace(0, 1, 101)
            ap[k, t] = np.trapezoid(np.interp(x, steps, envelope), x)
    if not len(classes):
        return 0.0, 0.0, ap
    f1 = 2 * p * r / (p + r + 1e-16)
    best = _smooth(f1.mean(0), 0.1).argmax()
    return float(p[:, best].mean()), float(r[:, best].mean()), ap


class CocoEvaluator:
    """Collects detections image by image, then scores them with pycocotools."""

    def __init__(self, dataset: YoloDataset, cache_dir: str | os.PathLike | None = None):
        self.dataset = dataset
        self.cache_dir = cache_dir
        self._coco_rows: list[np.ndarray] = []
        self._stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._target_cls: list[np.ndarray] = []
        self._mask_results: list[dict] | None = None  # None until an update brings masks

    def update(self, record, det: torch.Tensor, masks: list[dict] | None = None) -> None:
        """Add one image's detections, (n, 6) ``x1 y1 x2 y2 conf cls`` in original pixels, and
        optionally their masks as COCO run-length encodings (``mask_eval.encode_masks``)."""
        det = det[:, :6].detach().to("cpu", torch.float64)
        labels = torch.from_numpy(record.labels)
        scale = torch.tensor([record.width, record.height] * 2, dtype=torch.float64)
        gt_boxes = xywh_to_xyxy(labels[:, 1:5]) * scale
        correct = match_predictions(det, labels[:, 0], gt_boxes)
        self._stats.append((correct, det[:, 4], det[:, 5]))
        self._target_cls.append(record.labels[:, 0])
        image_id = self.dataset.image_ids[record.image]
        xywh = torch.cat((det[:, :2], det[:, 2:4] - det[:, :2]), 1).numpy()
        ids = np.full((len(det), 1), image_id, dtype=np.float64)
        self._coco_rows.append(np.concatenate((ids, xywh, det[:, 4:6].numpy()), 1))
        if masks is not None:
            if len(masks) != len(det):
                raise ValueError(f"{len(masks)} masks for {len(det)} detections")
            self._mask_results = self._mask_results if self._mask_results is not None else []
            self._mask_results += [
                {"image_id": image_id, "segmentation": rle, "score": float(conf), "category_id": int(cls)}
                for rle, conf, cls in zip(masks, det[:, 4].tolist(), det[:, 5].tolist())]

    def yolo_statistics(self) -> tuple[float, float, np.ndarray]:
        """YOLOv5-style (P, R, per-class AP over IoU 0.5:0.95) of the box detections so far."""
        tp, conf, cls = (torch.cat(x).numpy() for x in zip(*self._stats))
        return precision_recall(tp.astype(np.float64), conf, cls, np.concatenate(self._target_cls))

    def compute(self) -> Metrics:
        """Score everything added so far; pycocotools' own printing is swallowed.

        Mask mAPs are computed when updates brought masks and the labels are polygons.
        """
        precision, recall, _ = self.yolo_statistics()
        rows = np.concatenate(self._coco_rows)
        with_masks = self._mask_results is not None and self.dataset.segments is not None
        if len(rows) == 0:
            mask = 0.0 if with_masks else None
            nothing = self._matches_without_detections()
            return Metrics(0.0, 0.0, precision, recall, self._present_classes(None), mask, mask,
                           nothing, nothing if with_masks else None)
        boxes = [{"image_id": int(r[0]), "bbox": r[1:5].tolist(), "score": float(r[5]),
                  "category_id": int(r[6])} for r in rows]
        stats, per_class_precision, matches = self._coco_eval(boxes, "bbox")
        mask_map50_95 = mask_map50 = mask_matches = None
        if with_masks and self._mask_results:
            mask_stats, _, mask_matches = self._coco_eval(self._mask_results, "segm")
            mask_map50_95, mask_map50 = mask_stats[:2]
        elif with_masks:
            mask_map50_95, mask_map50, mask_matches = 0.0, 0.0, self._matches_without_detections()
        return Metrics(stats[0], stats[1], precision, recall, self._present_classes(per_class_precision),
                       mask_map50_95, mask_map50, matches, mask_matches)

    def _coco_eval(self, results: list[dict], iou_type: str) -> tuple[list[float], np.ndarray, MatchTable]:
        """pycocotools' (mAP50-95, mAP50, ...), (T, R, K) precision at area all, 100 detections,
        and its per-image matches."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(ground_truth_json(self.dataset, self.cache_dir)))
            coco_eval = COCOeval(gt, gt.loadRes(results), iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return ([float(v) for v in coco_eval.stats], coco_eval.eval["precision"][:, :, :, 0, -1],
                MatchTable.from_cocoeval(coco_eval))

    def _matches_without_detections(self) -> MatchTable:
        """The match table pycocotools would give a model that detected nothing: labels only."""
        ids = sorted(self.dataset.image_ids[r.image] for r in self.dataset.records)
        column = {image_id: i for i, image_id in enumerate(ids)}
        labels = np.zeros((len(self.dataset.names), len(ids)), dtype=np.int64)
        for record in self.dataset.records:
            np.add.at(labels, (record.labels[:, 0].astype(int), column[self.dataset.image_ids[record.image]]), 1)
        return MatchTable.without_detections(tuple(ids), labels, len(IOU_THRESHOLDS))

    def _present_classes(self, precision: np.ndarray | None) -> dict[str, float]:
        present = np.unique(np.concatenate(self._target_cls)).astype(int)
        result = {}
        for cls in present.tolist():
            values = precision[:, :, cls] if precision is not None else np.zeros(1)
            values = values[values > -1]
            result[self.dataset.names[cls]] = float(values.mean()) if values.size else 0.0
        return result
