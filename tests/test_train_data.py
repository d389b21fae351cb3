"""Training data: augmentations keep labels right, samples are deterministic, ranks split cleanly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from yoloq.tools.augment import (horizontal_flip, hsv_jitter, letterbox_square, mosaic4,
                                 random_affine)
from yoloq.tools.data import DatasetError, parse_label_file, read_resized
from yoloq.tools.train_data import AugmentConfig, TrainDataset, collate, parse_polygon_file

STRONG = AugmentConfig(degrees=30, translate=0.3, scale=0.9, fliplr=0.5)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def assert_boxes_inside(labels, segments=None) -> None:
    labels = np.asarray(labels, dtype=np.float64)
    xy, half = labels[:, 1:3], labels[:, 3:5] / 2
    assert (labels[:, 1:] >= 0).all() and (labels[:, 1:] <= 1).all()
    assert (xy - half >= -1e-6).all() and (xy + half <= 1 + 1e-6).all()
    assert (labels[:, 3:5] > 0).all()
    if segments is not None:
        assert len(segments) == len(labels)
        for row, polygon in zip(labels, segments):
            assert (polygon >= 0).all() and (polygon <= 1).all()
            low, high = polygon.min(0), polygon.max(0)  # the box is the polygon's extent
            np.testing.assert_allclose(row[1:], [*(low + high) / 2, *(high - low)], atol=1e-6)


def dataset(shared_data, seg=False, **kwargs) -> TrainDataset:
    name = "coco128-seg" if seg else "coco128"
    kwargs = {"imgsz": 128, "max_images": 8, **kwargs}
    return TrainDataset(shared_data / name / "data.yaml", segments=seg, **kwargs)


def test_augment_config_validates_fields_and_round_trips():
    config = AugmentConfig(degrees=10, mosaic=0.5)
    assert AugmentConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="no field.*hsv_x"):
        AugmentConfig.from_dict({"hsv_x": 0.1})
    with pytest.raises(ValueError, match="AugmentConfig.scale"):
        AugmentConfig(scale=1.0)
    with pytest.raises(ValueError, match="AugmentConfig.fliplr"):
        AugmentConfig(fliplr=True)


@pytest.mark.parametrize("config", ["plain", "affine", "mosaic", "mosaic-seg"])
def test_boxes_stay_inside_the_image_after_every_augmentation(shared_data, config):
    kwargs = {"plain": {"augment": False}, "affine": {"hyp": STRONG},
              "mosaic": {"mosaic": True, "hyp": STRONG},
              "mosaic-seg": {"mosaic": True, "hyp": STRONG, "seg": True}}[config]
    data = dataset(shared_data, **kwargs)
    total = 0
    for index in range(len(data)):
        image, labels, segments = data[index]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert_boxes_inside(labels, segments)
        total += len(labels)
    assert total > 0  # not vacuous


def test_horizontal_flip_maps_xc_to_one_minus_xc_exactly():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    labels = np.column_stack([np.arange(5), rng.uniform(0.3, 0.7, (5, 2)), rng.uniform(0.1, 0.5, (5, 2))])
    flipped, out, _ = horizontal_flip(image, labels, rng, p=1.0)
    assert (out[:, 1] == 1.0 - labels[:, 1]).all()
    assert (out[:, [0, 2, 3, 4]] == labels[:, [0, 2, 3, 4]]).all()
    assert (flipped == image[:, ::-1]).all()
    same, kept, _ = horizontal_flip(image, labels, rng, p=0.0)
    assert same is image and kept is labels


def test_segments_follow_the_flip():
    triangle = np.array([[0.1, 0.2], [0.4, 0.2], [0.1, 0.6]])
    labels = np.array([[3, 0.25, 0.4, 0.3, 0.4]])
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    _, out, segments = horizontal_flip(image, labels, np.random.default_rng(0), 1.0, [triangle])
    np.testing.assert_array_equal(segments[0], [[0.9, 0.2], [0.6, 0.2], [0.9, 0.6]])
    assert_boxes_inside(out, segments)


def test_letterbox_square_puts_a_known_box_in_place():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[20:60, 40:120] = 255  # box x 40..120, y 20..60 of a 200 x 100 image
    labels = np.array([[1, 80 / 200, 40 / 100, 80 / 200, 40 / 100]])
    square = np.array([[0.2, 0.2], [0.6, 0.2], [0.6, 0.6], [0.2, 0.6]])
    out, boxes, segments = letterbox_square(image, labels, 100, [square])
    # Halved to 100 x 50 and padded by 25 rows on top: the box is x 20..60, y 35..55.
    np.testing.assert_allclose(boxes, [[1, 0.4, 0.45, 0.4, 0.2]], atol=1e-12)
    np.testing.assert_allclose(segments[0], [[0.2, 0.35], [0.6, 0.35], [0.6, 0.55], [0.2, 0.55]])
    assert out.shape == (100, 100, 3)
    assert (out[:25] == 114).all() and (out[75:] == 114).all()
    assert (out[35:55, 20:60] == 255).all() and (out[25:35] == 0).all() and (out[:, :20][25:75] == 0).all()


def test_random_affine_recomputes_boxes_from_clipped_polygons():
    rng = np.random.default_rng(1)
    image = np.full((64, 64, 3), 50, dtype=np.uint8)
    polygon = np.array([[0.05, 0.1], [0.9, 0.2], [0.5, 0.95]])
    low, high = polygon.min(0), polygon.max(0)
    labels = np.array([[0, *(low + high) / 2, *(high - low)]])
    for _ in range(20):
        out, boxes, segments = random_affine(image, labels, rng, degrees=45, translate=0.4,
                                             scale=0.8, border=-8, segments=[polygon])
        assert out.shape == (48, 48, 3)
        assert_boxes_inside(boxes, segments)


@pytest.mark.parametrize("seed", range(8))
def test_mosaic_has_the_output_size_and_keeps_every_visible_box(seed):
    size = 64
    shapes = [(64, 64), (40, 64), (64, 40), (64, 64)]  # (h, w)
    images = [np.full((h, w, 3), colour, dtype=np.uint8) for (h, w), colour in zip(shapes, COLOURS)]
    labels = [np.array([[k, 0.5, 0.5, 1.0, 1.0]]) for k in range(4)]
    whole = [np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)]  # the image outline
    rng = np.random.default_rng(seed)
    # No scale, translation or rotation: the affine is the centre crop, so colours stay exact.
    out, boxes, segments = mosaic4(images, labels, rng, size, 0, 0, 0, [whole] * 4)
    assert out.shape == (size, size, 3)
    assert_boxes_inside(boxes, segments)
    found = {int(row[0]): row[1:] for row in boxes}
    for k, colour in enumerate(COLOURS):
        rows, cols = np.nonzero((out == colour).all(axis=-1))
        if len(rows) == 0:
            assert k not in found
            continue
        x1, y1, x2, y2 = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
        if x2 - x1 > 2 and y2 - y1 > 2 and (x2 - x1) * (y2 - y1) > 0.1 * np.prod(shapes[k]):
            assert k in found, f"image {k} is visible at {(x1, y1, x2, y2)} but lost its box"
        if k in found:
            expected = np.array([x1 + x2, y1 + y2, 2 * (x2 - x1), 2 * (y2 - y1)]) / (2 * size)
            np.testing.assert_allclose(found[k], expected, atol=1e-9)
    mosaic_default = mosaic4(images, labels, rng, size)
    assert mosaic_default[0].shape == (size, size, 3)


def test_hsv_jitter_is_seeded_and_keeps_the_image_shape():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    a = hsv_jitter(image, np.random.default_rng(7))
    b = hsv_jitter(image, np.random.default_rng(7))
    assert a.shape == image.shape and a.dtype == np.uint8 and (a == b).all() and (a != image).any()
    assert (hsv_jitter(image, np.random.default_rng(7), 0, 0, 0) == image).all()


def test_same_seed_epoch_index_gives_the_same_sample(shared_data):
    data = dataset(shared_data, mosaic=True, seed=5, max_images=6)
    data.set_epoch(3)
    first = data[4]
    data.set_epoch(0)
    data[1]  # other samples in between change nothing
    data.set_epoch(3)
    again = data[4]
    fresh = dataset(shared_data, mosaic=True, seed=5, max_images=6).sample(4, 3)
    for other in (again, fresh):
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
    assert not torch.equal(first[0], data.sample(4, 4)[0])
    threaded = list(data.batches(3, epoch=2, workers=2))
    serial = list(data.batches(3, epoch=2, workers=0))
    assert len(threaded) == 2
    for (ia, ta, _), (ib, tb, _) in zip(threaded, serial):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)


def test_rank_shares_are_disjoint_and_cover_the_data(shared_data):
    data = dataset(shared_data, max_images=10)
    halves = [data.sampler_indices(1, rank, 2) for rank in range(2)]
    assert [len(h) for h in halves] == [5, 5] and not set(halves[0]) & set(halves[1])
    assert sorted(np.concatenate(halves)) == list(range(10))
    thirds = [data.sampler_indices(1, rank, 3) for rank in range(3)]
    assert [len(t) for t in thirds] == [4, 4, 4]  # 10 padded to 12 by wrap-around
    assert set(np.concatenate(thirds)) == set(range(10))
    order = np.random.default_rng((0, 1)).permutation(10)
    assert list(np.concatenate(thirds)) != list(order)  # shares interleave the order
    assert sorted(np.concatenate(thirds)) == sorted([*order, *order[:2]])
    assert list(data.sampler_indices(1, 0, 2)) == list(halves[0])
    assert list(data.sampler_indices(2, 0, 1)) != list(data.sampler_indices(1, 0, 1))
    assert list(data.sampler_indices(5, 1, 2, shuffle=False)) == [1, 3, 5, 7, 9]
    shares = [sum(len(images) for images, _, _ in data.batches(3, epoch=1, workers=0, rank=r,
                                                               world_size=2)) for r in range(2)]
    assert shares == [5, 5]


def test_collate_numbers_the_images(shared_data):
    data = dataset(shared_data, augment=False, max_images=4)
    batch = [data[i] for i in range(4)] + [(torch.zeros(3, 128, 128), torch.zeros(0, 5), None)]
    images, targets, segments = collate(batch)
    counts = [len(labels) for _, labels, _ in batch]
    assert images.shape == (5, 3, 128, 128) and segments is None
    assert targets.shape == (sum(counts), 6)
    assert targets[:, 0].tolist() == [float(i) for i, n in enumerate(counts) for _ in range(n)]
    assert torch.equal(targets[:, 1:], torch.cat([labels for _, labels, _ in batch]))


def test_without_augmentation_a_sample_is_the_letterboxed_image(shared_data):
    data = dataset(shared_data, augment=False, max_images=2)
    record = data.records[1]
    image, labels, _ = letterbox_square(read_resized(record.image, 128), record.labels, 128)
    got_image, got_labels, _ = data[1]
    assert torch.equal(got_image, torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert torch.equal(got_labels, torch.from_numpy(labels.astype(np.float32)))


def test_polygons_parse_into_boxes_and_segments(shared_data):
    data = dataset(shared_data, seg=True, augment=False, max_images=3)
    for record, polygons in zip(data.records, data.segments):
        lines = [ln.split() for ln in record.label_file.read_text().splitlines() if ln.strip()]
        assert len(polygons) == len(record.labels) == len(lines)
        np.testing.assert_array_equal(polygons[0].ravel(), [float(v) for v in lines[0][1:]])
        # COCO's boxes are the polygons' extents: the detection labels agree to rounding.
        boxes = parse_label_file(shared_data / "coco128" / "labels" / "train2017" /
                                 record.label_file.name, 80)
        key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
        np.testing.assert_allclose(key(record.labels), key(boxes), atol=1e-5)
    samples = [data[0], data[1]]
    _, targets, segments = collate(samples)
    assert [len(s) for s in segments] == [len(labels) for _, labels, _ in samples]
    assert len(targets) == sum(len(s) for s in segments)


def test_a_bad_polygon_line_names_file_and_line(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (32, 24)).save(tmp_path / "images" / "train" / "a.png")
    label = tmp_path / "labels" / "train" / "a.txt"
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [a, b]\n")
    label.write_text("0 0.1 0.1 0.5 0.1 0.3 0.6\n1 0.2 0.2 0.4\n")
    with pytest.raises(DatasetError, match=rf"{label}:2: expected 'cls x1 y1"):
        TrainDataset(tmp_path / "data.yaml", segments=True)
    label.write_text("0 0.1 0.1 0.5 0.1 0.3 0.6\n\n1 0.2 0.2 0.4 1.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=rf"{label}:3: coordinates"):
        parse_polygon_file(label, 2)
    label.write_text("2 0.1 0.1 0.5 0.1 0.3 0.6\n")
    with pytest.raises(DatasetError, match=rf"{label}:1: class id 2"):
        parse_polygon_file(label, 2)
    label.write_text("1 0.1 0.1 0.5 0.1 0.3 0.6\n")
    boxes, polygons = parse_polygon_file(label, 2)
    np.testing.assert_allclose(boxes, [[1, 0.3, 0.35, 0.4, 0.5]])
    assert TrainDataset(tmp_path / "data.yaml", imgsz=32, segments=True)[0][2][0].shape == (3, 2)
