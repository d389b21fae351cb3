"""YOLOv5 / YOLOv5-seg architecture: sizes, state-dict layout, head outputs, the zoo table."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from yoloq.models.yolov5 import DEFAULT_ANCHORS
from yoloq.models.zoo import BUILDERS, build

# Unfused parameter counts (Conv + BN as trained). n: ../shared/data/SOURCES.md (yolov5n.pt) and
# the official model summary; s, m, l, x: the official training-time model summaries
# ("YOLOv5s summary: ... 7235389 parameters", "YOLOv5l summary: 368 layers, 46563709 parameters"),
# all four also listed in the flexible-yolov5 README table. Seg: computed here, no public figure
# found for the unfused count (the fused ones below are public).
UNFUSED = {
    "yolov5n": 1_872_157, "yolov5s": 7_235_389, "yolov5m": 21_190_557, "yolov5l": 46_563_709, "yolov5x": 86_749_405,
    "yolov5n-seg": 1_991_549, "yolov5s-seg": 7_621_277, "yolov5m-seg": 21_990_397,
    "yolov5l-seg": 47_924_957, "yolov5x-seg": 88_819_517,
}
# Counts after folding each BN into its conv (BN weight+bias -> one conv bias), as printed by the
# official code after "Fusing layers..." (README table, val.py / export.py logs of the v6.0-v7.0
# release weights): yolov5m 21172173, yolov5l 46533693, yolov5x 86705005, yolov5s 7225885,
# yolov5n-seg 1986637, yolov5s-seg 7611485, yolov5m-seg 21971597. The remaining three are computed.
FUSED = {
    "yolov5n": 1_867_405, "yolov5s": 7_225_885, "yolov5m": 21_172_173, "yolov5l": 46_533_693, "yolov5x": 86_705_005,
    "yolov5n-seg": 1_986_637, "yolov5s-seg": 7_611_485, "yolov5m-seg": 21_971_597,
    "yolov5l-seg": 47_894_397, "yolov5x-seg": 88_774_445,
}


def _counts(model: nn.Module) -> tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return params, params - bn_channels


@pytest.mark.parametrize("name", ["yolov5n", "yolov5s", "yolov5n-seg", "yolov5s-seg"])
def test_parameter_counts_small(name):
    assert _counts(build(name)) == (UNFUSED[name], FUSED[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov5m", "yolov5l", "yolov5x", "yolov5m-seg", "yolov5l-seg", "yolov5x-seg"])
def test_parameter_counts_large(name):
    assert _counts(build(name)) == (UNFUSED[name], FUSED[name])


def test_state_dict_layout_matches_official_names():
    keys = build("yolov5n").state_dict().keys()
    for key in ("model.0.conv.weight", "model.0.bn.running_var", "model.2.m.0.cv2.conv.weight",
                "model.9.cv2.bn.bias", "model.24.anchors", "model.24.m.2.bias"):
        assert key in keys
    assert not any("stride" in k or "grid" in k for k in keys), "stride/grids are not state in official files"
    assert len(keys) == 349
    seg = build("yolov5s-seg").state_dict()
    assert seg["model.24.proto.cv1.conv.weight"].shape == (128, 128, 3, 3)  # npr = 256 * width 0.5
    assert seg["model.24.m.0.weight"].shape == (3 * (5 + 80 + 32), 128, 1, 1)


def test_layer_shapes_follow_scaling():
    sd = build("yolov5m").state_dict()
    assert sd["model.0.conv.weight"].shape == (48, 3, 6, 6)  # 64 * 0.75
    assert sum(k.endswith("cv1.conv.weight") and k.startswith("model.6.m.") for k in sd) == 6  # 9 * 0.67
    assert sd["model.24.m.2.weight"].shape == (255, 768, 1, 1)


def test_batchnorm_uses_yolov5_hyperparameters():
    bn = build("yolov5n").model[0].bn
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)


def test_anchors_stored_in_grid_units():
    model = build("yolov5n")
    head = model.model[-1]
    pixels = torch.tensor(DEFAULT_ANCHORS, dtype=torch.float32).view(3, 3, 2)
    torch.testing.assert_close(head.anchors, pixels / torch.tensor([8.0, 16.0, 32.0]).view(-1, 1, 1))
    torch.testing.assert_close(model.anchors, pixels)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]


def test_eval_and_train_outputs():
    model = build("yolov5n", nc=3).eval()
    x = torch.rand(2, 3, 160, 224)
    with torch.no_grad():
        decoded, raw = model(x)
    cells = sum((160 // s) * (224 // s) for s in (8, 16, 32))
    assert decoded.shape == (2, 3 * cells, 8)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 20, 28, 8), (2, 3, 10, 14, 8), (2, 3, 5, 7, 8)]
    model.train()
    assert [tuple(r.shape) for r in model(x)] == [tuple(r.shape) for r in raw]


def test_segment_outputs():
    model = build("yolov5n-seg", nc=2).eval()
    with torch.no_grad():
        decoded, protos, raw = model(torch.rand(1, 3, 128, 128))
    assert decoded.shape == (1, 3 * (16 * 16 + 8 * 8 + 4 * 4), 5 + 2 + 32)
    assert protos.shape == (1, 32, 32, 32)
    assert raw[0].shape == (1, 3, 16, 16, 39)


def test_zero_logits_decode_to_cell_centres_and_anchors():
    """sigmoid(0) = 0.5: centre offset 2*0.5-0.5 = 0.5 cell, size (2*0.5)^2 = 1 anchor."""
    model = build("yolov5n", nc=1).eval()
    for conv in model.model[-1].m:
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    with torch.no_grad():
        decoded, _ = model(torch.rand(1, 3, 64, 96))
    p3 = decoded[0, : 3 * 8 * 12].view(3, 8, 12, 6)  # level P3: 3 anchors x 8 x 12 cells
    assert p3[0, 2, 5, :2].tolist() == [(5 + 0.5) * 8, (2 + 0.5) * 8]
    assert p3[1, 0, 0, 2:4].tolist() == [16.0, 30.0]
    assert torch.all(p3[..., 4:] == 0.5)


def test_segment_mask_coefficients_are_not_squashed():
    model = build("yolov5n-seg", nc=1).eval()
    with torch.no_grad():
        decoded, _, raw = model(torch.rand(1, 3, 64, 64))
    torch.testing.assert_close(decoded[0, :3 * 64, 6:], raw[0][0].reshape(-1, 38)[:, 6:])


def test_new_input_size_rebuilds_the_grid():
    model = build("yolov5n", nc=1).eval()
    with torch.no_grad():
        small, _ = model(torch.rand(1, 3, 64, 64))
        large, _ = model(torch.rand(1, 3, 128, 64))
    assert small.shape[1] * 2 == large.shape[1]
    assert large[0, :, 1].max() > 64  # centres reach the lower half of the taller image


def test_zoo_table():
    assert {f"yolov5{s}{t}" for s in "nsmlx" for t in ("", "-seg")} <= set(BUILDERS)
    assert build("yolov5n", nc=20).model[-1].m[0].out_channels == 3 * 25
    with pytest.raises(ValueError, match="unknown model 'yolov9z'.*yolov5n, yolov5s"):
        build("yolov9z")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov5n", "yolov5n-seg"])
def test_fresh_model_is_capturable(name):
    from yoloq.passes.capture import capture

    torch.manual_seed(0)
    model = build(name).eval()
    x = torch.rand(1, 3, 256, 256)
    captured = capture(model, x)
    with torch.no_grad():
        torch.testing.assert_close(captured(x), model(x), atol=1e-4, rtol=1e-4)
