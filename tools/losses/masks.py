"""Ground-truth instance masks for the segmentation losses: polygons rasterised by pixel centre.

Pixel (i, j) of an H × W mask covers [i, i + 1) × [j, j + 1) in mask pixel units; it belongs to a
polygon when its centre (i + ½, j + ½) lies inside (even-odd rule). A scanline at each row centre
crosses the polygon's edges (each edge taken half-open in y, so a vertex on the line counts once);
the crossings toggle the pixels from the first centre at or right of them, and a running parity
along the row fills between pairs. The masks are drawn directly at the requested resolution (the
prototype resolution, stride 4, for the losses), not at image resolution and then resized, so
every mask pixel is exactly the point test of its centre; the filled area differs from the polygon's
area by at most about half a pixel along its outline.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def rasterize_polygon(points: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels whose centre lies inside ``points`` ((k, 2) x, y in pixel units)."""
    height, width = int(size_hw[0]), int(size_hw[1])
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    centres = np.arange(height, dtype=np.float64)[:, None] + 0.5
    rows, edges = np.nonzero((y0 <= centres) != (y1 <= centres))  # (H, k) → crossing pairs
    ys = centres[rows, 0]
    xs = x0[edges] + (ys - y0[edges]) * (x1[edges] - x0[edges]) / (y1[edges] - y0[edges])
    first = np.clip(np.ceil(xs - 0.5), 0, width).astype(np.int64)
    toggles = np.zeros((height, width + 1), dtype=np.int64)
    np.add.at(toggles, (rows, first), 1)
    return (np.cumsum(toggles[:, :width], axis=1) % 2).astype(bool)


def polygons_to_masks(segments: Sequence[Sequence[np.ndarray]], targets: torch.Tensor,
                      size_hw: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) uint8 masks, one per row of ``targets`` (N × 6, ``[image, cls, xc, yc, w, h]``).

    ``segments[b]`` lists image b's polygons ((k, 2) normalised x, y), one per target row of that
    image in the order the rows appear, as ``train_data.collate`` yields them. Each polygon is
    rasterised at ``size_hw`` (module docstring); pass the prototype size for the losses.
    """
    if segments is None:
        raise ValueError("polygons_to_masks: this batch has no segments (a detection dataset?)")
    height, width = int(size_hw[0]), int(size_hw[1])
    images = targets[:, 0].long().tolist()
    masks = torch.zeros(len(images), height, width, dtype=torch.uint8)
    used = [0] * len(segments)
    scale = np.array([width, height], dtype=np.float64)
    for row, image in enumerate(images):
        if not 0 <= image < len(segments) or used[image] >= len(segments[image]):
            raise ValueError(f"polygons_to_masks: target row {row} (image {image}) has no polygon")
        polygon = np.asarray(segments[image][used[image]], dtype=np.float64).reshape(-1, 2)
        masks[row] = torch.from_numpy(rasterize_polygon(polygon * scale, (height, width)))
        used[image] += 1
    surplus = [b for b, polygons in enumerate(segments) if used[b] != len(polygons)]
    if surplus:
        raise ValueError(f"polygons_to_masks: images {surplus} have more polygons than target rows")
    return masks
