"""YOLO-format dataset reading, letterbox and rectangular batches (YOLOv5 val semantics)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from yoloq.tools.data import (DatasetError, ImageRecord, Letterbox, YoloDataset, batch_shapes,
                              label_path_for, letterbox, load_data_config)

# name -> (PIL mode, width, height, label lines or None for no label file)
SYNTHETIC = {
    "wide.jpg": ("RGB", 640, 480, ["0 0.5 0.5 0.5 0.5", "1 0.25 0.25 0.3 0.2"]),
    "tall.png": ("L", 300, 500, ["2 0.5 0.4 0.6 0.5"]),  # greyscale
    "square.png": ("RGBA", 200, 200, ["1 0.5 0.5 0.8 0.8"]),
    "odd.jpg": ("RGB", 640, 427, ["0 0.3 0.5 0.4 0.6", "2 0.7 0.5 0.3 0.4"]),
    "background.jpg": ("RGB", 320, 240, None),  # no label file
    "empty.jpg": ("RGB", 100, 160, []),  # empty label file: also background
}


def make_dataset(root: Path, images: dict = SYNTHETIC, names=("person", "bicycle", "car")) -> Path:
    """Write a tiny YOLO dataset (random pixels) under root; return its data.yaml."""
    rng = np.random.default_rng(0)
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for name, (mode, width, height, lines) in images.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(root / "images" / "val" / name)
        if lines is not None:
            (root / "labels" / "val" / name).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    names_yaml = "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
    (root / "data.yaml").write_text(f"path: .\ntrain: images/val\nval: images/val\nnames:\n{names_yaml}")
    return root / "data.yaml"


def test_config_resolves_paths_against_yaml_folder_and_path_key(tmp_path):
    (tmp_path / "sub").mkdir()
    yaml_file = tmp_path / "sub" / "data.yaml"
    yaml_file.write_text("path: ../ds\nval: images/val\nnames: [a, b]\n")
    config = load_data_config(yaml_file)
    assert config.val == ((tmp_path / "ds" / "images" / "val").resolve(),)
    assert config.names == ("a", "b") and config.nc == 2
    yaml_file.write_text("val: [x, y]\nnames: {0: a, 1: b}\nnc: 2\n")
    assert load_data_config(yaml_file).val == (tmp_path / "sub" / "x", tmp_path / "sub" / "y")


def test_config_errors_name_the_problem(tmp_path):
    yaml_file = tmp_path / "data.yaml"
    yaml_file.write_text("val: images\nnames: [a, b]\nnc: 3\n")
    with pytest.raises(DatasetError, match="nc is 3 but 'names' lists 2"):
        load_data_config(yaml_file)
    yaml_file.write_text("val: images\n")
    with pytest.raises(DatasetError, match="no 'names'"):
        load_data_config(yaml_file)
    with pytest.raises(DatasetError, match="not found"):
        load_data_config(tmp_path / "missing.yaml")


def test_label_path_swaps_the_last_images_folder():
    assert label_path_for(Path("/d/images/x/images/val/a.b.jpg")) == Path("/d/images/x/labels/val/a.b.txt")


def test_dataset_reads_images_labels_and_background(tmp_path):
    dataset = YoloDataset(make_dataset(tmp_path), imgsz=320, rect=False)
    assert len(dataset) == 6 and dataset.num_background == 2
    by_name = {r.image.name: r for r in dataset.records}
    assert by_name["wide.jpg"].labels.shape == (2, 5) and by_name["background.jpg"].labels.shape == (0, 5)
    assert (by_name["tall.png"].width, by_name["tall.png"].height) == (300, 500)
    assert sorted(dataset.image_ids.values()) == list(range(6))
    for images, records, boxes_maps in dataset.batches():
        assert images.shape == (1, 3, 320, 320) and images.dtype == torch.float32
        assert 0.0 <= images.min() and images.max() <= 1.0


def test_greyscale_and_rgba_become_rgb(tmp_path):
    dataset = YoloDataset(make_dataset(tmp_path), imgsz=64, rect=False)
    for index, record in enumerate(dataset.records):
        image, _ = dataset.load(index, (64, 64))
        assert image.shape == (64, 64, 3), record.image.name
    grey = next(i for i, r in enumerate(dataset.records) if r.image.name == "tall.png")
    image, boxes_map = dataset.load(grey, (64, 64))
    inner = image[:, round(boxes_map.pad[0]):64 - round(boxes_map.pad[0])]
    assert (inner[..., 0] == inner[..., 1]).all()  # grey stays grey in all three channels


def test_letterbox_matches_yolov5_val_shapes_and_padding():
    # a 640x427 image at imgsz 640, batch 1, rect: shape ceil(427/640*20 + .5)*32 = 448 by 672
    assert batch_shapes([_record(640, 427)], 640, 1) == [(448, 672)]
    canvas, boxes_map = letterbox(np.zeros((427, 640, 3), np.uint8), (448, 672), (427, 640))
    assert boxes_map.pad == (16.0, 10.5) and boxes_map.gain == 1.0
    assert (canvas[:10] == 114).all() and (canvas[10:437, 16:656] == 0).all()
    assert (canvas[437:] == 114).all()  # YOLOv5 puts the odd row at the bottom


def test_rect_batches_share_one_shape_from_their_aspect_range():
    records = [_record(640, 480), _record(640, 427), _record(500, 640), _record(640, 640)]
    records.sort(key=lambda r: r.height / r.width)
    # batch 0: h/w in [0.667, 0.75] -> [0.75, 1]; batch 1: [1, 1.28] -> [1, 1]
    assert batch_shapes(records, 640, 2) == [(512, 672), (672, 672)]


def test_rect_dataset_sorts_by_aspect_ratio(tmp_path):
    dataset = YoloDataset(make_dataset(tmp_path), imgsz=320, batch=2)
    aspects = [r.height / r.width for r in dataset.records]
    assert aspects == sorted(aspects) and dataset.num_batches() == 3
    shapes = [tuple(images.shape[2:]) for images, _, _ in dataset.batches()]
    assert shapes == dataset.shapes and all(h % 32 == 0 and w % 32 == 0 for h, w in shapes)


def test_boxes_map_back_to_original_pixels():
    boxes_map = Letterbox(original_hw=(427, 640), gain=0.5, pad=(16.0, 10.5))
    boxes = torch.tensor([[16.0, 10.5, 336.0, 224.0], [0, 0, 1000, 1000]])
    assert boxes_map.to_original(boxes).tolist() == [[0, 0, 640, 427], [0, 0, 640, 427]]


@pytest.mark.parametrize("line, message", [
    ("3 0.5 0.5 0.1 0.1", r"b\.txt:2: class id 3 is not in 0..2"),
    ("1.5 0.5 0.5 0.1 0.1", r"b\.txt:2: class id 1.5"),
    ("0 0.5 0.5 0.1", r"b\.txt:2: expected 'cls xc yc w h', got 4 values"),
    ("0 0.5 zero 0.1 0.1", r"b\.txt:2: not numbers"),
    ("0 0.5 0.5 1.1 0.1", r"b\.txt:2: coordinates must be normalised"),
])
def test_bad_label_line_names_file_and_line(tmp_path, line, message):
    images = {"a.jpg": ("RGB", 64, 64, ["0 0.5 0.5 0.2 0.2"]),
              "b.jpg": ("RGB", 64, 64, ["0 0.5 0.5 0.2 0.2", line])}
    with pytest.raises(DatasetError, match=message):
        YoloDataset(make_dataset(tmp_path, images))


def test_corrupt_image_names_the_file(tmp_path):
    yaml_file = make_dataset(tmp_path, {"a.jpg": ("RGB", 64, 64, [])})
    (tmp_path / "images" / "val" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match=r"bad\.jpg: corrupt or unreadable image"):
        YoloDataset(yaml_file)


def test_missing_labels_folder_names_the_expected_path(tmp_path):
    yaml_file = make_dataset(tmp_path, {"a.jpg": ("RGB", 64, 64, None)})
    (tmp_path / "labels" / "val").rmdir()
    with pytest.raises(DatasetError, match=f"{tmp_path / 'labels' / 'val'}: labels folder not found"):
        YoloDataset(yaml_file)


def test_coco128_as_the_official_loader_sees_it(shared_data):
    dataset = YoloDataset(shared_data / "coco128" / "data.yaml", imgsz=640, batch=1)
    assert len(dataset) == 128 and dataset.num_background == 2
    assert sum(len(r.labels) for r in dataset.records) == 929  # orphan label files are ignored
    grey = next(i for i, r in enumerate(dataset.records) if r.image.name == "000000000086.jpg")
    image, _ = dataset.load(grey, dataset.shapes[grey])
    assert image.ndim == 3 and image.shape[2] == 3


def _record(width: int, height: int):
    return ImageRecord(Path("x.jpg"), Path("x.txt"), width, height, np.zeros((0, 5)))
