"""YOLO-format datasets: data.yaml, images/ + labels/, and the letterbox of the official YOLOv5 val.

Preprocessing reproduces YOLOv5 ``val.py`` (v7.0) so that metrics are comparable with its figures:
the long side is resized to ``imgsz`` (area averaging when shrinking, bilinear when enlarging, size
rounded up), then the image is padded with grey 114 to its batch shape. In rectangular mode images
are sorted by aspect ratio h/w and each batch of ``batch`` images gets one shape,
``ceil(imgsz * ratio / stride + pad) * stride`` with ``pad = 0.5``; in square mode every image is
padded to ``imgsz x imgsz``. ``Letterbox`` records the gain and the (unrounded) padding, as YOLOv5
does, so that ``Letterbox.to_original`` maps boxes back to original pixels.

Nothing is written to disk. Errors name the file (and line) at fault.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm")
PAD_VALUE = 114
_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# What PIL raises on a bad file, plus ImportError: ultralytics, once imported, replaces
# PIL.Image.open process-wide with a version that tries to import an optional HEIF plugin on an
# unidentified file, so a corrupt image can surface as ModuleNotFoundError.
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, ImportError)


class DatasetError(ValueError):
    """A dataset that cannot be read as it stands; the message names the file (and line)."""


@dataclass(frozen=True)
class DataConfig:
    """What a data.yaml says, with every path made absolute."""

    yaml_path: Path
    train: tuple[Path, ...]
    val: tuple[Path, ...]
    names: tuple[str, ...]

    @property
    def nc(self) -> int:
        return len(self.names)


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image: where it and its label file are, its size (after EXIF rotation), its boxes.

    ``labels`` is an (n, 5) float64 array of ``cls xc yc w h`` with coordinates normalised to the
    image; it is empty for a background image (no label file, or an empty one).
    """

    image: Path
    label_file: Path
    width: int
    height: int
    labels: np.ndarray

    @property
    def has_label_file(self) -> bool:
        return self.label_file.is_file()


@dataclass(frozen=True)
class Letterbox:
    """How an original image became a network input: ``input = original * gain + pad``."""

    original_hw: tuple[int, int]
    gain: float
    pad: tuple[float, float]  # (x, y) as YOLOv5 records it: half the total padding, unrounded

    def to_original(self, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """Map (n, 4) xyxy boxes from the input image back to original pixels, clipped to it."""
        boxes = boxes_xyxy.clone()
        boxes[:, [0, 2]] -= self.pad[0]
        boxes[:, [1, 3]] -= self.pad[1]
        boxes /= self.gain
        height, width = self.original_hw
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, height)
        return boxes


def load_data_config(yaml_path: str | os.PathLike) -> DataConfig:
    """Read a data.yaml; relative paths are resolved against its ``path`` key or its folder."""
    yaml_path = Path(yaml_path).resolve()
    if not yaml_path.is_file():
        raise DatasetError(f"{yaml_path}: data.yaml not found")
    spec = yaml.safe_load(yaml_path.read_text()) or {}
    if "names" not in spec:
        raise DatasetError(f"{yaml_path}: has no 'names' key")
    names = spec["names"]
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DatasetError(f"{yaml_path}: 'names' keys must be the ids 0..{len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    if "nc" in spec and int(spec["nc"]) != len(names):
        raise DatasetError(f"{yaml_path}: nc is {spec['nc']} but 'names' lists {len(names)}")
    root = Path(spec.get("path") or ".")
    root = root if root.is_absolute() else (yaml_path.parent / root).resolve()

    def _paths(key: str) -> tuple[Path, ...]:
        value = spec.get(key) or ()
        items = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        return tuple(p if p.is_absolute() else (root / p).resolve() for p in map(Path, items))

    return DataConfig(yaml_path, _paths("train"), _paths("val"), tuple(map(str, names)))


def label_path_for(image: Path) -> Path:
    """YOLOv5's rule: swap the last ``/images/`` of the path for ``/labels/``, suffix -> .txt."""
    head, sep, tail = str(image).rpartition(f"{os.sep}images{os.sep}")
    swapped = f"{head}{os.sep}labels{os.sep}{tail}" if sep else str(image)
    return Path(swapped).with_suffix(".txt")


def list_images(sources: tuple[Path, ...]) -> list[Path]:
    """Image files under folders (recursively) or listed in .txt files, sorted by path string."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        elif source.is_file() and source.suffix == ".txt":
            lines = [ln.strip() for ln in source.read_text().splitlines() if ln.strip()]
            files += [(source.parent / ln).resolve() for ln in lines]
        else:
            raise DatasetError(f"{source}: image folder or list not found")
    return sorted(files, key=str)


def numbered_lines(path: Path) -> Iterator[tuple[int, list[float]]]:
    """(line number, numbers) for each non-blank line of a label file; a non-number names file:line."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, [float(v) for v in line.split()]
        except ValueError:
            raise DatasetError(f"{path}:{number}: not numbers: {line.strip()!r}") from None


def parse_label_file(path: Path, nc: int) -> np.ndarray:
    """Boxes of one label file as (n, 5) ``cls xc yc w h``; duplicates dropped, as YOLOv5 does."""
    rows = []
    for number, values in numbered_lines(path):
        if len(values) != 5:
            raise DatasetError(f"{path}:{number}: expected 'cls xc yc w h', got {len(values)} values")
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < nc:
            raise DatasetError(f"{path}:{number}: class id {values[0]:g} is not in 0..{nc - 1}")
        if not all(0.0 <= v <= 1.0 for v in values[1:]):
            raise DatasetError(f"{path}:{number}: coordinates must be normalised to [0, 1]")
        rows.append(values)
    if not rows:
        return np.zeros((0, 5))
    return np.unique(np.asarray(rows, dtype=np.float64), axis=0)


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            width, height = im.size
            if im.getexif().get(_EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS:
                width, height = height, width
    except _DECODE_ERRORS as err:
        raise DatasetError(f"{path}: corrupt or unreadable image ({type(err).__name__}: {err})") from None
    if width < 10 or height < 10:
        raise DatasetError(f"{path}: image is {width}x{height}, smaller than 10 pixels")
    return width, height


def scan_images(images: list[Path], nc: int) -> list[ImageRecord]:
    """Records for the images; an image without a label file is a background image."""
    for folder in sorted({label_path_for(p).parent for p in images}):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: labels folder not found (expected beside the images)")
    records = []
    for image in images:
        label_file = label_path_for(image)
        labels = parse_label_file(label_file, nc) if label_file.is_file() else np.zeros((0, 5))
        records.append(ImageRecord(image, label_file, *_image_size(image), labels))
    return records


def read_resized(path: Path, imgsz: int) -> np.ndarray:
    """Image as RGB uint8 HxWx3, long side resized to imgsz (YOLOv5's load_image)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except _DECODE_ERRORS as err:
        raise DatasetError(f"{path}: corrupt or unreadable image ({type(err).__name__}: {err})") from None
    width, height = im.size
    ratio = imgsz / max(height, width)
    if ratio != 1:
        size = (math.ceil(width * ratio), math.ceil(height * ratio))
        # BOX is area averaging: the counterpart of cv2.INTER_AREA that YOLOv5 uses to shrink.
        im = im.resize(size, Image.Resampling.BOX if ratio < 1 else Image.Resampling.BILINEAR)
    return np.asarray(im)


def letterbox(image: np.ndarray, shape: tuple[int, int], original_hw: tuple[int, int]):
    """Pad (never enlarge) an HxWx3 image to ``shape`` (h, w), centred, as YOLOv5's letterbox."""
    height, width = image.shape[:2]
    ratio = min(shape[0] / height, shape[1] / width, 1.0)
    new_w, new_h = round(width * ratio), round(height * ratio)
    if (new_w, new_h) != (width, height):
        resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
        image = np.asarray(resized)
    dw, dh = (shape[1] - new_w) / 2, (shape[0] - new_h) / 2
    top, left = round(dh - 0.1), round(dw - 0.1)  # YOLOv5 puts the odd pixel at bottom/right
    canvas = np.full((shape[0], shape[1], 3), PAD_VALUE, dtype=np.uint8)
    canvas[top:top + new_h, left:left + new_w] = image
    gain = height / original_hw[0] * ratio
    return canvas, Letterbox(original_hw, gain, (dw, dh))


def batch_shapes(records: list[ImageRecord], imgsz: int, batch: int, stride: int = 32,
                 pad: float = 0.5) -> list[tuple[int, int]]:
    """One (h, w) per batch of already aspect-sorted records, as YOLOv5's rectangular loader."""
    aspect = np.array([r.height / r.width for r in records])
    shapes = []
    for start in range(0, len(records), batch):
        lo, hi = aspect[start:start + batch].min(), aspect[start:start + batch].max()
        scale = [hi, 1.0] if hi < 1 else [1.0, 1.0 / lo] if lo > 1 else [1.0, 1.0]
        hw = np.ceil(np.array(scale) * imgsz / stride + pad).astype(int) * stride
        shapes.append((int(hw[0]), int(hw[1])))
    return shapes


class YoloDataset:
    """Images and labels of one split, served in letterboxed batches.

    In rectangular mode ``records`` are in YOLOv5's aspect-sorted order; ``image_ids`` gives each
    record's index in filename order, which is stable whatever the batch size. With
    ``segments=True`` the label files are polygons (boxes are their extents) and ``segments`` maps
    each image path to its (k, 2) normalised polygons, in label order; otherwise it is None.
    """

    def __init__(self, data_yaml: str | os.PathLike, split: str = "val", imgsz: int = 640,
                 batch: int = 1, rect: bool = True, stride: int = 32,
                 max_images: int | None = None, segments: bool = False):
        self.config = load_data_config(data_yaml)
        sources = getattr(self.config, split)
        if not sources:
            raise DatasetError(f"{self.config.yaml_path}: no '{split}' images are listed")
        images = list_images(sources)[:max_images]
        if not images:
            raise DatasetError(f"{', '.join(map(str, sources))}: no images found")
        if segments:
            from yoloq.tools.train_data import scan_polygons  # train_data imports this module

            by_name, polygons = scan_polygons(images, self.config.nc)
            self.segments = {record.image: p for record, p in zip(by_name, polygons)}
        else:
            by_name, self.segments = scan_images(images, self.config.nc), None
        self.image_ids = {r.image: i for i, r in enumerate(by_name)}
        self.imgsz, self.batch, self.rect = imgsz, batch, rect
        if rect:
            # numpy's default argsort, as YOLOv5, so ties fall into the same batches as there.
            order = np.array([r.height / r.width for r in by_name]).argsort()
            self.records = [by_name[i] for i in order]
            self.shapes = batch_shapes(self.records, imgsz, batch, stride)
        else:
            self.records = by_name
            self.shapes = [(imgsz, imgsz)] * math.ceil(len(by_name) / batch)
        self.num_background = sum(1 for r in by_name if len(r.labels) == 0)

    @property
    def names(self) -> tuple[str, ...]:
        return self.config.names

    def __len__(self) -> int:
        return len(self.records)

    def num_batches(self) -> int:
        return len(self.shapes)

    def load(self, index: int, shape: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
        record = self.records[index]
        image = read_resized(record.image, self.imgsz)
        return letterbox(image, shape, (record.height, record.width))

    def batches(self, workers: int = 4) -> Iterator[tuple[torch.Tensor, list[ImageRecord],
                                                         list[Letterbox]]]:
        """Yield (B x 3 x H x W float in [0, 1], records, letterboxes) per batch."""
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
            for b, shape in enumerate(self.shapes):
                indices = range(b * self.batch, min((b + 1) * self.batch, len(self.records)))
                loaded = list(pool.map(lambda i: self.load(i, shape), indices))
                stacked = np.stack([image for image, _ in loaded])
                images = torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255)
                yield images, [self.records[i] for i in indices], [lb for _, lb in loaded]


def labels_are_polygons(data_yaml: str | os.PathLike, split: str = "val") -> bool:
    """Whether the split's label files hold polygons: the first label line decides (more than
    5 numbers: ``cls x1 y1 x2 y2 x3 y3 ...``)."""
    config = load_data_config(data_yaml)
    for image in list_images(getattr(config, split)):
        label_file = label_path_for(image)
        if label_file.is_file():
            for _, values in numbered_lines(label_file):
                return len(values) > 5
    return False
