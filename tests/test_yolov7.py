"""YOLOv7 / YOLOv7-tiny: sizes against the official figures, state-dict layout, RepConv
re-parameterisation, head outputs, checkpoint round trip through the official layout, capture."""
from __future__ import annotations

import copy

import numpy
import pytest
from conftest import official_stand_ins
import torch
from torch import nn

from yoloq.models.checkpoint import UnknownArchitectureError, load
from yoloq.models.yolov7 import YOLOv7
from yoloq.models.yolov7_blocks import RepConv
from yoloq.models.zoo import build

# Parameter counts, nc=80. "training" is the cfg/training model (IDetect head, RepConv branches,
# BN unfused): computed here, no printed figure found. "detect_head" drops the 2,557 (yolov7) /
# 1,661 (tiny) ImplicitA/M parameters, i.e. the cfg/deploy model (plain Detect) as built: the
# official code prints 37,620,125 for it (WongKinYiu/yolov7 issue #504, `models/yolo.py --cfg
# cfg/deploy/yolov7.yaml`). "deployed" additionally folds every BN and re-parameterises RepConv:
# 36,905,341 and 6,219,709, the README's 36.9M and 6.2M.
COUNTS = {
    "yolov7": {"training": 37_622_682, "detect_head": 37_620_125, "deployed": 36_905_341},
    "yolov7-tiny": {"training": 6_228_762, "detect_head": 6_227_101, "deployed": 6_219_709},
}


def _counts(model: YOLOv7) -> dict[str, int]:
    head = model.model[-1]
    implicit = sum(p.numel() for p in (*head.ia.parameters(), *head.im.parameters()))
    training = sum(p.numel() for p in model.parameters())
    model = copy.deepcopy(model).fuse_repvgg()
    # Folding a BN into its conv trades the BN's weight and bias for one conv bias per channel.
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    deployed = sum(p.numel() for p in model.parameters()) - bn_channels - implicit
    return {"training": training, "detect_head": training - implicit, "deployed": deployed}


def test_parameter_counts_tiny():
    assert _counts(build("yolov7-tiny")) == COUNTS["yolov7-tiny"]


@pytest.mark.slow
def test_parameter_counts_yolov7():
    assert _counts(build("yolov7")) == COUNTS["yolov7"]


@pytest.fixture(scope="module")
def yolov7_model() -> YOLOv7:
    torch.manual_seed(0)
    return build("yolov7", nc=80)


def test_state_dict_layout_matches_official_names(yolov7_model):
    sd = yolov7_model.state_dict()
    for key in ("model.0.conv.weight", "model.11.bn.running_var", "model.51.cv7.conv.weight", "model.51.cv1.bn.bias",
                "model.102.rbr_dense.0.weight", "model.104.rbr_1x1.1.running_mean", "model.105.ia.0.implicit",
                "model.105.im.2.implicit", "model.105.m.0.weight", "model.105.anchors", "model.105.anchor_grid"):
        assert key in sd, key
    assert len(yolov7_model.model) == 106 and not any("rbr_identity" in k or "stride" in k for k in sd)
    assert sd["model.105.ia.2.implicit"].shape == (1, 1024, 1, 1)
    assert sd["model.105.im.0.implicit"].shape == (1, 255, 1, 1)
    assert sd["model.105.anchor_grid"].shape == (3, 1, 3, 1, 1, 2)
    assert sd["model.104.rbr_dense.0.weight"].shape == (1024, 512, 3, 3)


def test_tiny_layout_and_activation():
    model = build("yolov7-tiny", nc=3)
    sd = model.state_dict()
    assert len(model.model) == 78 and "model.77.ia.1.implicit" in sd
    assert sd["model.76.conv.weight"].shape == (512, 256, 3, 3)
    assert sd["model.77.m.2.weight"].shape == (3 * 8, 512, 1, 1)
    assert {type(m.act) for m in model.modules() if hasattr(m, "bn")} == {nn.LeakyReLU}
    assert model.model[0].act.negative_slope == 0.1


def test_anchors_and_batchnorm(yolov7_model):
    torch.testing.assert_close(yolov7_model.anchors[2], torch.tensor([[142.0, 110], [192, 243], [459, 401]]))
    head = yolov7_model.model[-1]
    torch.testing.assert_close(head.anchor_grid.view(3, 3, 2), yolov7_model.anchors)
    assert head.anchors[0, 0].tolist() == [12 / 8, 16 / 8]
    assert yolov7_model.stride.tolist() == [8.0, 16.0, 32.0]
    assert build("yolov7-tiny").anchors[0, 0].tolist() == [10.0, 13.0]  # tiny keeps YOLOv5's anchors
    bns = [m for m in yolov7_model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {(bn.eps, bn.momentum) for bn in bns} == {(1e-3, 0.03)}


def test_eval_and_train_outputs():
    model = build("yolov7-tiny", nc=2).eval()
    x = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        decoded, raw = model(x)
    assert decoded.shape == (2, 3 * (12 * 20 + 6 * 10 + 3 * 5), 7)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 12, 20, 7), (2, 3, 6, 10, 7), (2, 3, 3, 5, 7)]
    model.train()
    assert [tuple(r.shape) for r in model(x)] == [tuple(r.shape) for r in raw]


def test_implicit_layers_shape_the_raw_output():
    """raw = im * (conv(x + ia)), as the official IDetect computes it."""
    model = build("yolov7-tiny", nc=1).eval()
    head = model.model[-1]
    feats = [torch.rand(1, c, 4, 4) for c in (128, 256, 512)]
    with torch.no_grad():
        _, raw = head(feats)
        expected = head.im[1].implicit * head.m[1](feats[1] + head.ia[1].implicit)
    torch.testing.assert_close(raw[1], expected.view(1, 3, 6, 4, 4).permute(0, 1, 3, 4, 2))


def _randomise_bn(module: nn.Module) -> None:
    for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("c_in, c_out, s, g", [(8, 8, 1, 1), (8, 8, 1, 2), (8, 16, 1, 1), (8, 16, 2, 1), (8, 8, 2, 4)])
def test_repconv_fusion_gives_identical_outputs(c_in, c_out, s, g):
    torch.manual_seed(0)
    block = RepConv(c_in, c_out, 3, s, g=g).eval()
    assert (block.rbr_identity is not None) == (c_in == c_out and s == 1)
    _randomise_bn(block)
    x = torch.randn(2, c_in, 9, 11)
    with torch.no_grad():
        before = block(x)
        block.fuse_repvgg_block()
        after = block(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert set(block.state_dict()) == {"rbr_reparam.weight", "rbr_reparam.bias"}
    block.fuse_repvgg_block()  # a second call is a no-op
    torch.testing.assert_close(block(x), after)


def test_repconv_rejects_other_kernels():
    with pytest.raises(ValueError, match="3x3 kernels only"):
        RepConv(4, 4, k=1)


@pytest.mark.slow
def test_reparameterised_model_matches(yolov7_model):
    model = copy.deepcopy(yolov7_model).eval()
    _randomise_bn(model)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        before = model(x)[0]
        after = model.fuse_repvgg()(x)[0]
    torch.testing.assert_close(after, before, atol=1e-3, rtol=1e-4)


def test_zoo_builds_by_name():
    assert build("yolov7-tiny", nc=20).model[-1].m[0].out_channels == 3 * 25


# Official class paths of yoloq's blocks (WongKinYiu/yolov7 keeps YOLOv5's module layout).
OFFICIAL = {"YOLOv7": "models.yolo.Model", "IDetect": "models.yolo.IDetect",
            **{n: f"models.common.{n}" for n in ("Conv", "Concat", "MP", "SP", "SPPCSPC", "RepConv",
                                                 "ImplicitA", "ImplicitM")}}


@pytest.fixture
def official_classes(monkeypatch):
    """Stand-ins for the official modules, importable only while the test runs."""
    return official_stand_ins(monkeypatch, OFFICIAL)


def _save_official_style(model: nn.Module, classes: dict, path, **model_attrs) -> None:
    model = copy.deepcopy(model).half()
    for m in model.modules():
        if type(m).__name__ in classes:
            m.__class__ = classes[type(m).__name__]
    model.__dict__.update(stride=torch.tensor([8.0, 16.0, 32.0]), **model_attrs)
    # YOLOv7's strip_optimizer keeps best_fitness, an ndarray; training_results is text.
    ckpt = {"epoch": -1, "best_fitness": numpy.array([0.51]), "training_results": "", "model": model, "ema": None}
    torch.save(ckpt, path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov7-tiny", "yolov7"])
def test_round_trip_through_official_layout(tmp_path, official_classes, name):
    torch.manual_seed(0)
    ours = build(name, nc=3).eval()
    _randomise_bn(ours)
    path = tmp_path / f"{name}.pt"
    _save_official_style(ours, official_classes, path, names=["a", "b", "c"], yaml={"nc": 3})
    loaded = load(path)
    assert isinstance(loaded, YOLOv7) and loaded.variant == name and loaded.names == ["a", "b", "c"]
    expected_state = ours.half().float().state_dict()  # the file holds fp16 weights
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(loaded_state[key], value), key
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x))


def test_unknown_yolov7_layout(tmp_path, official_classes):
    model = build("yolov7-tiny", nc=2)
    del model.model[30]
    path = tmp_path / "odd.pt"
    _save_official_style(model, official_classes, path)
    with pytest.raises(UnknownArchitectureError, match=r"odd\.pt: unknown layer sequence .*yolov7-tiny"):
        load(path)


def _check_capture(model: nn.Module) -> None:
    from yoloq.passes.capture import capture
    from yoloq.pipeline import build_pipeline, run_pipeline

    captured = capture(model, torch.rand(1, 3, 320, 320))
    inputs = [torch.rand(1, 3, 320, 320), torch.rand(1, 3, 256, 320)]
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(captured(x), model(x), atol=1e-4, rtol=1e-4)
        fused, records = run_pipeline(captured.graph_module, build_pipeline("fused"))
        stats = {r.name: r.stats for r in records}
        assert stats["fold_implicit"]["folded"] == 6  # ImplicitA / ImplicitM of the three head levels
        assert stats["fold_conv_bn"]["folded"] > 0 and stats["fuse_conv_act"]["fused"] > 0
        for x in inputs:
            torch.testing.assert_close(captured.decoder(fused(x)), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov7-tiny", "yolov7"])
def test_fresh_model_is_capturable(name):
    torch.manual_seed(0)
    _check_capture(build(name).eval())


@pytest.mark.slow
def test_reparameterised_model_is_capturable():
    torch.manual_seed(0)
    _check_capture(build("yolov7").eval().fuse_repvgg())
