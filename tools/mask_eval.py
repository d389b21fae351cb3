"""Instance masks for COCO mask mAP: predicted masks in original pixels, ground-truth polygons.

A segmentation head gives, per image, prototypes P (nm × Hp × Wp, covering the letterboxed input
H × W, so one prototype pixel is H / Hp input pixels) and, per detection, nm coefficients c. The
detection's mask is σ(c · P) > ½, i.e. c · P > 0, read in the original image: original pixel (u, v)
has its centre at input position ((u + ½)·g + pad_x, (v + ½)·g + pad_y) (the ``Letterbox`` gain
and padding, the inverse of the mapping the boxes take back), where c · P is sampled bilinearly
(half-pixel centres, edges clamped). Un-letterboxing and upsampling are thus one resampling of the
logits, not two of a thresholded mask. The mask is then cropped to the detection's box in
original pixels: only pixels whose centre lies inside it are kept (YOLOv5 and Ultralytics crop by
pixel index, x1 ≤ u < x2, at their working resolution, a half-pixel shift of the same rule).

Masks go to pycocotools as run-length encodings; ground-truth polygons (normalised) go as COCO
polygons in original pixels with their polygon area, which pycocotools rasterises itself.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from yoloq.tools.data import Letterbox


def _sampling_grid(letterbox: Letterbox, input_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(1, h0, w0, 2) ``grid_sample`` coordinates of the original pixel centres in the input image."""
    height, width = letterbox.original_hw
    xs = (torch.arange(width, device=device) + 0.5) * letterbox.gain + letterbox.pad[0]
    ys = (torch.arange(height, device=device) + 0.5) * letterbox.gain + letterbox.pad[1]
    # align_corners=False: −1 and 1 are the outer edges of the prototype map, i.e. of the input.
    gx, gy = xs / input_hw[1] * 2 - 1, ys / input_hw[0] * 2 - 1
    return torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None].float()


def predicted_masks(coefs: torch.Tensor, protos: torch.Tensor, boxes: torch.Tensor, letterbox: Letterbox,
                    input_hw: tuple[int, int]) -> torch.Tensor:
    """(n, h0, w0) bool masks of n detections in original pixels (module docstring).

    ``coefs`` (n, nm), ``protos`` (nm, Hp, Wp) of the image, ``boxes`` (n, 4) xyxy in original
    pixels. Each mask is resampled only inside its box: nothing outside it survives the crop.
    """
    height, width = letterbox.original_hw
    masks = torch.zeros(len(coefs), height, width, dtype=torch.bool, device=protos.device)
    if not len(coefs):
        return masks
    grid = _sampling_grid(letterbox, input_hw, protos.device)
    logits = (coefs.float().to(protos.device) @ protos.float().flatten(1)).view(-1, 1, *protos.shape[1:])
    # Pixel u is kept when x1 ≤ u + ½ ≤ x2, i.e. ⌈x1 − ½⌉ ≤ u ≤ ⌊x2 − ½⌋; likewise for rows.
    boxes = boxes.detach().double().cpu()
    first = torch.ceil(boxes[:, :2] - 0.5).clamp(min=0).long()
    last = (torch.floor(boxes[:, 2:] - 0.5) + 1).clamp(max=torch.tensor([width, height])).long()
    for k, ((u0, v0), (u1, v1)) in enumerate(zip(first.tolist(), last.tolist())):
        if u1 > u0 and v1 > v0:
            window = F.grid_sample(logits[k:k + 1], grid[:, v0:v1, u0:u1], mode="bilinear",
                                   padding_mode="border", align_corners=False)
            masks[k, v0:v1, u0:u1] = window[0, 0] > 0
    return masks


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """COCO run-length encodings of (n, h, w) bool masks."""
    from pycocotools import mask as mask_utils

    if not len(masks):
        return []
    columns = np.asfortranarray(masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
    return mask_utils.encode(columns)


def mask_encodings(coefs: torch.Tensor, protos: torch.Tensor, boxes: torch.Tensor, letterbox: Letterbox,
                   input_hw: tuple[int, int], chunk: int = 32) -> list[dict]:
    """``encode_masks(predicted_masks(...))``, ``chunk`` detections at a time to bound memory."""
    return [rle for start in range(0, len(coefs), chunk)
            for rle in encode_masks(predicted_masks(coefs[start:start + chunk], protos,
                                                    boxes[start:start + chunk], letterbox, input_hw))]


def polygon_annotation(polygon: np.ndarray, width: int, height: int) -> tuple[list[list[float]], float]:
    """A normalised (k, 2) polygon as a COCO ``segmentation`` in pixels, and its area (shoelace)."""
    points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) * np.array([width, height])
    x, y = points[:, 0], points[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return [points.reshape(-1).tolist()], area
