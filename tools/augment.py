"""Training augmentations for YOLO detection and segmentation labels, as pure functions.

Conventions. Images are HxWx3 uint8 RGB arrays; they are never modified in place. Labels are (n, 5)
arrays ``cls xc yc w h`` normalised to the image. Segments, where given, are a list of n (k, 2)
arrays of normalised polygon vertices ``x y``, segment i outlining the object of label row i; a
function that moves pixels moves them too, and then recomputes each box as its polygon's extent.
Pixel coordinates are continuous: pixel (row i, column j) covers [j, j+1) x [i, i+1), so a
normalised x is ``x * W`` pixels, which is also how PIL's ``Image.transform`` maps points. Every
random draw comes from the ``numpy.random.Generator`` passed in, so a sample is a function of it.

``random_affine`` maps an input point p (pixels) to the output point

    p' = T · R · C · p,   C = shift(-W/2, -H/2),   R = s · rot(θ),   T = shift(tx, ty)

with θ ~ U(-degrees, degrees), s ~ U(1 - scale, 1 + scale), (tx, ty) ~ U(0.5 ± translate) · (W', H')
and output size (W', H') = (W + 2b, H + 2b) for a border b (negative b crops). The image is
resampled bilinearly through M⁻¹; boxes travel as their four corners and become the corners'
extent clipped to the output; polygons travel vertex by vertex and are clipped to the output
(Sutherland–Hodgman). A box is dropped when it is at most 2 px wide or tall, or keeps at most 10 %
of its area scaled by s², i.e. when ``w'h' <= 0.1 · s² · wh``.

``mosaic4`` pastes four images on a grey 2S x 2S canvas around a centre (xc, yc) ~ U(S/2, 3S/2)²,
each with one corner at the centre (top-left image: its bottom-right corner), crops what falls off
the canvas, and then runs the affine above from the 2S canvas to an S x S output.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

PAD_VALUE = 114
MIN_SIDE_PX = 2.0  # boxes at most this wide or tall after a transform are dropped
MIN_AREA_KEPT = 0.1  # ... and so are boxes keeping at most this fraction of their (scaled) area


def hsv_jitter(image: np.ndarray, rng: np.random.Generator, h: float = 0.015, s: float = 0.7,
               v: float = 0.4) -> np.ndarray:
    """Random colour change in HSV space, applied through 256-entry lookup tables.

    With δ ~ U(-1, 1)³ · (h, s, v) and PIL's 0..255 hue circle: ``hue' = (hue + 256 δh) mod 256``,
    ``sat' = clip(sat · (1 + δs))``, ``val' = clip(val · (1 + δv))``. The hue is shifted, not
    scaled, so every hue moves by the same angle (ultralytics' form of YOLOv5's jitter).
    """
    dh, ds, dv = rng.uniform(-1.0, 1.0, 3) * (h, s, v)
    if not (h or s or v):  # HSV round trips lose a few levels: skip it when nothing can change
        return image.copy()
    levels = np.arange(256, dtype=np.float64)
    hue = np.round(levels + 256.0 * dh).astype(np.int64) % 256
    sat = np.clip(np.round(levels * (1.0 + ds)), 0, 255)
    val = np.clip(np.round(levels * (1.0 + dv)), 0, 255)
    hsv = np.asarray(Image.fromarray(image).convert("HSV"))
    jittered = np.stack([hue[hsv[..., 0]], sat[hsv[..., 1]], val[hsv[..., 2]]], axis=-1)
    return np.asarray(Image.fromarray(jittered.astype(np.uint8), "HSV").convert("RGB"))


def horizontal_flip(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                    p: float = 0.5, segments: list[np.ndarray] | None = None):
    """Mirror left-right with probability p: ``xc -> 1 - xc``, polygon ``x -> 1 - x``.

    One draw is taken whatever p is, so later draws do not depend on p. Returns
    ``(image, labels, segments)``.
    """
    if not rng.random() < p:
        return image, labels, segments
    labels = labels.copy()
    labels[:, 1] = 1.0 - labels[:, 1]
    if segments is not None:
        segments = [np.column_stack([1.0 - seg[:, 0], seg[:, 1]]) for seg in segments]
    return np.ascontiguousarray(image[:, ::-1]), labels, segments


def letterbox_square(image: np.ndarray, labels: np.ndarray, size: int,
                     segments: list[np.ndarray] | None = None):
    """Resize the long side to ``size`` and pad with grey 114 to size x size, centred.

    The resized image (w', h') sits at offset (left, top), so a normalised x becomes
    ``(x · w' + left) / size`` and a width ``w · w' / size``; likewise for y. Returns
    ``(image, labels, segments)``.
    """
    height, width = image.shape[:2]
    ratio = size / max(height, width)
    new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    if (new_w, new_h) != (width, height):
        # BOX (area averaging) when shrinking avoids aliasing, as cv2.INTER_AREA does in YOLOv5.
        method = Image.Resampling.BOX if ratio < 1 else Image.Resampling.BILINEAR
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), method))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[top:top + new_h, left:left + new_w] = image
    gain = np.array([new_w, new_h]) / size
    offset = np.array([left, top]) / size
    labels = labels.copy()
    labels[:, 1:3] = labels[:, 1:3] * gain + offset
    labels[:, 3:5] = labels[:, 3:5] * gain
    if segments is not None:
        segments = [seg * gain + offset for seg in segments]
    return canvas, labels, segments


def random_affine(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                  degrees: float = 0.0, translate: float = 0.1, scale: float = 0.5,
                  border: int = 0, segments: list[np.ndarray] | None = None):
    """Random scale, translation and rotation (see the module docstring for the maths).

    The output is ``(W + 2·border) x (H + 2·border)``. Returns ``(image, labels, segments)``
    normalised to the output, with dropped boxes (and their polygons) removed.
    """
    height, width = image.shape[:2]
    out_wh = (width + 2 * border, height + 2 * border)
    if min(out_wh) <= 0:
        raise ValueError(f"border {border} leaves no image of {width}x{height}")
    xyxy = _to_pixels(labels, width, height)
    pixel_segments = None if segments is None else [seg * (width, height) for seg in segments]
    return _affine(image, labels[:, 0], xyxy, pixel_segments, rng, out_wh,
                   degrees, translate, scale)


def mosaic4(images: list[np.ndarray], labels_list: list[np.ndarray], rng: np.random.Generator,
            size: int, degrees: float = 0.0, translate: float = 0.1, scale: float = 0.5,
            segments_list: list[list[np.ndarray]] | None = None):
    """Four images around a random centre of a 2·size canvas, then the affine down to size.

    Returns ``(image size x size x 3, labels, segments)`` normalised to the output.
    """
    if len(images) != 4 or len(labels_list) != 4:
        raise ValueError(f"mosaic4 needs 4 images and 4 label arrays, got {len(images)}, "
                         f"{len(labels_list)}")
    side = 2 * size
    xc, yc = (int(c) for c in rng.uniform(size / 2, 3 * size / 2, 2))
    canvas = np.full((side, side, 3), PAD_VALUE, dtype=np.uint8)
    classes, boxes, polygons = [], [], []
    for k, (image, labels) in enumerate(zip(images, labels_list)):
        height, width = image.shape[:2]
        x0 = xc - width if k in (0, 2) else xc  # where the image's top-left corner lands
        y0 = yc - height if k in (0, 1) else yc
        visible = (max(x0, 0), max(y0, 0), min(x0 + width, side), min(y0 + height, side))
        vx1, vy1, vx2, vy2 = visible
        canvas[vy1:vy2, vx1:vx2] = image[vy1 - y0:vy2 - y0, vx1 - x0:vx2 - x0]
        classes.append(labels[:, 0])
        xyxy = _to_pixels(labels, width, height) + (x0, y0, x0, y0)
        # Only the canvas edge crops an image, so clipping to its visible part is exact.
        boxes.append(np.clip(xyxy, (vx1, vy1, vx1, vy1), (vx2, vy2, vx2, vy2)))
        if segments_list is not None:
            polygons += [_clip_polygon(seg * (width, height) + (x0, y0), visible)
                         for seg in segments_list[k]]
    xyxy = np.concatenate(boxes).reshape(-1, 4)
    if segments_list is not None:
        xyxy = _extents(polygons)
    return _affine(canvas, np.concatenate(classes), xyxy,
                   polygons if segments_list is not None else None, rng, (size, size),
                   degrees, translate, scale)


def _affine(image, classes, xyxy, polygons, rng, out_wh, degrees, translate, scale):
    """The affine of ``random_affine`` on pixel boxes / polygons; returns normalised results."""
    matrix, gain = _affine_matrix(rng, image.shape[1::-1], out_wh, degrees, translate, scale)
    inverse = np.linalg.inv(matrix)
    warped = Image.fromarray(image).transform(
        out_wh, Image.Transform.AFFINE, data=tuple(inverse[:2].ravel()),
        resample=Image.Resampling.BILINEAR, fillcolor=(PAD_VALUE,) * 3)
    frame = (0, 0, *out_wh)
    if polygons is not None:
        polygons = [_clip_polygon(_apply(matrix, poly), frame) for poly in polygons]
        moved = _extents(polygons)
    else:
        corners = xyxy[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)
        corners = _apply(matrix, corners.reshape(-1, 2)).reshape(-1, 4, 2)
        moved = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
        moved = np.clip(moved, 0, (*out_wh, *out_wh))
    keep = _keep(xyxy, moved, gain * gain)
    labels = _to_normalised(classes[keep], moved[keep], *out_wh)
    if polygons is not None:
        polygons = [poly / out_wh for poly, kept in zip(polygons, keep) if kept]
    return np.asarray(warped), labels, polygons


def _affine_matrix(rng, in_wh, out_wh, degrees, translate, scale) -> tuple[np.ndarray, float]:
    """M = T · R · C (3x3, pixels) and its scale s; always four draws, in a fixed order."""
    angle = np.deg2rad(rng.uniform(-degrees, degrees))
    gain = rng.uniform(1.0 - scale, 1.0 + scale)
    tx, ty = rng.uniform(0.5 - translate, 0.5 + translate, 2) * out_wh
    centre = np.array([[1, 0, -in_wh[0] / 2], [0, 1, -in_wh[1] / 2], [0, 0, 1]])
    cos, sin = gain * np.cos(angle), gain * np.sin(angle)
    rotate = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    return shift @ rotate @ centre, float(gain)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def _keep(before: np.ndarray, after: np.ndarray, area_gain: float) -> np.ndarray:
    """Boxes wider and taller than 2 px that keep more than 10 % of their area times s²."""
    w0, h0 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w1, h1 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    kept_area = w1 * h1 > MIN_AREA_KEPT * area_gain * w0 * h0
    return (w1 > MIN_SIDE_PX) & (h1 > MIN_SIDE_PX) & kept_area


def _clip_polygon(points: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Sutherland–Hodgman: the part of a polygon inside the box (x1, y1, x2, y2); may be empty."""
    x1, y1, x2, y2 = box
    if len(points) == 0 or (points.min(0) >= (x1, y1)).all() and (points.max(0) <= (x2, y2)).all():
        return points
    for axis, limit, sign in ((0, x1, 1), (0, x2, -1), (1, y1, 1), (1, y2, -1)):
        inside = sign * (points[:, axis] - limit) >= 0
        kept, previous, previous_in = [], points[-1], inside[-1]
        for point, point_in in zip(points, inside):
            if point_in != previous_in:  # the edge crosses the line: keep the crossing point
                t = (limit - previous[axis]) / (point[axis] - previous[axis])
                kept.append(previous + t * (point - previous))
            if point_in:
                kept.append(point)
            previous, previous_in = point, point_in
        points = np.asarray(kept, dtype=np.float64).reshape(-1, 2)
        if len(points) == 0:
            break
    return np.clip(points, (x1, y1), (x2, y2))  # crossing points can miss the edge by rounding


def _extents(polygons: list[np.ndarray]) -> np.ndarray:
    """(n, 4) xyxy extent of each polygon; an empty polygon gives an empty box at the origin."""
    boxes = [np.concatenate([p.min(0), p.max(0)]) if len(p) else np.zeros(4) for p in polygons]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _to_pixels(labels: np.ndarray, width: float, height: float) -> np.ndarray:
    """Normalised ``xc yc w h`` columns of (n, 5) labels -> (n, 4) pixel xyxy."""
    xy, wh = labels[:, 1:3] * (width, height), labels[:, 3:5] * (width, height)
    return np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)


def _to_normalised(classes: np.ndarray, xyxy: np.ndarray, width: float, height: float):
    """Pixel xyxy -> (n, 5) ``cls xc yc w h`` normalised, clipped into [0, 1]."""
    size = np.array([width, height, width, height], dtype=np.float64)
    xyxy = np.clip(xyxy / size, 0.0, 1.0)
    centre, extent = (xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]
    return np.column_stack([classes, centre, extent]).reshape(-1, 5)
