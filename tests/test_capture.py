import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

import yoloq
from yoloq.models.tiny import TINY_MODELS, tiny_yolo
from conftest import assert_outputs_close, executed_convs, graph_module_targets

X64 = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
X96 = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))


def test_plain_symbolic_trace_fails_where_capture_succeeds():
    with pytest.raises(Exception):
        fx.symbolic_trace(tiny_yolo())
    assert isinstance(yoloq.capture(tiny_yolo(), X64), yoloq.Captured)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_decoder_of_graph_equals_model(name):
    model = TINY_MODELS[name]()
    captured = yoloq.capture(model, X64)
    assert_outputs_close(captured(X64), model(X64), atol=1e-5)


def test_graph_is_module_level_with_qualified_names():
    model = tiny_yolo()
    gm = yoloq.capture(model, X64).graph_module
    targets = {n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert targets["stem.0.conv"] is nn.Conv2d and targets["stem.0.bn"] is nn.BatchNorm2d
    assert targets["stem.0.act"] is nn.SiLU and targets["fuse.act"] is nn.LeakyReLU
    assert targets["up"] is nn.Upsample and targets["sppf.pool"] is nn.MaxPool2d
    # every conv that runs is a node, except DFL's fixed decode conv, which lives in the decoder
    convs, _ = executed_convs(model, X64)
    assert graph_module_targets(gm) == convs - {"head.dfl"}
    assert "head.dfl" in graph_module_targets(yoloq.capture(model, X64).decoder.graph_module)


def test_graph_ends_at_the_raw_head_convolutions():
    captured = yoloq.capture(tiny_yolo(), X64)
    assert captured.head_outputs == ("head_box_0_1", "head_cls_0_1", "head_box_1_1", "head_cls_1_1")
    outputs = captured.graph_module(X64)
    assert [tuple(t.shape) for t in outputs] == [(1, 16, 8, 8), (1, 4, 8, 8), (1, 16, 4, 4), (1, 4, 4, 4)]


def test_shape_dependent_code_generalises_to_another_size_and_batch():
    model = tiny_yolo()
    captured = yoloq.capture(model, X64)
    assert_outputs_close(captured(X96), model(X96), atol=1e-5)
    assert captured.guards, "the head's shape check must be recorded as a guard"


def test_capture_after_the_model_ran_at_another_size():
    model = tiny_yolo()
    model(X96)  # fills the head's shape/anchor caches for 96x128
    captured = yoloq.capture(model, X64)
    assert model.head.shape == (2, 20, 12, 16)  # the caller's cache is untouched
    assert_outputs_close(captured(X96), model(X96), atol=1e-5)
    assert_outputs_close(captured(X64), model(X64), atol=1e-5)


def test_violated_guard_names_the_decision_and_source_line():
    captured = yoloq.capture(TINY_MODELS["shape-branch"](), X64)
    (guard,) = captured.guards
    assert guard.kind == "bool" and guard.expected is True
    assert "tiny.py" in guard.source and "x.shape[-1] >= 64" in guard.source
    with pytest.raises(yoloq.GuardError, match=r"bool\(ge\) was True, now False.*tiny.py:\d+ in forward"):
        captured(torch.rand(1, 3, 32, 32))
    small = yoloq.capture(TINY_MODELS["shape-branch"](), torch.rand(1, 3, 32, 32))
    assert "small" in graph_module_targets(small.graph_module)


def test_explicit_boundary():
    captured = yoloq.capture(tiny_yolo(), X64, boundary=["head.box.0.1", "head.cls.0.1", "head.box.1.1", "head.cls.1.1"])
    assert len(captured.head_outputs) == 4
    with pytest.raises(ValueError, match=r"boundary modules \['head.nope'\]"):
        yoloq.capture(tiny_yolo(), X64, boundary=["head.nope"])


def test_callers_model_is_never_modified():
    model = tiny_yolo().train()
    before_state = copy.deepcopy(model.state_dict())
    model.eval()
    before_out = model(X64)
    model.train()
    yoloq.capture(model, X64)
    assert model.training is True
    assert model.head.shape == (1, 20, 8, 8) and model.head.anchors.shape == (2, 80)
    after_state = model.state_dict()
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    model.eval()
    assert_outputs_close(model(X64), before_out, atol=0)


def test_bad_example_inputs_get_clear_errors():
    with pytest.raises(TypeError, match=r"example_inputs\[0\] is a str"):
        yoloq.capture(tiny_yolo(), ("image.jpg",))
    with pytest.raises(TypeError, match="must be a tensor or a non-empty tuple"):
        yoloq.capture(tiny_yolo(), None)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        yoloq.capture(lambda x: x, X64)
    with pytest.raises(yoloq.CaptureError, match=r"stem.0.conv \(Conv2d\).*float32\[1, 4, 64, 64\]"):
        yoloq.capture(tiny_yolo(), torch.rand(1, 4, 64, 64))


class Uncapturable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x.flatten(1))  # a 2-D tensor into Conv2d fails on the example values


def test_uncapturable_module_names_module_and_source_line():
    with pytest.raises(yoloq.CaptureError, match=r"call_module conv failed .* in conv \(Conv2d\) at .*test_capture.py:\d+ in forward: return self.conv"):
        yoloq.capture(Uncapturable(), X64)
