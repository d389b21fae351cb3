"""HeadLayout: raw head outputs of each family arranged into its loss layout, found by the head table."""
from __future__ import annotations

import pytest
import torch

from yoloq.models.tiny import tiny_yolo
from yoloq.models.zoo import build
from yoloq.passes.capture import capture
from yoloq.tools.heads import HeadLayout, HeadLayoutError

pytestmark = pytest.mark.usefixtures("one_thread")


def raw_outputs(model, size=64):
    return capture(model.eval(), torch.rand(1, 3, size, size)).graph_module(torch.rand(2, 3, size, size))


@pytest.mark.parametrize("name, kind, levels, seg", [
    ("yolov5n", "anchor", [(2, 3, 8, 8, 85), (2, 3, 4, 4, 85), (2, 3, 2, 2, 85)], False),
    ("yolov5n-seg", "anchor", [(2, 3, 8, 8, 117), (2, 3, 4, 4, 117), (2, 3, 2, 2, 117)], True),
    ("yolov8n", "dfl", [(2, 144, 8, 8), (2, 144, 4, 4), (2, 144, 2, 2)], False),
    ("yolov8n-seg", "dfl", [(2, 144, 8, 8), (2, 144, 4, 4), (2, 144, 2, 2)], True),
    ("yolov7-tiny", "anchor", [(2, 3, 8, 8, 85), (2, 3, 4, 4, 85), (2, 3, 2, 2, 85)], False),
])
def test_zoo_heads_arrange_into_loss_layout(name, kind, levels, seg):
    model = build(name)
    layout = HeadLayout.from_model(model)
    assert layout.kind == kind and layout.nc == 80 and layout.strides == (8.0, 16.0, 32.0)
    assert layout.segmentation == seg
    arranged = layout.arrange(raw_outputs(model))
    assert [tuple(p.shape) for p in arranged.preds] == levels
    if seg:
        assert arranged.protos.shape == (2, 32, 16, 16)
    if seg and kind == "dfl":
        assert [tuple(c.shape) for c in arranged.coefs] == [(2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]


def test_anchor_layout_matches_the_eager_training_output():
    model = build("yolov5n")
    x = torch.rand(2, 3, 64, 64)
    arranged = HeadLayout.from_model(model).arrange(capture(model.eval(), x[:1]).graph_module(x))
    eager = model.eval()(x)[1]  # YOLOv5's (decoded, raw): raw levels in training layout
    for ours, theirs in zip(arranged.preds, eager):
        torch.testing.assert_close(ours, theirs)


def test_pixel_anchors_and_dfl_bins_read_from_the_head():
    layout = HeadLayout.from_model(build("yolov5n"))
    assert layout.anchors_px[0][0] == (10.0, 13.0) and layout.anchors_px[2][2] == (373.0, 326.0)
    tiny = HeadLayout.from_model(tiny_yolo())
    assert tiny.kind == "dfl" and tiny.reg_max == 4 and tiny.strides == (8.0, 16.0)  # it also caches 'anchors'


def test_channel_order_falls_back_to_counts_and_errors_name_the_head():
    layout = HeadLayout("dfl", nc=3, strides=(8.0,), module="head", reg_max=2)
    box, cls = torch.rand(1, 8, 4, 4), torch.rand(1, 3, 4, 4)
    swapped = layout.arrange([cls, box]).preds[0]
    torch.testing.assert_close(swapped, torch.cat((box, cls), 1))
    with pytest.raises(HeadLayoutError, match=r"head: a level has tensors with \[8, 5\] channels"):
        layout.arrange([box, torch.rand(1, 5, 4, 4)])
    with pytest.raises(HeadLayoutError, match="2 output grid sizes"):
        layout.arrange([box, cls, torch.rand(1, 8, 2, 2)])
    with pytest.raises(HeadLayoutError, match="no detection module"):
        HeadLayout.from_model(torch.nn.Conv2d(3, 3, 1))
