"""Turn what a user names on the command line into a model: a tiny model, a zoo name, a YAML, a checkpoint."""
from __future__ import annotations

import importlib
import pathlib
import warnings

from torch import nn

from yoloq.models.tiny import TINY_MODELS


def load_model(spec: str) -> nn.Module:
    if spec in TINY_MODELS:
        return TINY_MODELS[spec]()
    path = pathlib.Path(spec)
    if spec.endswith((".yaml", ".yml")):
        return _ultralytics_model(spec)
    if spec.endswith((".pt", ".pth")):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {spec} does not exist")
        return _optional("yoloq.models.checkpoint", "load", spec)(spec)
    zoo = _optional("yoloq.models.zoo", "build", spec)
    try:
        return zoo(spec)
    except ValueError as exc:
        raise ValueError(f"{exc}; or a tiny model ({', '.join(sorted(TINY_MODELS))}), an ultralytics YAML "
                         "(yolov8n.yaml) or a checkpoint (.pt)") from None


def _optional(module: str, attr: str, spec: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        valid = ", ".join(sorted(TINY_MODELS))
        raise ValueError(f"cannot build {spec!r}: not a tiny model ({valid}) and {module} is unavailable") from None


def _ultralytics_model(spec: str) -> nn.Module:
    try:
        import ultralytics
    except ImportError:
        raise ValueError(f"{spec} is an ultralytics YAML; building it needs the test extra: pip install 'yoloq[test]'") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = ultralytics.RTDETR if "rtdetr" in spec else ultralytics.YOLO
        return cls(spec).model.eval()
