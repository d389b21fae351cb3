"""The training split of a YOLO dataset, augmented, deterministic, and sharded across ranks.

A sample is a pure function of ``(seed, epoch, index)``: its randomness is drawn from
``numpy.random.default_rng((seed, epoch, index))`` alone, so it does not depend on worker threads,
on the order samples are asked for, or on what ran before; a resumed run sees the same data. The
shuffled order of an epoch is ``default_rng((seed, epoch)).permutation(n)``.

With augmentation a sample is either a mosaic (probability ``AugmentConfig.mosaic`` when the
dataset has ``mosaic=True``: the image and three random others, see ``augment.mosaic4``) or one
letterboxed image through ``augment.random_affine``; then HSV jitter and a horizontal flip.
Without it, a sample is the image letterboxed to ``imgsz x imgsz``.

Segmentation labels (``segments=True``) are polygon lines ``cls x1 y1 x2 y2 ...`` (normalised);
each polygon's box is its extent, and the polygons travel through every augmentation.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from yoloq.tools.augment import (hsv_jitter, horizontal_flip, letterbox_square, mosaic4,
                                 random_affine)
from yoloq.tools.data import (DatasetError, ImageRecord, _image_size, label_path_for, numbered_lines,
                              list_images, load_data_config, read_resized, scan_images)

_PREFETCH_BATCHES = 2  # batches decoded ahead of the consumer: enough to hide decode latency
# Inclusive ranges; scale stays below 1 so the affine gain 1 - scale never reaches 0.
_AUGMENT_RANGES = {"hsv_h": (0.0, 0.5), "hsv_s": (0.0, 1.0), "hsv_v": (0.0, 1.0),
                   "degrees": (0.0, 180.0), "translate": (0.0, 0.5), "scale": (0.0, 0.99),
                   "fliplr": (0.0, 1.0), "mosaic": (0.0, 1.0)}


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths (YOLOv5 ``hyp`` names); every field is checked against its range.

    ``mosaic`` is the probability that a sample of a ``mosaic=True`` dataset is a mosaic.
    """

    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    fliplr: float = 0.5
    mosaic: float = 1.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            low, high = _AUGMENT_RANGES[field.name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"AugmentConfig.{field.name} must be a number, got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"AugmentConfig.{field.name} = {value!r} is not in [{low}, {high}]")

    @classmethod
    def from_dict(cls, values: dict) -> AugmentConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"AugmentConfig has no field(s) {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_polygon_file(path: Path, nc: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Polygons of one label file: (n, 5) ``cls xc yc w h`` boxes (extents) and n (k, 2) arrays."""
    boxes, polygons = [], []
    for number, values in numbered_lines(path):
        if len(values) < 7 or len(values) % 2 == 0:
            raise DatasetError(f"{path}:{number}: expected 'cls x1 y1 x2 y2 x3 y3 ...' (a class "
                               f"and at least 3 points), got {len(values)} values")
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < nc:
            raise DatasetError(f"{path}:{number}: class id {cls:g} is not in 0..{nc - 1}")
        points = np.asarray(values[1:], dtype=np.float64).reshape(-1, 2)
        if points.min() < 0.0 or points.max() > 1.0:
            raise DatasetError(f"{path}:{number}: coordinates must be normalised to [0, 1]")
        low, high = points.min(axis=0), points.max(axis=0)
        boxes.append([cls, *(low + high) / 2, *(high - low)])
        polygons.append(points)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 5), polygons


def scan_polygons(images: list[Path], nc: int) -> tuple[list[ImageRecord], list[list[np.ndarray]]]:
    """Records (boxes from polygon extents) and polygons; no label file means background."""
    records, segments = [], []
    for image in images:
        label_file = label_path_for(image)
        labels, polygons = (parse_polygon_file(label_file, nc) if label_file.is_file()
                            else (np.zeros((0, 5)), []))
        records.append(ImageRecord(image, label_file, *_image_size(image), labels))
        segments.append(polygons)
    return records, segments


def collate(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list | None]:
    """Samples -> (B x 3 x S x S images, N x 6 ``[image_index, cls, xc, yc, w, h]``, segments).

    Segments come back as one list per image, or None when no sample has any.
    """
    if not batch:
        raise ValueError("collate needs at least one sample")
    images = torch.stack([image for image, _, _ in batch])
    targets = torch.cat([torch.cat([torch.full((len(labels), 1), float(i)), labels], dim=1)
                         for i, (_, labels, _) in enumerate(batch)])
    if all(segments is None for _, _, segments in batch):
        return images, targets, None
    return images, targets, [segments or [] for _, _, segments in batch]


class TrainDataset:
    """The ``train`` split of a data.yaml as deterministic, augmented samples (module docstring)."""

    def __init__(self, data_yaml: str | os.PathLike, imgsz: int = 640, augment: bool = True,
                 mosaic: bool = False, seed: int = 0, hyp: AugmentConfig | None = None,
                 segments: bool = False, max_images: int | None = None):
        if imgsz < 1:
            raise ValueError(f"imgsz must be a positive number of pixels, got {imgsz}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        self.config = load_data_config(data_yaml)
        if not self.config.train:
            raise DatasetError(f"{self.config.yaml_path}: no 'train' images are listed")
        images = list_images(self.config.train)[:max_images]
        if not images:
            raise DatasetError(f"{', '.join(map(str, self.config.train))}: no images found")
        if segments:
            self.records, self.segments = scan_polygons(images, self.config.nc)
        else:
            self.records, self.segments = scan_images(images, self.config.nc), None
        self.imgsz, self.augment, self.mosaic, self.seed = imgsz, augment, mosaic, seed
        self.hyp = hyp if hyp is not None else AugmentConfig()
        self.epoch = 0

    @property
    def names(self) -> tuple[str, ...]:
        return self.config.names

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose randomness ``__getitem__`` uses (as DistributedSampler does)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __getitem__(self, index: int):
        return self.sample(index, self.epoch)

    def sample(self, index: int, epoch: int):
        """(3 x S x S float32 in [0, 1], n x 5 float32 ``cls xc yc w h``, segments or None)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        rng = np.random.default_rng((self.seed, epoch, index))
        if not self.augment:
            image, labels, segments = self._load(index)
            return _to_tensors(*letterbox_square(image, labels, self.imgsz, segments))
        hyp = self.hyp
        if self.mosaic and rng.random() < hyp.mosaic:
            picks = [index, *(int(i) for i in rng.integers(0, len(self), 3))]
            images, labels_list, segments_list = zip(*(self._load(i) for i in picks))
            image, labels, segments = mosaic4(
                list(images), list(labels_list), rng, self.imgsz, hyp.degrees, hyp.translate,
                hyp.scale, None if self.segments is None else list(segments_list))
        else:
            image, labels, segments = self._load(index)
            image, labels, segments = letterbox_square(image, labels, self.imgsz, segments)
            image, labels, segments = random_affine(image, labels, rng, hyp.degrees,
                                                    hyp.translate, hyp.scale, segments=segments)
        image = hsv_jitter(image, rng, hyp.hsv_h, hyp.hsv_s, hyp.hsv_v)
        image, labels, segments = horizontal_flip(image, labels, rng, hyp.fliplr, segments)
        return _to_tensors(image, labels, segments)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
        record = self.records[index]
        segments = None if self.segments is None else self.segments[index]
        return read_resized(record.image, self.imgsz), record.labels, segments

    def sampler_indices(self, epoch: int, rank: int = 0, world_size: int = 1,
                        shuffle: bool = True) -> np.ndarray:
        """This rank's share of the epoch's order, as DistributedSampler splits it.

        The order is padded by wrap-around to ``world_size · ceil(n / world_size)`` and rank r
        takes positions r, r + world_size, ...; every rank gets the same count.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        n = len(self)
        order = np.random.default_rng((self.seed, epoch)).permutation(n) if shuffle else np.arange(n)
        padded = np.resize(order, math.ceil(n / world_size) * world_size)  # np.resize wraps around
        return padded[rank::world_size]

    def batches(self, batch_size: int, shuffle: bool = True, epoch: int = 0,
                drop_last: bool = False, workers: int = 2, rank: int = 0,
                world_size: int = 1, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, list | None]]:
        """Collated batches of this rank's share of ``epoch``; samples decode on ``workers`` threads.

        Samples use ``epoch`` (not ``set_epoch``'s), so the batches are the same whatever the
        number of workers. ``start`` skips the epoch's first batches without decoding them (resume).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = [int(i) for i in self.sampler_indices(epoch, rank, world_size, shuffle)]
        groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if drop_last and groups and len(groups[-1]) < batch_size:
            groups.pop()
        groups = groups[start:]
        if workers <= 0:
            for group in groups:
                yield collate([self.sample(i, epoch) for i in group])
            return
        pool = ThreadPoolExecutor(max_workers=workers)  # PIL and numpy release the GIL
        try:
            pending: deque = deque()
            for group in groups:
                pending.append([pool.submit(self.sample, i, epoch) for i in group])
                if len(pending) > _PREFETCH_BATCHES:
                    yield collate([future.result() for future in pending.popleft()])
            while pending:
                yield collate([future.result() for future in pending.popleft()])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _to_tensors(image: np.ndarray, labels: np.ndarray, segments: list[np.ndarray] | None):
    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    polygons = None if segments is None else [seg.astype(np.float32) for seg in segments]
    return chw.float().div_(255.0), torch.from_numpy(labels.astype(np.float32)), polygons
