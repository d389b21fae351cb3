"""YOLO architectures, checkpoint loading and tiny test models (``yoloq.models``)."""
from yoloq.models.checkpoint import load
from yoloq.models.tiny import TINY_MODELS
from yoloq.models.zoo import build

__all__ = ["TINY_MODELS", "build", "load"]
