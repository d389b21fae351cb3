"""plan_quantization: kinds, scale-sharing groups, roles and specs on the tiny YOLO; policy
variants; the cases where it must not quantize; idempotence."""
import pytest
import torch

import yoloq
from yoloq.models.tiny import TINY_MODELS
from yoloq.passes.plan_quantization import QUANT, plan_quantization
from yoloq.quantizers.spec import QuantSpec
from yoloq.recipe import Override, Recipe

X = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _planned(recipe: Recipe, name: str = "tiny-yolo"):
    captured = yoloq.capture(TINY_MODELS[name](), X)
    gm, records = yoloq.run_pipeline(captured.graph_module, yoloq.build_pipeline("fused") + (plan_quantization(recipe),))
    return gm, records[-1]


def _by_target(gm):
    return {str(n.target) if n.op == "call_module" else n.name: n.meta[QUANT] for n in gm.graph.nodes}


def test_kinds_groups_and_roles_on_the_tiny_yolo():
    gm, record = _planned(Recipe.preset("w4a4"))
    a = _by_target(gm)
    assert a["x"].kind == "input" and a["stem.0.conv"].kind == "layer"
    assert a["sppf.pool"].kind == "passthrough" and a["up"].kind == "passthrough"
    # SPPF: cv1's output, the three pools and the concat share one scale
    assert a["sppf.cv1.conv"].group == a["sppf.pool"].group == a["cat_1"].group
    # upsample(p4) and p3 meet in a concat: the pyramid output joins the block output's group
    assert a["up"].group == a["sppf.cv2.conv"].group == a["block.cv2.conv"].group
    assert a["stem.0.conv"].roles == {"first"}
    assert "head" in a["head.box.0.1"].roles and "head" in a["head.cls.1.1"].roles
    assert "concat_input" in a["sppf.cv1.conv"].roles
    # w4a4: first and head layers at 8 bits, the rest at 4; fused layers get a 16-bit pre-activation
    assert a["stem.0.conv"].weight.bits == 8 and a["stem.1.conv"].weight.bits == 4
    assert a["head.box.0.1"].weight.bits == 8 and a["head.box.0.1"].pre_activation is None
    assert a["stem.1.conv"].pre_activation.bits == 16 and a["stem.1.conv"].output.bits == 4
    assert record.stats["layers"] == 18 and record.stats["groups"] < record.stats["layers"]


def test_group_takes_the_widest_spec_of_its_roots():
    gm, _ = _planned(Recipe.preset("w4a4"))
    a = _by_target(gm)
    # the head layers (8-bit outputs) read p3/p4, but only their own outputs are 8-bit
    assert a["head.box.0.1"].output.bits == 8 and a["block.cv2.conv"].output.bits == 4


def test_requantize_policy_makes_each_concat_a_root():
    shared, _ = _planned(Recipe.preset("w8a8"))
    requant, _ = _planned(Recipe.from_dict({**Recipe.preset("w8a8").to_dict(), "concat_policy": "requantize"}))
    s, r = _by_target(shared), _by_target(requant)
    assert s["cat_1"].kind == "passthrough" and r["cat_1"].kind == "compute"
    assert r["cat_1"].group != r["sppf.cv1.conv"].group
    assert len({x.group for x in r.values() if x.group is not None}) > len({x.group for x in s.values() if x.group is not None})


def test_skipped_layer_and_non_tensors_are_not_quantized():
    recipe = Recipe(overrides=(Override(match="stem.1.conv", skip=True),))
    gm, record = _planned(recipe)
    a = _by_target(gm)
    assert a["stem.1.conv"].skip and a["stem.1.conv"].weight is None and not a["stem.1.conv"].is_root
    assert record.stats["float_layers"] == 1
    guards = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("guard")]
    assert all(n.meta[QUANT].kind == "none" for n in guards)


def test_override_matching_nothing_warns_with_its_name():
    recipe = Recipe(overrides=(Override(match="model.99.*", weight=QuantSpec(bits=8)),))
    with pytest.warns(UserWarning, match=r"model\.99\.\*"):
        _, record = _planned(recipe)
    assert any("model.99.*" in note for note in record.notes)


def test_group_size_not_dividing_channels_names_the_layer():
    recipe = Recipe(weight=QuantSpec(bits=4, granularity="per_group", group_size=3))
    with pytest.raises(yoloq.PassError, match=r"plan_quantization.*layer stem\.0\.conv: group_size 3 does not divide its 16"):
        _planned(recipe)


def test_idempotent():
    gm, _ = _planned(Recipe.preset("w4a4"))
    first = _by_target(gm)
    gm, _ = yoloq.run_pipeline(gm, (plan_quantization(Recipe.preset("w4a4")),))
    assert _by_target(gm) == first
