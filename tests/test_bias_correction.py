"""bias_correction: the mean error weight quantization adds to each layer's output, per channel,
is subtracted through its bias while the weight is quantized.

A deliberately biased weight grid (every weight 0.4 of a step above a grid point, so every weight
rounds down) must lose its mean output error, exactly on the calibration batches and mostly on
others; the float network stays float; running the pass twice changes nothing; the pass needs
calibrated quantizers; the recipe flag puts it in the pipeline."""
import pytest
import torch
from torch import nn

import yoloq
from yoloq.models.tiny import TINY_MODELS
from yoloq.passes.bias_correction import bias_correction
from yoloq.passes.calibrate import quantizers
from yoloq.passes.insert_quantizers import QuantizedLayer
from yoloq.quantizers.spec import QuantSpec
from yoloq.recipe import Recipe, RecipeError

GEN = torch.Generator().manual_seed(0)
CALIB = [torch.rand(4, 3, 32, 32, generator=GEN) for _ in range(3)]
HELD_OUT = torch.rand(8, 3, 32, 32, generator=GEN)
# Only the weights at 8 bits, so the mean output error is the weight grid's.
W8A16 = Recipe(weight=QuantSpec(bits=8, granularity="per_channel"), activation=QuantSpec(bits=16, signed=True),
               input=QuantSpec(bits=16, signed=False, symmetric=False))
STEP = 0.01


class BiasedGridConv(nn.Module):
    """One conv whose weights are ``(k + 0.4)·STEP``, each channel's first one ``127·STEP``: the
    min-max 8-bit grid has step STEP, and every other weight rounds 0.4 of a step down."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        k = torch.randint(-100, 100, self.conv.weight.shape, generator=torch.Generator().manual_seed(1))
        weight = (k + 0.4) * STEP
        weight[:, 0, 0, 0] = 127 * STEP
        with torch.no_grad():
            self.conv.weight.copy_(weight)

    def forward(self, x):
        return self.conv(x)


def _calibrated(model: nn.Module, recipe: Recipe = W8A16):
    captured = yoloq.capture(model, CALIB[0][:1])
    gm, _ = yoloq.run_pipeline(captured.graph_module, yoloq.build_pipeline("calibrated", recipe, calib=CALIB))
    return gm


def _channel_mean_error(gm, model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        (output,) = gm(x)  # the captured graph returns its head tensors as a tuple
        return (output - model(x)).mean((0, 2, 3))


@pytest.mark.parametrize("bias", [True, False])
def test_correction_removes_the_mean_error_of_a_biased_weight_grid(bias):
    model = BiasedGridConv(bias).eval()
    gm = _calibrated(model)
    before = torch.stack([_channel_mean_error(gm, model, b) for b in CALIB]).mean(0)
    held_out_before = _channel_mean_error(gm, model, HELD_OUT)
    assert (before < -0.04).all()  # 26 weights per channel 0.4·STEP low, times E[x] = 0.5: -0.052

    gm, records = yoloq.run_pipeline(gm, (bias_correction(CALIB),))
    assert records[0].modified and records[0].stats == {"layers": 1, "images": 12}
    after = torch.stack([_channel_mean_error(gm, model, b) for b in CALIB]).mean(0)
    torch.testing.assert_close(after, torch.zeros_like(after), atol=1e-5, rtol=0)
    assert _channel_mean_error(gm, model, HELD_OUT).abs().max() < 0.05 * held_out_before.abs().min()
    assert gm.get_submodule("conv").bias_correction.shape == (6,)


def test_correction_lowers_the_output_error_of_a_low_bit_network():
    model = TINY_MODELS["conv-bn-act"]()
    recipe = Recipe.from_dict({**Recipe.preset("w4a4").to_dict(), "overrides": []})
    gm = _calibrated(model, recipe)
    before = _channel_mean_error(gm, model, HELD_OUT).abs().mean()
    gm, records = yoloq.run_pipeline(gm, (bias_correction(CALIB),))
    assert records[0].stats["layers"] == 3
    assert _channel_mean_error(gm, model, HELD_OUT).abs().mean() < 0.5 * before


def test_the_float_network_stays_float_and_a_second_run_changes_nothing():
    model = BiasedGridConv().eval()
    gm, _ = yoloq.run_pipeline(_calibrated(model), (bias_correction(CALIB),))
    first = gm.get_submodule("conv").bias_correction.clone()
    gm, records = yoloq.run_pipeline(gm, (bias_correction(CALIB),))
    torch.testing.assert_close(gm.get_submodule("conv").bias_correction, first, atol=1e-6, rtol=0)
    assert all(q.quantizing and not q.observing for _, q in quantizers(gm))
    for _, q in quantizers(gm):
        q.quantizing = False
    with torch.no_grad():
        torch.testing.assert_close(gm(HELD_OUT)[0], model(HELD_OUT), atol=1e-5, rtol=1e-5)


def test_float_layers_are_left_alone():
    model = TINY_MODELS["conv-bn-act"]()
    recipe = Recipe.from_dict({**W8A16.to_dict(), "overrides": [{"match": "*", "skip": True}]})
    gm, records = yoloq.run_pipeline(_calibrated(model, recipe), (bias_correction(CALIB),))
    assert not records[0].modified and records[0].stats["layers"] == 0
    assert not any(isinstance(m, QuantizedLayer) for m in gm.modules())


def test_needs_calibrated_quantizers():
    captured = yoloq.capture(BiasedGridConv().eval(), CALIB[0][:1])
    gm, _ = yoloq.run_pipeline(captured.graph_module, yoloq.build_pipeline("quantized", W8A16))
    with pytest.raises(yoloq.PassError, match=r"bias_correction failed after \[\]: .*uncalibrated quantizers"):
        yoloq.run_pipeline(gm, (bias_correction(CALIB),))


def _pass_names(recipe: Recipe, **kwargs) -> list[str]:
    return [yoloq.pipeline.pass_name(p) for p in yoloq.build_pipeline("calibrated", recipe, calib=CALIB, **kwargs)]


def test_recipe_flag_puts_the_pass_after_calibration():
    on = Recipe(bias_correction=True)
    assert _pass_names(on)[-3:] == ["calibrate", "tighten_pre_activation", "bias_correction"]
    assert "bias_correction" not in _pass_names(Recipe())
    assert "bias_correction" not in _pass_names(on, qat=True)


def test_recipe_field_is_validated_and_round_trips():
    with pytest.raises(RecipeError, match=r"recipe\.bias_correction: 'yes' is not true or false"):
        Recipe.from_dict({"bias_correction": "yes"})
    with pytest.raises(RecipeError, match=r"recipe\.bias_corection: unknown field"):
        Recipe.from_dict({"bias_corection": True})
    recipe = Recipe(bias_correction=True)
    assert Recipe.from_dict(recipe.to_dict()) == recipe == Recipe.from_yaml(recipe.to_yaml())
