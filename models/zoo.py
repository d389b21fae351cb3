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
    **{f"yolov5{s}{t}": partial(yolov5, s, segment=bool(t)) for t in ("", "-seg") for s in "nsmlx"},
    **{f"yolov8{s}{t}": partial(yolov8, s, segment=bool(t)) for t in ("", "-seg") for s in "nsmlx"},
    **{f"yolo11{s}": partial(yolo11, s) for s in "nsmlx"},
    "yolov7": partial(yolov7, "yolov7"),
    "yolov7-tiny": partial(yolov7, "yolov7-tiny"),
}


def build(name: str, nc: int = 80) -> nn.Module:
    """A new model by zoo name, e.g. ``build("yolov5n-seg", nc=20)``."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(BUILDERS)}")
    return BUILDERS[name](nc=nc)
