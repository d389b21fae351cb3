"""tighten_pre_activation: a fused layer's pre-activation grid shrinks to the values whose code
after the activation and its quantizer can still differ.

A conv whose pre-activations span [-40, 10] before SiLU (an 8-bit activation grid on about
[-0.28, 10]) must end with a pre-activation grid about [-6, 10]: a finer step, the same final code
for every value beyond the new ends, and a smaller output error. ReLU's grid starts at 0; an
activation grid that clips at the top pulls the pre-activation's top down with it; per-channel
activation grids are read channel by channel. The recipe flag puts the pass after calibration in
PTQ only."""
import pytest
import torch
from torch import nn

import yoloq
from yoloq.passes.insert_quantizers import QuantizedLayer
from yoloq.passes.tighten_pre_activation import changing_range
from yoloq.quantizers.fake_quantize import FakeQuantize
from yoloq.quantizers.spec import QuantSpec
from yoloq.recipe import Recipe, RecipeError

GEN = torch.Generator().manual_seed(0)
CALIB = [torch.rand(4, 3, 16, 16, generator=GEN) for _ in range(3)]
HELD_OUT = torch.rand(8, 3, 16, 16, generator=GEN)
U8 = QuantSpec(bits=8, signed=False, symmetric=False)
RECIPE = Recipe(weight=QuantSpec(bits=8, granularity="per_channel"), activation=U8, pre_activation=U8,
                input=QuantSpec(bits=16, signed=False, symmetric=False))


class WideConvAct(nn.Module):
    """conv(3 -> 4, 1x1) + act with pre-activations spread evenly over about [-40, 10]."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = act
        with torch.no_grad():
            self.conv.weight.copy_(torch.full((4, 3, 1, 1), 50.0 / 3))
            self.conv.bias.fill_(-40.0)

    def forward(self, x):
        return self.act(self.conv(x))


def _quantized(model: nn.Module, recipe: Recipe = RECIPE):
    captured = yoloq.capture(model, CALIB[0][:1])
    gm, records = yoloq.run_pipeline(captured.graph_module, yoloq.build_pipeline("calibrated", recipe, calib=CALIB))
    return gm, {r.name: r for r in records}


def _layer_and_output(gm) -> tuple[QuantizedLayer, FakeQuantize]:
    (layer,) = [m for m in gm.modules() if isinstance(m, QuantizedLayer)]
    return layer, gm.get_submodule("activation_quantizers.g1")


def _ends(q: FakeQuantize) -> tuple[float, float]:
    s, z = float(q.scale), float(q.zero_point)
    return (q.spec.qmin - z) * s, (q.spec.qmax - z) * s


def test_silu_grid_drops_the_tail_that_rounds_to_zero_and_stays_exact_beyond_its_ends():
    gm_off, _ = _quantized(WideConvAct(nn.SiLU()).eval(), Recipe(**{**RECIPE.__dict__, "tighten_pre_activation": False}))
    gm, records = _quantized(WideConvAct(nn.SiLU()).eval())
    assert records["tighten_pre_activation"].stats == {"layers": 1, "tightened": 1}
    layer, out = _layer_and_output(gm)
    before, after = _ends(_layer_and_output(gm_off)[0].pre_act_quant), _ends(layer.pre_act_quant)
    assert before[0] < -35 and before[1] > 8
    assert -9 < after[0] < -4 and abs(after[1] - before[1]) < 0.5  # the top is the activation grid's too
    assert float(layer.pre_act_quant.scale) < 0.35 * float(_layer_and_output(gm_off)[0].pre_act_quant.scale)
    # Beyond the new ends, the final code is the one the unquantized pre-activation would give.
    t = torch.linspace(before[0], before[1], 20001)
    with torch.no_grad():
        exact, through = out(layer.layer.act(t)), out(layer.layer.act(layer.pre_act_quant(t)))
    outside = (t < after[0]) | (t > after[1])
    assert outside.sum() > 10000 and torch.equal(exact[outside], through[outside])
    # Inside, the finer grid is closer; end to end, the output error drops.
    with torch.no_grad():
        off = (gm_off(HELD_OUT)[0] - WideConvAct(nn.SiLU())(HELD_OUT)).square().mean()
        on = (gm(HELD_OUT)[0] - WideConvAct(nn.SiLU())(HELD_OUT)).square().mean()
    assert on < 0.5 * off


def test_relu_grid_starts_at_zero():
    gm, _ = _quantized(WideConvAct(nn.ReLU()).eval())
    layer, _ = _layer_and_output(gm)
    lo, hi = _ends(layer.pre_act_quant)
    assert -float(layer.pre_act_quant.scale) <= lo <= 0 and hi > 8


def test_top_follows_an_activation_grid_that_clips():
    out = FakeQuantize(U8)
    out(torch.tensor([-0.3, 4.0]))  # an activation grid on [-0.3, 4]
    out.calibrate_()
    lo, hi = changing_range(torch.tensor([-40.0]), torch.tensor([10.0]), nn.SiLU(), out, 255)
    assert 4.0 < float(hi) < 4.2 and -9 < float(lo) < -4


def test_per_channel_activation_grids_are_read_channel_by_channel():
    out = FakeQuantize(QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_channel"), channel_axis=1)
    out(torch.tensor([[-0.3, 2.0], [-0.3, 6.0]]).reshape(1, 2, 2, 1))  # channel grids [-0.3, 2] and [-0.3, 6]
    out.calibrate_()
    top = [float((out.spec.qmax - z) * s) for s, z in zip(out.scale.flatten(), out.zero_point.flatten())]
    lo, hi = changing_range(torch.tensor([-40.0, -40.0]), torch.tensor([10.0, 10.0]), nn.SiLU(), out, 255)
    assert top == pytest.approx([2.0, 6.0], abs=0.05)
    step = out.scale.flatten()
    for row in range(2):  # the pre-activation whose SiLU reaches the channel's top
        assert abs(float(nn.functional.silu(hi[row])) - top[row]) < float(step[row])


def _pass_names(recipe: Recipe, **kwargs) -> list[str]:
    return [yoloq.pipeline.pass_name(p) for p in yoloq.build_pipeline("calibrated", recipe, calib=CALIB, **kwargs)]


def test_on_by_default_after_calibration_in_ptq_only():
    assert _pass_names(Recipe())[-2:] == ["calibrate", "tighten_pre_activation"]
    assert "tighten_pre_activation" not in _pass_names(Recipe(), qat=True)
    assert "tighten_pre_activation" not in _pass_names(Recipe(tighten_pre_activation=False))


def test_recipe_flag_is_validated_and_round_trips():
    with pytest.raises(RecipeError, match=r"recipe\.tighten_pre_activation: 1 is not true or false"):
        Recipe.from_dict({"tighten_pre_activation": 1})
    recipe = Recipe(tighten_pre_activation=False)
    assert Recipe.from_dict(recipe.to_dict()) == recipe == Recipe.from_yaml(recipe.to_yaml())


def test_needs_calibrated_quantizers():
    captured = yoloq.capture(WideConvAct(nn.SiLU()).eval(), CALIB[0][:1])
    gm, _ = yoloq.run_pipeline(captured.graph_module, yoloq.build_pipeline("quantized", RECIPE))
    from yoloq.passes.tighten_pre_activation import tighten_pre_activation
    with pytest.raises(yoloq.PassError, match=r"tighten_pre_activation failed after \[\]: .*uncalibrated quantizers"):
        yoloq.run_pipeline(gm, (tighten_pre_activation,))
