"""lower_to_integer, eval_form and check_integer: integer graph == evaluation form, code for code."""
from __future__ import annotations

import dataclasses
import glob

import pytest
import torch
import torch.fx as fx
from torch import nn

import yoloq
from yoloq.models.tiny import ConvBnAct, tiny_yolo
from yoloq.passes.check_integer import check_integer, float_ops
from yoloq.passes.eval_form import eval_form
from yoloq.passes.insert_quantizers import QUANTIZES
from yoloq.passes.integer_ops import IntConv2d, LoweringError, dyadic, round_shift
from yoloq.passes.lower_to_integer import BOUNDARY, lower
from yoloq.quantizers.spec import QuantSpec
from yoloq.recipe import Recipe, load_recipe
from conftest import random_batches


pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(recipe="w8a8", model=None, size: int = 64):
    return yoloq.quantize(model if model is not None else tiny_yolo(), recipe, calib=random_batches(size))


class Residual(nn.Module):
    """A residual Add, a Sub and a standalone Sigmoid: IntSum and a table over 8-bit codes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = ConvBnAct(3, 8, 3, 2), ConvBnAct(8, 8, 3), ConvBnAct(8, 8, 1)
        self.head = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        x = self.a(x)
        y = x + self.b(x)
        return self.head(torch.sigmoid(y) - self.c(y))


def _module_types(lowered) -> list[str]:
    gm = lowered.graph_module
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]


# ----------------------------------------------------------------------------- arithmetic
def test_round_shift_is_round_half_up():
    p = torch.tensor([-6, -5, -3, -1, 1, 3, 5, 6], dtype=torch.int64)
    got = round_shift(p, torch.ones_like(p))  # p / 2
    assert got.tolist() == [-3, -2, -1, 0, 1, 2, 3, 3]


def test_dyadic_multiplier_has_31_bits_and_is_accurate():
    m = torch.tensor([1e-7, 3.3e-4, 0.5, 0.999999, 7.25, -0.01], dtype=torch.float64)
    m0, n = dyadic(m, "test")
    assert ((m0.abs() >= 2**30) & (m0.abs() < 2**31)).all() and (n >= 1).all()
    approx = m0.double() * torch.pow(2.0, -n.double())
    assert ((approx - m).abs() <= m.abs() * 2.0**-31).all()
    with pytest.raises(LoweringError, match="too large"):
        dyadic(torch.tensor([2.0**31]), "test")


# ----------------------------------------------------------------------------- bit-exactness
@pytest.mark.parametrize("recipe", ["w8a8", "w4a4"])
def test_tiny_yolo_is_bit_exact(recipe):
    qm = _quantized(recipe)
    lowered = lower(qm)
    x = random_batches()[1]
    check = check_integer(lowered, qm, x)
    assert check.differing == 0, check.verdict
    assert check.verdict.startswith("bit-exact") and not check.unmatched
    quantizer_nodes = {n.name for n in qm.graph_module.graph.nodes if n.meta.get(QUANTIZES)}
    pre_activations = {r.tensor for r in check.rows if r.tensor.endswith(":pre_activation")}
    assert quantizer_nodes <= {r.tensor for r in check.rows}  # every quantized tensor is compared
    assert len(pre_activations) == lowered.stats["lut"] == 14
    # Dyadic multipliers, integer biases and round half up cost a little against the fake-quant graph.
    with torch.no_grad():
        heads_int, heads_fq = lowered.graph_module(x), qm.graph_module(x)
        scale = max(float(h.abs().max()) for h in heads_fq)
        assert check.lowered_distance == pytest.approx(
            max(float((a - b).abs().max()) for a, b in zip(heads_int, heads_fq)))
        assert check.lowered_distance <= (0.01 if recipe == "w8a8" else 0.05) * scale
        decoded_int, decoded_fq, decoded_eval = lowered(x), qm(x), eval_form(qm)(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(decoded_int), torch.utils._pytree.tree_leaves(decoded_eval)):
        assert torch.equal(a, b)  # same head values, same decoder: detections (and mAP) equal exactly
    torch.testing.assert_close(decoded_int[0], decoded_fq[0], atol=0.1 if recipe == "w8a8" else 1.0, rtol=0.05)


def test_add_sub_and_standalone_activation_are_bit_exact():
    qm = _quantized("w8a8", Residual().eval(), size=32)
    lowered = lower(qm)
    check = check_integer(lowered, qm, random_batches(32))
    assert check.differing == 0, check.verdict
    types = _module_types(lowered)
    assert types.count("IntSum") == 2 and types.count("Lut") == 4  # 3 fused activations + the sigmoid


@pytest.mark.parametrize("change", ["requantize_concat", "bias_correction", "qat_kept_bn"])
def test_other_graph_forms_are_bit_exact(change):
    recipe = load_recipe("w8a8")
    if change == "qat_kept_bn":  # BatchNorm stays after the quantized conv: folded into M and the bias
        qm = yoloq.prepare_qat(tiny_yolo(), "w4a4", calib=random_batches()).eval()
    else:
        field = {"requantize_concat": {"concat_policy": "requantize"}, "bias_correction": {"bias_correction": True}}
        qm = _quantized(dataclasses.replace(recipe, **field[change]))
    lowered = lower(qm)
    check = check_integer(lowered, qm, random_batches()[0])
    assert check.differing == 0, check.verdict
    if change == "requantize_concat":
        assert "IntRequantize" in _module_types(lowered)


def test_int64_accumulator_when_the_int32_bound_fails():
    """16-bit weights on 16-bit activations: X·Σ|w| passes 2^31, so those layers accumulate in int64."""
    recipe = Recipe(name="w16a16", weight=QuantSpec(bits=16, granularity="per_channel"),
                    activation=QuantSpec(bits=16, signed=False, symmetric=False))
    qm = _quantized(recipe, size=32)
    lowered = lower(qm)
    assert lowered.stats["int64_layers"] and lowered.stats["max_accumulator_bound"] >= 2**31
    convs = [m for m in lowered.graph_module.modules() if isinstance(m, IntConv2d)]
    assert {m.weight.dtype for m in convs} == {torch.int32, torch.int64}
    assert check_integer(lowered, qm, random_batches(32)[0]).differing == 0


def test_huge_bias_takes_int64_and_a_shorter_multiplier():
    """A bias of 2^35 accumulator steps: int32 would overflow, and so would |acc|·M0 with a 31-bit M0
    in int64 (a random-init yolov8n head does this); the lowering must still match the fake-quant graph."""
    qm = _quantized("w8a8")
    layer = qm.graph_module.get_submodule("head.cls.0.1").layer
    with torch.no_grad():
        layer.bias[0] = 1e6
        layer.bias[1] = -1e6
    lowered = lower(qm)
    assert lowered.stats["int64_layers"] == ["head.cls.0.1"] and lowered.stats["min_multiplier_bits"] < 31
    x = random_batches()[0]
    check = check_integer(lowered, qm, x)
    assert check.differing == 0, check.verdict
    with torch.no_grad():
        head_int, head_fq = lowered.graph_module(x)[1], qm.graph_module(x)[1]
    assert torch.equal(head_int[:, :2], head_fq[:, :2])  # saturated at the grid's ends, as in fake quant
    assert check.lowered_distance < 0.05


def test_check_reports_a_broken_integer_graph():
    qm = _quantized("w8a8")
    lowered = lower(qm)
    lut = lowered.graph_module.get_submodule("block_cv1_conv_act")
    lut.table = torch.roll(lut.table, 1)  # every code one table entry off
    check = check_integer(lowered, qm, random_batches()[0])
    assert check.differing > 0 and check.verdict.startswith("NOT bit-exact")
    bad = [r for r in check.rows if r.differing]
    assert bad[0].tensor == "activation_quantizers_g4" and bad[0].max_steps >= 1
    assert all(r.differing == 0 for r in check.rows[: check.rows.index(bad[0])])


# ----------------------------------------------------------------------------- integer only
class _Dtypes(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.dtypes: dict[str, torch.dtype] = {}

    def run_node(self, n):
        value = super().run_node(n)
        if n.op not in ("placeholder", "output") and BOUNDARY not in n.meta or n.meta.get(BOUNDARY) == "input":
            for leaf in torch.utils._pytree.tree_leaves(value):
                if isinstance(leaf, torch.Tensor):
                    self.dtypes[n.name] = leaf.dtype
        return value


def test_no_float_op_between_input_quantizer_and_head():
    qm = _quantized("w4a4")
    lowered = lower(qm)
    x = random_batches()[0]
    interpreter = _Dtypes(lowered.graph_module)
    with torch.no_grad():
        interpreter.run(x)
    assert interpreter.dtypes and not [n for n, d in interpreter.dtypes.items() if d.is_floating_point]
    assert float_ops(lowered, x) == []  # every aten op inside every module too
    boundary = [n.meta[BOUNDARY] for n in lowered.graph_module.graph.nodes if BOUNDARY in n.meta]
    assert boundary == ["input"] + ["output"] * 4
    types = set(_module_types(lowered))
    assert not types & {"FakeQuantize", "QuantizedLayer", "SiLU", "LeakyReLU", "Upsample"}


def test_float_op_finder_sees_a_float_table():
    qm = _quantized("w8a8")
    lowered = lower(qm)
    lut = lowered.graph_module.get_submodule("stem_0_conv_act")
    lut.table = lut.table.float()
    assert any(f.startswith("stem_0_conv_act: aten.take") for f in float_ops(lowered, random_batches()[0]))


# ----------------------------------------------------------------------------- structure, errors
def test_lowered_structure_and_input_left_alone():
    qm = _quantized("w8a8")
    before = [(n.name, n.op, str(n.target)) for n in qm.graph_module.graph.nodes]
    lowered = lower(qm)
    assert [(n.name, n.op, str(n.target)) for n in qm.graph_module.graph.nodes] == before
    types = _module_types(lowered)
    assert types.count("IntConv2d") == 18 and types.count("Lut") == 14
    assert types.count("UpsampleNearestCodes") == 1 and types.count("MaxPool2d") == 3
    assert lowered.stats["int64_layers"] == [] and lowered.stats["max_accumulator_bound"] < 2**31
    x = random_batches()[0]
    with torch.no_grad():  # lowering again gives the same graph
        again = lower(qm)
        for a, b in zip(lowered.graph_module(x), again.graph_module(x)):
            assert torch.equal(a, b)


def test_unsupported_grids_and_ops_are_named():
    with pytest.raises(LoweringError, match=r"layer .*(pot|apot|codebook) grid is not supported"):
        lower(_quantized("w4a4-nonuniform"))

    class Product(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.a(x) * self.b(x))

    with pytest.raises(LoweringError, match=r"node mul: .*mul.* not supported.*keep it in float"):
        lower(_quantized("w8a8", Product().eval(), size=32))


def test_uncalibrated_model_is_refused():
    qm = _quantized("w8a8")
    qm.graph_module.get_submodule("activation_quantizers.g3").scale = torch.empty(0)
    with pytest.raises(LoweringError, match="uncalibrated"):
        lower(qm)


# ----------------------------------------------------------------------------- whole model
@pytest.mark.slow
def test_yolov5n_w8a8_is_bit_exact(shared_data):
    from yoloq.sources import load_model
    from yoloq.tools.data import YoloDataset

    data = glob.glob(str(shared_data / "coco128" / "*.yaml"))[0]
    images = next(iter(YoloDataset(data, "train", imgsz=320, batch=2, rect=False, max_images=2).batches()))[0]
    qm = yoloq.quantize(load_model(str(shared_data / "weights" / "yolov5n.pt")), "w8a8", calib=[images])
    lowered = lower(qm)
    check = check_integer(lowered, qm, images)
    assert check.differing == 0, check.verdict
    assert len(check.rows) > 140 and lowered.stats["sum"] == 7 and lowered.stats["int64_layers"] == []
    # The evaluation form is as far from the float32 fake-quant graph as float64 is: rounding noise.
    assert check.eval_form_distance <= 3 * max(check.float64_distance, 0.1)
    assert float_ops(lowered, images[:1]) == []
    metrics = [yoloq.evaluate(m, data, imgsz=320, max_images=4) for m in (lowered, eval_form(qm))]
    assert metrics[0].map50_95 == metrics[1].map50_95 and metrics[0].map50 == metrics[1].map50


def test_weights_are_stored_packed():
    qm = _quantized("w4a4")
    lowered = lower(qm)
    conv = lowered.graph_module.get_submodule("down_conv")  # a 4-bit layer (first and head layers: 8)
    state = conv.state_dict()
    assert "weight" not in state and conv.bits == 4
    assert state["packed_weight"].dtype == torch.uint8
    assert state["packed_weight"].numel() == -(-conv.weight.numel() * 4 // 8)
    x = random_batches()[0]
    with torch.no_grad():
        expected = lowered.graph_module(x)
        for m in lowered.graph_module.modules():
            if isinstance(m, IntConv2d):
                m.weight = torch.zeros_like(m.weight)
        lowered.graph_module.load_state_dict(lowered.graph_module.state_dict())  # unpacks again
        for a, b in zip(lowered.graph_module(x), expected):
            assert torch.equal(a, b)


def test_runs_as_a_pass_in_the_pipeline_runner():
    from yoloq.passes.lower_to_integer import lower_to_integer
    from yoloq.pipeline import PassError, run_pipeline

    qm = _quantized("w8a8")
    gm, records = run_pipeline(qm.graph_module, (lower_to_integer,))
    assert records[0].name == "lower_to_integer" and records[0].stats["conv"] == 18
    assert gm is not qm.graph_module and float_ops(yoloq.LoweredModel(gm, qm.decoder, {}), random_batches()[0]) == []
    fresh = yoloq.quantize(tiny_yolo(), "w8a8", calib=random_batches()).graph_module
    fresh.get_submodule("activation_quantizers.g0").scale = torch.empty(0)
    with pytest.raises(PassError, match="uncalibrated"):
        run_pipeline(fresh, (lower_to_integer,))


def test_yolov8n_anchor_grid_stays_float_and_lowers_bit_exact():
    """YOLOv8's head builds its anchor points from arange(...).type_as(feature): constants for the
    input size, which must stay float (no quantizer; an 8-bit grid of anchor points would move
    every box) and reach the decoder unchanged from the integer graph."""
    pytest.importorskip("ultralytics")
    from yoloq.passes.plan_quantization import QUANT
    from yoloq.sources import load_model

    qm = _quantized(model=load_model("yolov8n.yaml"))
    nodes = {n.name: n for n in qm.graph_module.graph.nodes}
    anchors = [n for n in nodes.values() if n.op == "call_method" and n.target == "type_as"]
    assert anchors and all(n.meta[QUANT].kind == "none" for n in anchors)
    assert not any(u.meta.get(QUANTIZES) for n in anchors for u in n.users)
    lowered = lower(qm)
    x = random_batches()[1]
    check = check_integer(lowered, qm, x)
    assert check.differing == 0, check.verdict
    with torch.no_grad():
        ours, reference = lowered.graph_module(x), qm.graph_module(x)
    aux = qm.graph_module.meta["yoloq.aux_outputs"]
    assert aux
    for a, b in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(reference)):
        if isinstance(a, torch.Tensor) and not a.is_floating_point():
            pytest.fail("an integer tensor left the integer graph")
    grids = [a for a in torch.utils._pytree.tree_leaves(ours) if isinstance(a, torch.Tensor) and a.dim() == 2]
    assert grids and all(g.dtype == torch.float32 and (g * 2 % 1 == 0).all() for g in grids)  # k + 0.5
