"""Recipe: presets, dict/YAML round trips, override resolution, and errors that name the field."""
from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from yoloq.quantizers.spec import QuantSpec
from yoloq.recipe import PRESETS, LayerSpecs, Override, Recipe, RecipeError, load_recipe

W8 = QuantSpec(bits=8, granularity="per_channel")
W4 = QuantSpec(bits=4, granularity="per_channel", observer="mse")
A4 = QuantSpec(bits=4, signed=False, symmetric=False)
PRE8 = QuantSpec(bits=8)


def _with_overrides() -> Recipe:
    return Recipe(
        name="mixed",
        weight=W4,
        activation=A4,
        overrides=(
            Override(role="first", weight=W8),
            Override(match="model.2*", activation=QuantSpec(bits=6, signed=False, symmetric=False)),
            Override(match="model.24.*", weight=QuantSpec(bits=3, granularity="per_group", group_size=4),
                     pre_activation=PRE8),
            Override(match="model.9.cv1", skip=True),
        ),
        concat_policy="requantize",
    )


def _raises(match: str, fn, *args, **kwargs) -> RecipeError:
    with pytest.raises(RecipeError, match=re.escape(match)) as info:
        fn(*args, **kwargs)
    return info.value


# ---- presets and round trips -----------------------------------------------------------------

def test_presets_are_the_shipped_set():
    assert set(PRESETS) == {"w8a8", "w8a8-ort", "w4a8", "w4a4", "w3a3", "w4a4-all", "w4a4-nonuniform"}


def test_w8a8_ort_is_w8a8_with_8bit_unsigned_pre_activations():
    ort, w8a8 = Recipe.preset("w8a8-ort"), Recipe.preset("w8a8")
    pre = ort.pre_activation
    assert (pre.bits, pre.signed, pre.symmetric) == (8, False, False)
    assert dataclasses.replace(ort, name="w8a8", pre_activation=w8a8.pre_activation) == w8a8


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_dict_and_yaml(name):
    recipe = Recipe.preset(name)
    assert recipe.name == name
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert load_recipe(name) == recipe


def test_recipe_with_overrides_round_trips(tmp_path):
    recipe = _with_overrides()
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    path = tmp_path / "mixed.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path) == recipe
    assert Recipe.from_yaml(str(path)) == recipe
    assert load_recipe(path) == recipe and load_recipe(str(path)) == recipe
    assert hash(recipe) == hash(Recipe.from_yaml(recipe.to_yaml()))


def test_default_recipe_round_trips_and_to_dict_writes_only_non_default_spec_fields():
    recipe = Recipe()
    data = recipe.to_dict()
    assert data["weight"] == {"granularity": "per_channel"}
    assert data["pre_activation"] == {"bits": 16}
    assert data["overrides"] == []
    assert Recipe.from_dict(data) == recipe
    assert Recipe.from_dict({}) == recipe


def test_preset_contents():
    w8a8, w4a4 = Recipe.preset("w8a8"), Recipe.preset("w4a4")
    assert w8a8.weight == QuantSpec(bits=8, granularity="per_channel")
    assert (w8a8.activation.signed, w8a8.activation.symmetric, w8a8.activation.bits) == (False, False, 8)
    assert w8a8.resolve("model.24.m.0", {"head"}).activation.bits == 16  # handed to the float decoder
    assert (w4a4.weight.bits, w4a4.weight.learned, w4a4.activation.bits, w4a4.activation.learned) == (4, "lsq", 4, "lsq")
    for role in ("first", "head"):
        specs = w4a4.resolve("model.x", {role})
        assert (specs.weight.bits, specs.activation.bits) == (8, 8)
    w4a8 = Recipe.preset("w4a8")
    assert (w4a8.resolve("x", {"head"}).weight.bits, w4a8.resolve("x", {"head"}).activation.bits) == (8, 16)
    assert Recipe.preset("w3a3").resolve("x").weight.bits == 3
    assert Recipe.preset("w3a3").resolve("x", {"first"}).activation.bits == 8
    assert Recipe.preset("w4a4-all").overrides == ()
    nonuniform = Recipe.preset("w4a4-nonuniform")
    assert nonuniform.weight.scheme == "apot" and nonuniform.resolve("x", {"head"}).weight.scheme == "uniform"


def test_preset_files_start_with_a_comment():
    from importlib import resources
    for name in PRESETS:
        text = resources.files("yoloq").joinpath("presets", f"{name}.yaml").read_text()
        assert text.startswith("# "), name


# ---- resolve and unmatched -------------------------------------------------------------------

def test_resolve_defaults_when_nothing_matches():
    recipe = _with_overrides()
    assert recipe.resolve("model.5.conv") == LayerSpecs(W4, A4, recipe.pre_activation, False)


def test_resolve_applies_matching_overrides_field_by_field():
    recipe = _with_overrides()
    specs = recipe.resolve("model.24.m.0", {"first"})
    assert specs.weight == QuantSpec(bits=3, granularity="per_group", group_size=4)  # later override wins
    assert specs.activation == QuantSpec(bits=6, signed=False, symmetric=False)  # from the model.2* glob
    assert specs.pre_activation == PRE8
    first_only = recipe.resolve("model.0.conv", {"first"})
    assert (first_only.weight, first_only.activation) == (W8, A4)  # None fields leave the defaults


def test_order_decides_which_override_wins():
    a, b = QuantSpec(bits=5), QuantSpec(bits=6)
    recipe = Recipe(overrides=(Override(match="*", weight=a), Override(role="head", weight=b)))
    assert recipe.resolve("m", {"head"}).weight == b
    swapped = Recipe(overrides=(Override(role="head", weight=b), Override(match="*", weight=a)))
    assert swapped.resolve("m", {"head"}).weight == a


def test_glob_is_case_sensitive_and_whole_name():
    recipe = Recipe(overrides=(Override(match="model.1", weight=PRE8),))
    assert recipe.resolve("model.1").weight == PRE8
    assert recipe.resolve("model.10").weight == recipe.weight
    assert recipe.resolve("MODEL.1").weight == recipe.weight


def test_skip_keeps_the_layer_in_float():
    recipe = _with_overrides()
    assert recipe.resolve("model.9.cv1") == LayerSpecs(None, None, None, True)
    later = Recipe(overrides=(Override(match="a", skip=True), Override(match="a", weight=PRE8)))
    assert later.resolve("a").skip  # skip: false (the default) does not undo an earlier skip


def test_resolve_rejects_unknown_roles():
    _raises("roles: ['heads'] not in", Recipe().resolve, "x", {"heads"})


def test_unmatched_lists_overrides_that_match_nothing():
    recipe = _with_overrides()
    assert recipe.unmatched(["model.0.conv", "model.24.m.0"], {"first"}) == ["overrides[3] match 'model.9.cv1'"]
    assert recipe.unmatched(["model.9.cv1", "model.24.m.0"], {"head"}) == ["overrides[0] role 'first'"]
    assert recipe.unmatched([], ()) == [
        "overrides[0] role 'first'", "overrides[1] match 'model.2*'",
        "overrides[2] match 'model.24.*'", "overrides[3] match 'model.9.cv1'"]


# ---- errors name the field -------------------------------------------------------------------

def test_unknown_top_level_key():
    err = _raises("recipe.wieght: unknown field; valid fields: ['name', 'weight'", Recipe.from_dict, {"wieght": {}})
    assert "concat_policy" in str(err)


def test_unknown_key_in_an_override():
    _raises("recipe.overrides[1].wieght: unknown field", Recipe.from_dict,
            {"overrides": [{"role": "head", "skip": True}, {"match": "a", "wieght": {"bits": 8}}]})


def test_unknown_spec_field_in_an_override():
    _raises("recipe.overrides[0].weight: unknown field(s) ['bitz']", Recipe.from_dict,
            {"overrides": [{"role": "head", "weight": {"bitz": 8}}]})


@pytest.mark.parametrize("bits", [1, 17])
def test_bits_out_of_range(bits):
    _raises(f"recipe.activation.bits: {bits} is not an integer in [2, 16]", Recipe.from_dict,
            {"activation": {"bits": bits}})


def test_bad_granularity():
    _raises("recipe.weight.granularity: 'per_row' is not one of ['per_tensor', 'per_channel', 'per_group']",
            Recipe.from_dict, {"weight": {"granularity": "per_row"}})


def test_per_group_without_group_size():
    _raises("recipe.overrides[0].weight.group_size: None must be a positive integer", Recipe.from_dict,
            {"overrides": [{"match": "x", "weight": {"granularity": "per_group"}}]})


@pytest.mark.parametrize("override", [{"match": "x", "role": "head", "skip": True}, {"skip": True}])
def test_override_needs_exactly_one_of_match_and_role(override):
    _raises("recipe.overrides[0].match/role: set exactly one", Recipe.from_dict, {"overrides": [override]})


def test_bad_role_and_empty_override():
    _raises("recipe.overrides[0].role: 'last' is not one of ['first', 'head', 'concat_input']",
            Recipe.from_dict, {"overrides": [{"role": "last", "skip": True}]})
    _raises("recipe.overrides[0].weight/activation/pre_activation/skip: none is set", Recipe.from_dict,
            {"overrides": [{"match": "x"}]})


def test_bad_concat_policy():
    _raises("recipe.concat_policy: 'merge' is not one of ['shared', 'requantize']",
            Recipe.from_dict, {"concat_policy": "merge"})
    _raises("concat_policy: 'merge'", Recipe, concat_policy="merge")


def test_wrong_shapes():
    _raises("recipe: expected a mapping, got list", Recipe.from_dict, [1])
    _raises("recipe.overrides: expected a list of overrides, got dict", Recipe.from_dict, {"overrides": {}})
    _raises("recipe.weight: expected a mapping of spec fields, got NoneType", Recipe.from_dict, {"weight": None})
    _raises("overrides[0]: expected an Override, got dict", Recipe, overrides=({"role": "head"},))


def test_unknown_preset_name():
    err = _raises("preset 'w4a5' does not exist; presets: ['w3a3'", Recipe.preset, "w4a5")
    assert "w8a8" in str(err)
    err = _raises("recipe 'w4a5' is not a preset (presets: ['w3a3'", load_recipe, "w4a5")
    assert "no such file: w4a5" in str(err)


def test_yaml_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope.yaml"
    _raises(f"{missing}: no such file", Recipe.from_yaml, missing)
    _raises(f"{missing}: no such file", Recipe.from_yaml, str(missing))
    _raises("no such file", load_recipe, missing)


def test_errors_in_a_yaml_file_name_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"overrides": [{"role": "head", "skip": True}, {"match": "a", "wieght": {}}]}))
    _raises(f"{path}: recipe.overrides[1].wieght: unknown field", load_recipe, path)
    path.write_text("weight: {bits: [")
    _raises(f"{path}: not valid YAML", Recipe.from_yaml, path)


def test_recipe_is_frozen():
    with pytest.raises(AttributeError):
        Recipe().name = "x"
