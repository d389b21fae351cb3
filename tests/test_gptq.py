"""gptq: weight codes chosen for each layer's output over the calibration images.

On correlated inputs GPTQ's codes must give a lower output error than nearest rounding, on the
images it saw and on others; the fake-quant graph must read exactly the chosen codes (weights move
only where a code differs from the nearest one); grouped convs and linear layers are handled; the
lowered integer graph still matches the fake-quant graph bit for bit; the recipe field puts the pass
in PTQ pipelines in place of bias correction."""
import pytest
import torch
from torch import nn

import yoloq
from yoloq.models.tiny import TINY_MODELS
from yoloq.passes.gptq import gptq, gptq_codes
from yoloq.passes.insert_quantizers import QuantizedLayer
from yoloq.quantizers.spec import QuantSpec
from yoloq.recipe import Recipe, RecipeError

GEN = torch.Generator().manual_seed(0)
MIX = torch.randn(3, 3, generator=GEN)  # correlated input channels: what GPTQ exploits


def _images(n: int) -> torch.Tensor:
    x = torch.randn(n, 3, 16, 16, generator=GEN)
    return torch.einsum("oc,nchw->nohw", MIX, x) + 0.5 * torch.roll(x, 1, dims=-1)


CALIB = [_images(4) for _ in range(3)]
HELD_OUT = _images(8)
W4 = Recipe(weight=QuantSpec(bits=4, granularity="per_channel"), activation=QuantSpec(bits=16, signed=True),
            pre_activation=QuantSpec(bits=16), input=QuantSpec(bits=16), tighten_pre_activation=False)


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = nn.Linear(8, 5)

    def forward(self, x):
        y = self.b(self.a(x))
        return self.c(y.permute(0, 2, 3, 1))


def _quantized(rounding: str, recipe: Recipe = W4):
    recipe = Recipe(**{**recipe.__dict__, "weight_rounding": rounding})
    captured = yoloq.capture(Convs().eval(), CALIB[0][:1])
    gm, records = yoloq.run_pipeline(captured.graph_module, yoloq.build_pipeline("calibrated", recipe, calib=CALIB))
    return gm, {r.name: r for r in records}


def _error(gm, x: torch.Tensor) -> float:
    with torch.no_grad():
        (out,) = gm(x)
        return float((out - Convs().eval()(x)).square().mean())


def test_codes_lower_the_output_error_of_a_layer_on_seen_and_unseen_inputs():
    gen = torch.Generator().manual_seed(1)
    basis = torch.randn(24, 24, generator=gen)
    seen, unseen = (torch.randn(4096, 24, generator=gen) @ basis for _ in range(2))
    weight = torch.randn(16, 24, generator=gen)
    scale = weight.abs().amax(1, keepdim=True) / 7
    zero = torch.zeros_like(scale)
    codes = gptq_codes(weight, scale, zero, -8, 7, seen.T @ seen / len(seen))
    assert codes.min() >= -8 and codes.max() <= 7 and torch.equal(codes, codes.round())
    nearest = torch.clamp(torch.round(weight / scale), -8, 7)
    for x in (seen, unseen):
        e_nearest = ((nearest * scale - weight) @ x.T).square().mean()
        e_gptq = ((codes * scale - weight) @ x.T).square().mean()
        assert e_gptq < 0.6 * e_nearest


def test_pass_rounds_every_layer_and_the_graph_reads_its_codes():
    nearest, _ = _quantized("nearest")
    gm, records = _quantized("gptq")
    assert records["gptq"].stats == {"layers": 3, "skipped": 0, "images": 12}
    assert "bias_correction" not in records
    for name in ("a", "b", "c"):
        layer, reference = gm.get_submodule(name), nearest.get_submodule(name)
        assert isinstance(layer, QuantizedLayer) and layer.bias_correction is None
        codes = layer.weight_quant.codes(layer.layer.weight)
        old = reference.weight_quant.codes(reference.layer.weight)
        moved = layer.layer.weight != reference.layer.weight
        assert torch.equal(moved, codes != old)  # only weights whose code changed moved
        assert (codes != old).any()
    for x in (torch.cat(CALIB), HELD_OUT):
        assert _error(gm, x) < 0.8 * _error(nearest, x)


def test_integer_graph_matches_bit_for_bit():
    recipe = Recipe(**{**yoloq.Recipe.preset("w4a8").__dict__, "weight_rounding": "gptq"})
    model = TINY_MODELS["tiny-yolo"]().eval()
    calib = [torch.rand(2, 3, 64, 64, generator=GEN) for _ in range(2)]
    qm = yoloq.quantize(model, recipe, calib=calib)
    assert any(r.name == "gptq" for r in qm.records)
    check = yoloq.check_integer(yoloq.lower(qm), qm, calib)
    assert check.differing == 0, check.verdict


def _pass_names(recipe: Recipe, **kwargs) -> list[str]:
    return [yoloq.pipeline.pass_name(p) for p in yoloq.build_pipeline("calibrated", recipe, calib=CALIB, **kwargs)]


def test_recipe_field_replaces_bias_correction_in_ptq_only():
    recipe = Recipe(weight_rounding="gptq", bias_correction=True)
    assert _pass_names(recipe)[-3:] == ["calibrate", "tighten_pre_activation", "gptq"]
    assert "gptq" not in _pass_names(recipe, qat=True)
    assert "gptq" not in _pass_names(Recipe())


def test_recipe_field_is_validated_and_round_trips():
    with pytest.raises(RecipeError, match=r"recipe\.weight_rounding: 'adaround' is not one of \['nearest', 'gptq'\]"):
        Recipe.from_dict({"weight_rounding": "adaround"})
    recipe = Recipe(weight_rounding="gptq")
    assert Recipe.from_dict(recipe.to_dict()) == recipe == Recipe.from_yaml(recipe.to_yaml())


def test_needs_calibrated_quantizers():
    captured = yoloq.capture(Convs().eval(), CALIB[0][:1])
    gm, _ = yoloq.run_pipeline(captured.graph_module, yoloq.build_pipeline("quantized", W4))
    with pytest.raises(yoloq.PassError, match=r"gptq failed after \[\]: .*uncalibrated quantizers"):
        yoloq.run_pipeline(gm, (gptq(CALIB),))
