"""YOLO architectures, checkpoint loading and tiny test models (``yoloq.models``)."""
from yoloq.models.tiny import TINY_MODELS

__all__ = ["TINY_MODELS"]
