"""Training losses: YOLOv5/v7 anchor-based and YOLOv8/11 task-aligned detection, and their -seg variants."""
from .anchor_based import AnchorLoss
from .boxes import bbox_iou
from .masks import polygons_to_masks, rasterize_polygon
from .segment import AnchorSegLoss, TalSegLoss
from .tal import TalLoss

__all__ = ["AnchorLoss", "AnchorSegLoss", "TalLoss", "TalSegLoss", "bbox_iou", "polygons_to_masks",
           "rasterize_polygon"]
