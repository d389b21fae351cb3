"""Attention in the integer graph: IntMatmul, IntSoftmax and the scalar-multiply table (YOLO11's C2PSA)."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import yoloq
from yoloq.models.tiny import ConvBnAct
from yoloq.passes.check_integer import check_integer, float_ops
from yoloq.passes.integer_attention import EXP_BITS, IntMatmul, IntSoftmax, matmul_requant, softmax_requant
from yoloq.passes.integer_ops import Grid, LoweringError
from yoloq.passes.lower_to_integer import lower
from yoloq.quantizers.spec import QuantSpec
from yoloq.recipe import Recipe
from conftest import random_batches


pytestmark = pytest.mark.usefixtures("one_thread")


class Attention(nn.Module):
    """C2PSA's Attention as ultralytics writes it (qkv conv, view/split, (q·scale)ᵀ @ k, softmax, v @ attnᵀ,
    positional depthwise conv), between a stem and a head conv."""

    def __init__(self, dim: int = 32, heads: int = 2, softmax_dim: int = -1, weight: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.head_dim, self.key_dim, self.softmax_dim = heads, dim // heads, dim // heads // 2, softmax_dim
        self.scale = self.key_dim**-0.5
        self.stem = ConvBnAct(3, dim, 3, 4)
        self.qkv = nn.Conv2d(dim, dim + 2 * self.key_dim * heads, 1)
        self.pe = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.head = nn.Conv2d(dim, 6, 1)
        self.weight = nn.Parameter(torch.randn(dim, dim)) if weight else None
        with torch.no_grad():  # logits spread over several units, so the softmax codes cover their grid
            nn.init.normal_(self.qkv.weight, std=1.0)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.heads, self.key_dim * 2 + self.head_dim, h * w).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=self.softmax_dim)
        y = (v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        if self.weight is not None:
            y = (y.flatten(2).transpose(1, 2) @ self.weight).transpose(1, 2).reshape(b, c, h, w)
        return self.head(self.proj(y))


def _codes_at(lowered, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            seen[n.name] = super().run_node(n)
            return seen[n.name]

    with torch.no_grad():
        Recorder(lowered.graph_module).run(x)
    return seen[name]


def _types(lowered) -> list[str]:
    gm = lowered.graph_module
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4"])
def test_attention_lowers_bit_exact(recipe):
    qm = yoloq.quantize(Attention().eval(), recipe, calib=random_batches())
    lowered = lower(qm)
    x = random_batches()[1]
    check = check_integer(lowered, qm, x)
    assert check.differing == 0, check.verdict
    assert not check.unmatched
    assert lowered.stats["matmul"] == 2 and lowered.stats["softmax"] == 1 and lowered.stats["int64_layers"] == []
    types = _types(lowered)
    assert types.count("IntMatmul") == 2 and types.count("IntSoftmax") == 1
    assert types.count("Lut") == 2  # the stem's SiLU and q * scale
    assert float_ops(lowered, x) == []
    probabilities = _codes_at(lowered, "softmax", x)
    assert probabilities.dtype == torch.int32 and len(probabilities.unique()) > (200 if recipe == "w8a8" else 12)
    # The integer softmax is the evaluation form's, not the fake-quant graph's float one: close, not equal.
    with torch.no_grad():
        (head_int,), (head_fq,) = lowered.graph_module(x), qm.graph_module(x)
    assert check.lowered_distance == pytest.approx(float((head_int - head_fq).abs().max()))
    # (rounding flips propagate: at 4 bits one step of a 4-bit tensor is 17 steps of the 8-bit head)
    assert check.lowered_distance <= (0.03 if recipe == "w8a8" else 0.25) * float(head_fq.abs().max())


def test_sixteen_bit_attention_takes_an_int64_matmul():
    """16-bit operands: K·A·B passes 2^31 (|q − z| up to 2^16 each), so both matmuls accumulate in int64."""
    recipe = Recipe(name="w16a16", weight=QuantSpec(bits=16, granularity="per_channel"),
                    activation=QuantSpec(bits=16, signed=False, symmetric=False))
    qm = yoloq.quantize(Attention().eval(), recipe, calib=random_batches(32))
    lowered = lower(qm)
    assert {"matmul", "matmul_1"} <= set(lowered.stats["int64_layers"])
    matmuls = [m for m in lowered.graph_module.modules() if isinstance(m, IntMatmul)]
    assert [m.accumulator for m in matmuls] == [torch.int64, torch.int64]
    check = check_integer(lowered, qm, random_batches(32)[0])
    assert check.differing == 0, check.verdict


# ----------------------------------------------------------------------------- the integer ops alone
def _grid(scale: float, zero: int, bits: int) -> Grid:
    return Grid(scale, zero, 0, 2**bits - 1, None)


def test_integer_softmax_is_the_stated_formula_and_close_to_float():
    x, out = _grid(0.07, 131, 8), _grid(1 / 255, 0, 8)
    p = softmax_requant(x, out, 50, "test")
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (3, 4, 50), generator=gen, dtype=torch.int32)
    got = IntSoftmax(p, out)(codes)
    # Python integers cannot overflow: q = ⌊(2·e·R0 + S·2^r) / (2·S·2^r)⌋ with e = E[max − q]
    for row, result in zip(codes.view(-1, 50).tolist(), got.view(-1, 50).tolist()):
        e = [int(p.exp_table[max(row) - q]) for q in row]
        total = sum(e) << p.r_shift
        assert result == [min(255, (2 * v * p.r0 + total) // (2 * total)) for v in e]
    assert int(p.exp_table[0]) == 2**EXP_BITS and p.max_length > 2**14
    reference = torch.round(torch.softmax((codes - 131).double() * 0.07, -1) * 255)
    assert (got - reference).abs().max() <= 1 and (got != reference).float().mean() < 0.01


def test_integer_matmul_is_exact_and_refuses_a_longer_inner_dimension():
    a, b, out = _grid(0.02, 128, 8), _grid(0.03, 100, 8), _grid(0.5, 7, 8)
    p = matmul_requant(a, b, out, 64, "test")
    assert p.accumulator == torch.int32 and p.max_inner == (2**31 - 1) // (128 * 155)
    gen = torch.Generator().manual_seed(1)
    qa, qb = (torch.randint(0, 256, s, generator=gen, dtype=torch.int32) for s in ((2, 5, 64), (2, 64, 3)))
    acc = torch.matmul((qa - 128).double(), (qb - 100).double()).to(torch.int64)
    expected = torch.clamp(((acc * p.m0 + (1 << (p.shift - 1))) >> p.shift) + 7, 0, 255)
    op = IntMatmul(p, a, b, out)
    assert torch.equal(op(qa, qb).to(torch.int64), expected)
    too_long = torch.zeros(1, 1, p.max_inner + 1, dtype=torch.int32)
    with pytest.raises(LoweringError, match="could overflow"):
        op(too_long, too_long.transpose(1, 2))


# ----------------------------------------------------------------------------- refused
def test_softmax_over_another_dim_is_refused():
    qm = yoloq.quantize(Attention(softmax_dim=-2).eval(), "w8a8", calib=random_batches())
    with pytest.raises(LoweringError, match=r"node softmax: softmax over dim -2 .*last dim.*recipe"):
        lower(qm)


def test_matmul_with_a_float_constant_is_refused():
    qm = yoloq.quantize(Attention(weight=True).eval(), "w8a8", calib=random_batches())
    with pytest.raises(LoweringError, match=r"node matmul_2: .*operand weight.*not a quantized tensor.*Conv2d/Linear"):
        lower(qm)


# ----------------------------------------------------------------------------- YOLO11
def test_yolo11n_c2psa_lowers_bit_exact():
    pytest.importorskip("ultralytics")
    from yoloq.sources import load_model

    qm = yoloq.quantize(load_model("yolo11n.yaml").eval(), "w8a8", calib=random_batches())
    lowered = lower(qm)
    assert lowered.stats["matmul"] == 2 and lowered.stats["softmax"] == 1
    x = random_batches()[1][:1]
    check = check_integer(lowered, qm, x)
    assert check.differing == 0, check.verdict
    assert float_ops(lowered, x) == []  # the anchor grids are shape constants, not image values
