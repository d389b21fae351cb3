"""How sure is a difference in mAP? A paired bootstrap over the evaluation images.

COCO128 has 128 images; a perturbation far below one quantization step moves its mAP50-95 by a few
tenths of a point, so "model B is 0.4 below model A" means little without an interval. Both
models' detections are scored once by pycocotools (``coco_eval.MatchTable`` keeps its per-image,
per-category matches); each bootstrap round then draws the images with replacement, the *same*
draw for both models, and recomputes both mAPs with pycocotools' ``accumulate`` (101 recall
points, area all, 100 detections per image) on the drawn images, an image drawn k times counting
k times. The interval is the percentile interval of the rounds' differences.

Re-scoring a draw reuses the matches: COCO matches detections to labels within one image and one
category, so a draw changes only which matches are pooled. An image drawn k times enters the
pooled precision-recall curve with weight k (a weighted cumulative sum), which gives
pycocotools' curve on k copies except for the order of exactly tied scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # pycocotools' recThrs


@dataclass(frozen=True)
class CategoryMatches:
    """One category's detections over all images, sorted by score (descending, stable)."""

    image: np.ndarray  # (D,) image index of each detection
    score: np.ndarray  # (D,) its confidence, descending
    true_positive: np.ndarray  # (T, D) 1.0 where matched to a label at IoU threshold t
    false_positive: np.ndarray  # (T, D) 1.0 where unmatched (matches to ignored labels: neither)
    labels: np.ndarray  # (I,) labels that count, per image

    @classmethod
    def without_detections(cls, labels: np.ndarray, thresholds: int) -> "CategoryMatches":
        empty = np.zeros((thresholds, 0))
        return cls(np.zeros(0, np.int64), np.zeros(0), empty, empty, labels)


@dataclass(frozen=True)
class MatchTable:
    """pycocotools' per-image matches of one evaluation (box, area all, 100 detections)."""

    image_ids: tuple[int, ...]
    categories: tuple[CategoryMatches, ...]
    thresholds: int  # IoU thresholds (10: 0.5:0.95)

    @classmethod
    def from_cocoeval(cls, coco_eval) -> "MatchTable":
        """Read ``COCOeval.evalImgs`` after ``evaluate()`` (area range 'all' is the first)."""
        params = coco_eval.params
        image_ids = tuple(params.imgIds)
        n_images, n_areas, max_det = len(image_ids), len(params.areaRng), params.maxDets[-1]
        thresholds = len(params.iouThrs)
        categories = []
        for k in range(len(params.catIds)):
            scores, image, matched, ignored = [], [], [], []
            labels = np.zeros(n_images, dtype=np.int64)
            for i in range(n_images):
                e = coco_eval.evalImgs[(k * n_areas) * n_images + i]
                if e is None:
                    continue
                labels[i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
                d = np.asarray(e["dtScores"][:max_det], dtype=np.float64)
                scores.append(d)
                image.append(np.full(len(d), i, dtype=np.int64))
                matched.append(np.asarray(e["dtMatches"])[:, :max_det] != 0)
                ignored.append(np.asarray(e["dtIgnore"], dtype=bool)[:, :max_det])
            if scores:
                score = np.concatenate(scores)
                order = np.argsort(-score, kind="mergesort")
                hit, counted = np.concatenate(matched, 1)[:, order], ~np.concatenate(ignored, 1)[:, order]
                categories.append(CategoryMatches(np.concatenate(image)[order], score[order],
                                                  (hit & counted).astype(float), (~hit & counted).astype(float),
                                                  labels))
            else:
                categories.append(CategoryMatches.without_detections(labels, thresholds))
        return cls(image_ids, tuple(categories), thresholds)

    @classmethod
    def without_detections(cls, image_ids: tuple[int, ...], labels: np.ndarray, thresholds: int) -> "MatchTable":
        """The table of a model that detected nothing; ``labels`` is (categories, images)."""
        return cls(image_ids, tuple(CategoryMatches.without_detections(row, thresholds) for row in labels), thresholds)

    def map50_95(self, counts: np.ndarray | None = None) -> float:
        """mAP50-95 with image i counted ``counts[i]`` times (default: each once), as
        pycocotools' ``accumulate`` + ``summarize`` computes it: the mean of the interpolated
        precision over categories with labels, IoU thresholds and 101 recall points."""
        counts = np.ones(len(self.image_ids), np.int64) if counts is None else np.asarray(counts)
        precisions = []
        for category in self.categories:
            n_labels = int(category.labels @ counts)
            if n_labels == 0:
                continue  # pycocotools leaves -1 there, outside the mean
            weight = counts[category.image].astype(np.float64)
            tp = np.cumsum(category.true_positive * weight, axis=1)
            fp = np.cumsum(category.false_positive * weight, axis=1)
            precisions.append(_interpolated_precision(tp, fp, n_labels))
        return float(np.mean(np.concatenate(precisions))) if precisions else -1.0


def _interpolated_precision(tp: np.ndarray, fp: np.ndarray, n_labels: int) -> np.ndarray:
    """(T, 101) precision at the recall points, one row per IoU threshold, from (T, D)
    cumulative true and false positives of one category's detections in score order."""
    thresholds, n = tp.shape
    q = np.zeros((thresholds, len(RECALL_POINTS)))
    if n == 0:
        return q
    precision = tp / (fp + tp + np.spacing(1))
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    recall = tp / n_labels
    local = np.stack([np.searchsorted(recall[t], RECALL_POINTS, side="left") for t in range(thresholds)])
    valid = local < n  # past the last recall: no precision there (0)
    rows = np.broadcast_to(np.arange(thresholds)[:, None], local.shape)
    q[valid] = envelope[rows[valid], local[valid]]
    return q


@dataclass(frozen=True)
class MapDifference:
    """``b - a`` in mAP50-95 points (×100) and its bootstrap interval at ``level``."""

    a: float
    b: float
    delta: float
    low: float
    high: float
    level: float
    resamples: int

    def __str__(self) -> str:
        return (f"{self.delta:+.2f} points ({self.level:.0%} interval {self.low:+.2f} .. {self.high:+.2f}, "
                f"{self.resamples} paired resamples of the images)")


def map_difference(a, b, resamples: int = 1000, seed: int = 0, level: float = 0.95, *,
                   masks: bool = False) -> MapDifference:
    """Paired bootstrap of ``b``'s mAP50-95 minus ``a``'s, both ``Metrics`` (or ``MatchTable``)
    of the same images; figures in points (×100). ``masks``: the mask mAP of segmentation models."""
    table_a, table_b = _table(a, "a", masks), _table(b, "b", masks)
    if table_a.image_ids != table_b.image_ids:
        raise ValueError(f"the two evaluations scored different images ({len(table_a.image_ids)} vs "
                         f"{len(table_b.image_ids)}, or another set): pair evaluations of one dataset")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    n = len(table_a.image_ids)
    deltas = np.empty(resamples)
    for r in range(resamples):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        deltas[r] = table_b.map50_95(counts) - table_a.map50_95(counts)
    full_a, full_b = table_a.map50_95(), table_b.map50_95()
    low, high = np.quantile(deltas, [(1 - level) / 2, (1 + level) / 2])
    return MapDifference(100 * full_a, 100 * full_b, 100 * (full_b - full_a), 100 * float(low),
                         100 * float(high), level, resamples)


def _table(metrics, name: str, masks: bool) -> MatchTable:
    table = metrics if isinstance(metrics, MatchTable) else getattr(metrics, "mask_matches" if masks else "matches",
                                                                    None)
    if table is None:
        what = "mask matches (a segmentation model scored on polygon labels)" if masks else "per-image matches"
        raise ValueError(f"{name} carries no {what}: pass the Metrics that yoloq.evaluate returned, or a MatchTable")
    return table
