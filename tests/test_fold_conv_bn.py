import pytest
import torch
from torch import nn

import yoloq
from yoloq.models.tiny import TINY_MODELS
from conftest import assert_outputs_close

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _structure(gm):
    return [
        (n.op, type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else str(n.target))
        for n in gm.graph.nodes
    ]


def _run(name):
    model = TINY_MODELS[name]()
    captured = yoloq.capture(model, X)
    result = yoloq.fold_conv_bn(captured.graph_module)
    result.gm.recompile()
    return model, captured, result


def test_golden_structure():
    _, captured, result = _run("conv-bn-act")
    assert _structure(result.gm) == [
        ("placeholder", "input"),
        ("call_module", "Conv2d"), ("call_module", "SiLU"),
        ("call_module", "Conv2d"), ("call_module", "LeakyReLU"),
        ("call_module", "Conv2d"),
        ("output", "output"),
    ]
    assert result.modified and result.stats == {"folded": 2, "kept": 0}
    conv = result.gm.get_submodule("0.conv")
    assert conv.bias is not None and not hasattr(result.gm.get_submodule("0"), "bn")
    assert {n.meta["yoloq.origin"] for n in result.gm.graph.nodes if n.op == "call_module" and "conv" in n.target} == {
        "fold_conv_bn"
    }


@pytest.mark.parametrize("name", ["conv-bn-act", "tiny-yolo"])
def test_numerics_unchanged(name):
    model, captured, result = _run(name)
    captured.graph_module = result.gm
    assert_outputs_close(captured(X), model(X), atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.gm.modules())


@pytest.mark.parametrize(
    "name, reason",
    [
        ("conv-two-bns", "conv conv has 2 users"),
        ("bn-after-pool", "input is not a Conv2d"),
        ("bn-without-running-stats", "BN does not track running statistics"),
    ],
)
def test_must_not_fire(name, reason):
    model, captured, result = _run(name)
    assert not result.modified and result.stats["folded"] == 0
    assert any(reason in note for note in result.notes), result.notes
    assert any(isinstance(m, nn.BatchNorm2d) for m in result.gm.modules())
    captured.graph_module = result.gm
    assert_outputs_close(captured(X), model(X), atol=0)


def test_training_mode_bn_is_kept():
    model = TINY_MODELS["conv-bn-act"]()
    gm = yoloq.capture(model, X).graph_module
    gm.get_submodule("0.bn").train()
    result = yoloq.fold_conv_bn(gm)
    assert any("training mode" in note for note in result.notes)


def test_idempotent():
    _, _, first = _run("tiny-yolo")
    before = _structure(first.gm)
    second = yoloq.fold_conv_bn(first.gm)
    assert not second.modified and second.stats == {"folded": 0, "kept": 0}
    assert _structure(second.gm) == before
    assert yoloq.fold_conv_bn.ensures(second.gm) is None


class ShapeReadBeforeBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape  # reads the conv's shape only: folding stays exact
        return self.bn(y).view(b, c, h * w)


def test_shape_reads_do_not_block_folding():
    model = ShapeReadBeforeBn().eval()
    model.bn.running_var.fill_(2.0)
    captured = yoloq.capture(model, X)
    result = yoloq.fold_conv_bn(captured.graph_module)
    assert result.stats["folded"] == 1
    captured.graph_module = result.gm
    assert_outputs_close(captured(X), model(X), atol=1e-5)
