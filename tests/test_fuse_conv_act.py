import pytest
import torch
from torch import nn

import yoloq
from yoloq.models.tiny import TINY_MODELS
from yoloq.passes.fuse_conv_act import FusedConv2d, is_pointwise
from conftest import assert_outputs_close

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _structure(gm):
    return [
        (n.op, type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else str(n.target))
        for n in gm.graph.nodes
    ]


def _fused(name, fold=True):
    model = TINY_MODELS[name]()
    captured = yoloq.capture(model, X)
    gm, records = yoloq.run_pipeline(captured.graph_module, yoloq.build_pipeline("fused" if fold else "captured"))
    if not fold:
        gm = yoloq.fuse_conv_act(gm).gm
    captured.graph_module = gm
    return model, captured, records


def test_golden_structure():
    _, captured, records = _fused("conv-bn-act")
    gm = captured.graph_module
    assert _structure(gm) == [
        ("placeholder", "input"),
        ("call_module", "FusedConv2d"),
        ("call_module", "FusedConv2d"),
        ("call_module", "Conv2d"),
        ("output", "output"),
    ]
    assert records[-1].stats == {"fused": 2, "by_activation": {"SiLU": 1, "LeakyReLU": 1}}
    first = gm.get_submodule("0.conv")
    assert isinstance(first, nn.Conv2d) and first.activation == "SiLU" and first.bn is None
    assert "0.conv.weight" in gm.state_dict()  # the conv keeps its name and keys


def test_unfolded_bn_is_kept_inside_the_unit():
    model, captured, _ = _fused("conv-bn-act", fold=False)
    unit = captured.graph_module.get_submodule("0.conv")
    assert isinstance(unit, FusedConv2d) and isinstance(unit.bn, nn.BatchNorm2d)
    assert_outputs_close(captured(X), model(X), atol=1e-6)


@pytest.mark.parametrize("name", ["conv-bn-act", "tiny-yolo"])
def test_numerics_unchanged(name):
    model, captured, _ = _fused(name)
    assert_outputs_close(captured(X), model(X), atol=1e-5)


@pytest.mark.parametrize(
    "name, reason",
    [("conv-softmax", "Softmax is not pointwise"), ("conv-two-bns", "not followed by a single activation")],
)
def test_must_not_fire(name, reason):
    model, captured, records = _fused(name)
    assert records[-1].stats["fused"] == 0 and not records[-1].modified
    assert any(reason in note for note in records[-1].notes), records[-1].notes
    assert not any(isinstance(m, FusedConv2d) for m in captured.graph_module.modules())
    assert_outputs_close(captured(X), model(X), atol=1e-6)


def test_idempotent():
    _, captured, _ = _fused("tiny-yolo")
    before = _structure(captured.graph_module)
    again = yoloq.fuse_conv_act(captured.graph_module)
    assert not again.modified and _structure(again.gm) == before
    assert yoloq.fuse_conv_act.ensures(again.gm) is None


@pytest.mark.parametrize(
    "module, expected",
    [
        (nn.SiLU(), True), (nn.LeakyReLU(0.1), True), (nn.ReLU(), True), (nn.ReLU6(), True),
        (nn.Hardswish(), True), (nn.Identity(), True), (nn.GELU(), True), (nn.Mish(), True),
        (nn.Softmax(dim=1), False), (nn.MaxPool2d(2), False), (nn.BatchNorm2d(3), False),
        (nn.PReLU(), False), (nn.Upsample(scale_factor=2), False), (nn.Dropout(0.5).eval(), True),
    ],
)
def test_pointwise_is_decided_generically(module, expected):
    assert is_pointwise(module) is expected
