"""Detection losses for quantization-aware training: YOLOv5/v7 anchor-based and YOLOv8/11 task-aligned."""
from .anchor_based import AnchorLoss
from .boxes import bbox_iou
from .tal import TalLoss

__all__ = ["AnchorLoss", "TalLoss", "bbox_iou"]
