"""Named model builders: ``build("yolov5s", nc=80)``.

A plain table from name to builder, so that adding an architecture is adding rows; builders take
the number of classes and return a freshly initialised model in training mode.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from yoloq.models.yolov5 import yolov5
from yoloq.models.yolov7 import yolov7
from yoloq.models.yolov8 import yolo11, yolov8

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "yolov5n": partial(yolov5, "n"),
    "yolov5s": partial(yolov5, "s"),
    "yolov5m": partial(yolov5, "m"),
    "yolov5l": partial(yolov5, "l"),
    "yolov5x": partial(yolov5, "x"),
    "yolov5n-seg": partial(yolov5, "n", segment=True),
    "yolov5s-seg": partial(yolov5, "s", segment=True),
    "yolov5m-seg": partial(yolov5, "m", segment=True),
    "yolov5l-seg": partial(yolov5, "l", segment=True),
    "yolov5x-seg": partial(yolov5, "x", segment=True),
    "yolov8n": partial(yolov8, "n"),
    "yolov8s": partial(yolov8, "s"),
    "yolov8m": partial(yolov8, "m"),
    "yolov8l": partial(yolov8, "l"),
    "yolov8x": partial(yolov8, "x"),
    "yolov8n-seg": partial(yolov8, "n", segment=True),
    "yolov8s-seg": partial(yolov8, "s", segment=True),
    "yolov8m-seg": partial(yolov8, "m", segment=True),
    "yolov8l-seg": partial(yolov8, "l", segment=True),
    "yolov8x-seg": partial(yolov8, "x", segment=True),
    "yolo11n": partial(yolo11, "n"),
    "yolo11s": partial(yolo11, "s"),
    "yolo11m": partial(yolo11, "m"),
    "yolo11l": partial(yolo11, "l"),
    "yolo11x": partial(yolo11, "x"),
    "yolov7": partial(yolov7, "yolov7"),
    "yolov7-tiny": partial(yolov7, "yolov7-tiny"),
}


def build(name: str, nc: int = 80) -> nn.Module:
    """A new model by zoo name, e.g. ``build("yolov5n-seg", nc=20)``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(BUILDERS)}")
    return BUILDERS[name](nc=nc)
