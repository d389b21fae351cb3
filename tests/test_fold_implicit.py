"""fold_implicit: YOLOv7's ImplicitA (add before a conv) and ImplicitM (multiply after it) fold into
the conv exactly, only where exact, and YOLOv7 then lowers to the integer graph bit-exact."""
import pytest
import torch
from torch import nn

import yoloq
from yoloq.passes.fold_implicit import fold_implicit


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class Implicit(nn.Module):
    """add(a) -> conv -> mul(m), as YOLOv7's IDetect does per level; ``padding`` breaks the add fold."""

    def __init__(self, padding: int = 0, bias: bool = True):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.a = nn.Parameter(torch.randn(1, 8, 1, 1, generator=gen))
        self.head = nn.Conv2d(8, 6, 1 if padding == 0 else 3, 1, padding, bias=bias)
        self.m = nn.Parameter(1 + 0.1 * torch.randn(1, 6, 1, 1, generator=gen))

    def forward(self, x):
        return (self.head(self.stem(x) + self.a) * self.m,)


def _fold(model):
    x = torch.rand(2, 3, 32, 32)
    captured = yoloq.capture(model, x)
    result = fold_implicit(captured.graph_module)
    return captured, result, x


@pytest.mark.parametrize("bias", [True, False])
def test_add_and_mul_fold_into_the_conv_exactly(bias):
    model = Implicit(bias=bias).eval()
    captured, result, x = _fold(model)
    gm = result.gm
    assert result.stats == {"folded": 2}
    functions = [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    assert "add" not in functions and "mul" not in functions
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    captured.graph_module = gm
    with torch.no_grad():
        torch.testing.assert_close(captured(x), model(x), atol=1e-5, rtol=1e-5)
    assert gm.meta["yoloq.head_outputs"] == ("head",)
    assert model.head.weight.grad is None and model.a.shape == (1, 8, 1, 1)  # the caller's model untouched


def test_add_before_a_padded_conv_is_left_alone():
    """Padding would see 0 where the unfolded conv sees a: not exact, so only the mul folds."""
    captured, result, x = _fold(Implicit(padding=1).eval())
    assert result.stats == {"folded": 1}
    assert "add" in [n.target.__name__ for n in result.gm.graph.nodes if n.op == "call_function"]


def test_caller_model_is_not_modified():
    model = Implicit().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _fold(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("spec", ["yolov7-tiny"])
def test_yolov7_lowers_bit_exact(spec):
    from yoloq.sources import load_model

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    qm = yoloq.quantize(load_model(spec).eval(), "w8a8", calib=[x])
    assert [r.stats for r in qm.records if r.name == "fold_implicit"] == [{"folded": 6}]
    check = yoloq.check_integer(yoloq.lower(qm), qm, x)
    assert check.differing == 0, check.verdict
