"""``Recipe``: which ``QuantSpec`` each quantized tensor of a detector gets (policy, not mechanism).

A recipe holds one default spec per tensor kind (conv weights; activations, i.e. a layer's output;
pre-activations, i.e. a fused conv's output before its activation, the LUT input of DESIGN §7; the
image input) and ordered overrides, each addressed either by an fnmatch glob on the layer's
qualified name or by a role the planner assigns (``first``, ``head``, ``concat_input``).
``resolve`` starts from the defaults and applies every matching override in order; a later
override wins field by field, and a field an override leaves unset keeps its value.

A spec in an override replaces that kind's whole spec; it is not merged into the default:
``weight: {bits: 8}`` means ``QuantSpec(bits=8)``, a per-tensor grid. Merging would make an
override's meaning depend on the lines above it; this way one override reads on its own. Preset
YAML files use anchors to avoid repeating specs.

Recipes round-trip through dicts and YAML. An unknown key or bad value raises ``RecipeError``
naming its full path, e.g. ``recipe.overrides[1].wieght: unknown field; valid fields: [...]``.
Presets ship as ``yoloq/presets/<name>.yaml``; ``load_recipe`` takes a Recipe, a preset name or a
YAML path.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from yoloq.quantizers.spec import QuantSpec, SpecError

ROLES = ("first", "head", "concat_input")
CONCAT_POLICIES = ("shared", "requantize")
# How a conv's BatchNorm trains during QAT (PTQ always folds it into the float weights first):
# "separate" keeps BN its own op after the quantized conv (the seed paper's choice); "fold_simulated"
# quantizes the BN-folded weight and corrects with batch statistics (Krishnamoorthi 2018, §3.2.2).
QAT_BATCHNORM = ("separate", "fold_simulated")
# How PTQ picks weight codes: "nearest" rounds each weight alone; "gptq" picks them for each layer's
# output over the calibration images (passes/gptq.py).
WEIGHT_ROUNDING = ("nearest", "gptq")
LAYER_KINDS = ("weight", "activation", "pre_activation")  # the spec kinds an override can set

_PRESET_DIR = resources.files("yoloq").joinpath("presets")
PRESETS: tuple[str, ...] = tuple(sorted(
    entry.name.removesuffix(".yaml") for entry in _PRESET_DIR.iterdir() if entry.name.endswith(".yaml")))


class RecipeError(ValueError):
    """An invalid recipe; the message names the field by its full path and the valid values."""


@dataclasses.dataclass(frozen=True)
class LayerSpecs:
    """What one layer gets. A skipped layer stays in float, so all its specs are None."""

    weight: QuantSpec | None
    activation: QuantSpec | None
    pre_activation: QuantSpec | None
    skip: bool


@dataclasses.dataclass(frozen=True)
class Override:
    match: str | None = None  # fnmatch glob on the layer's qualified name, e.g. "model.24.*"
    role: str | None = None  # one of ROLES; exactly one of match / role is set
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None  # the layer's output tensor
    pre_activation: QuantSpec | None = None  # conv output before its fused activation
    skip: bool = False  # keep the layer in float; False leaves an earlier override's skip as it is

    def __post_init__(self) -> None:
        if (self.match is None) == (self.role is None):
            raise RecipeError(f"match/role: set exactly one of them (a name glob or one of {list(ROLES)}); "
                              f"got match={self.match!r}, role={self.role!r}")
        if self.match is not None and (not isinstance(self.match, str) or not self.match):
            raise RecipeError(f"match: {self.match!r} is not a non-empty glob string")
        if self.role is not None and self.role not in ROLES:
            raise RecipeError(f"role: {self.role!r} is not one of {list(ROLES)}")
        for kind in LAYER_KINDS:
            if not isinstance(getattr(self, kind), (QuantSpec, type(None))):
                raise RecipeError(f"{kind}: expected a QuantSpec or None, got {type(getattr(self, kind)).__name__}")
        if not isinstance(self.skip, bool):
            raise RecipeError(f"skip: {self.skip!r} is not true or false")
        if not self.skip and all(getattr(self, kind) is None for kind in LAYER_KINDS):
            raise RecipeError(f"{'/'.join(LAYER_KINDS)}/skip: none is set, so the override changes nothing")

    def matches(self, name: str, roles: frozenset[str] | set[str]) -> bool:
        return fnmatchcase(name, self.match) if self.match is not None else self.role in roles

    def _target(self) -> str:
        return f"match {self.match!r}" if self.match is not None else f"role {self.role!r}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"match": self.match} if self.match is not None else {"role": self.role}
        for kind in LAYER_KINDS:
            if getattr(self, kind) is not None:
                data[kind] = getattr(self, kind).to_dict()
        if self.skip:
            data["skip"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "override") -> Override:
        _check_keys(data, cls, where)
        values = {key: (_spec(value, f"{where}.{key}") if key in LAYER_KINDS and value is not None else value)
                  for key, value in data.items()}
        try:
            return cls(**values)
        except RecipeError as exc:
            raise RecipeError(f"{where}.{exc}") from None


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    weight: QuantSpec = QuantSpec(bits=8, granularity="per_channel")
    activation: QuantSpec = QuantSpec(bits=8, signed=False, symmetric=False)
    # 16 bits so the lookup table that replaces the fused activation sees a fine-grained input.
    pre_activation: QuantSpec = QuantSpec(bits=16)
    # Images are 8-bit data to begin with, so 8 bits here costs (almost) nothing.
    input: QuantSpec = QuantSpec(bits=8, signed=False, symmetric=False)
    overrides: tuple[Override, ...] = ()
    concat_policy: str = "shared"
    qat_batchnorm: str = "separate"
    # After calibration, fold each quantized layer's mean output error into its bias (PTQ; see
    # passes/bias_correction.py).
    bias_correction: bool = False
    # After calibration, narrow each fused layer's pre-activation grid to the values whose code after
    # the activation and its quantizer can still differ: finer steps, no added error (PTQ; see
    # passes/tighten_pre_activation.py).
    tighten_pre_activation: bool = True
    # PTQ weight codes (WEIGHT_ROUNDING); "gptq" includes each layer's mean output error in what it
    # minimises, so bias_correction does not run after it.
    weight_rounding: str = "nearest"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f"name: {self.name!r} is not a non-empty string")
        for kind in (*LAYER_KINDS, "input"):
            if not isinstance(getattr(self, kind), QuantSpec):
                raise RecipeError(f"{kind}: expected a QuantSpec, got {type(getattr(self, kind)).__name__}")
        if not isinstance(self.overrides, (tuple, list)):
            raise RecipeError(f"overrides: expected a tuple of Override, got {type(self.overrides).__name__}")
        # A list is accepted for convenience, but stored as a tuple so the recipe stays hashable.
        object.__setattr__(self, "overrides", tuple(self.overrides))
        for index, override in enumerate(self.overrides):
            if not isinstance(override, Override):
                raise RecipeError(f"overrides[{index}]: expected an Override, got {type(override).__name__} "
                                  f"(build recipes from dicts with Recipe.from_dict)")
        if self.concat_policy not in CONCAT_POLICIES:
            raise RecipeError(f"concat_policy: {self.concat_policy!r} is not one of {list(CONCAT_POLICIES)}")
        if self.qat_batchnorm not in QAT_BATCHNORM:
            raise RecipeError(f"qat_batchnorm: {self.qat_batchnorm!r} is not one of {list(QAT_BATCHNORM)}")
        if self.weight_rounding not in WEIGHT_ROUNDING:
            raise RecipeError(f"weight_rounding: {self.weight_rounding!r} is not one of {list(WEIGHT_ROUNDING)}")
        for flag in ("bias_correction", "tighten_pre_activation"):
            if not isinstance(getattr(self, flag), bool):
                raise RecipeError(f"{flag}: {getattr(self, flag)!r} is not true or false")

    def resolve(self, name: str, roles: frozenset[str] | set[str] = frozenset()) -> LayerSpecs:
        """The specs of layer ``name`` with planner-assigned ``roles``: defaults, then overrides in order."""
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:  # a misspelt role would otherwise silently match nothing
            raise RecipeError(f"roles: {unknown} not in {list(ROLES)}")
        specs = {kind: getattr(self, kind) for kind in LAYER_KINDS}
        skip = False
        for override in self.overrides:
            if override.matches(name, roles):
                specs.update({kind: getattr(override, kind) for kind in LAYER_KINDS
                              if getattr(override, kind) is not None})
                skip = skip or override.skip
        if skip:
            return LayerSpecs(weight=None, activation=None, pre_activation=None, skip=True)
        return LayerSpecs(**specs, skip=False)

    def unmatched(self, names: Iterable[str], roles_present: Iterable[str] = ()) -> list[str]:
        """Overrides that match none of ``names`` / ``roles_present``, described for a warning."""
        names, roles = list(names), frozenset(roles_present)
        return [f"overrides[{index}] {override._target()}" for index, override in enumerate(self.overrides)
                if not (override.role in roles if override.role is not None
                        else any(fnmatchcase(name, override.match) for name in names))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **{kind: getattr(self, kind).to_dict() for kind in (*LAYER_KINDS, "input")},
            "concat_policy": self.concat_policy,
            "qat_batchnorm": self.qat_batchnorm,
            "bias_correction": self.bias_correction,
            "tighten_pre_activation": self.tighten_pre_activation,
            "weight_rounding": self.weight_rounding,
            "overrides": [override.to_dict() for override in self.overrides],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "recipe") -> Recipe:
        _check_keys(data, cls, where)
        values = dict(data)
        for kind in (*LAYER_KINDS, "input"):
            if kind in values:
                values[kind] = _spec(values[kind], f"{where}.{kind}")
        if "overrides" in values:
            if not isinstance(values["overrides"], (list, tuple)):
                raise RecipeError(f"{where}.overrides: expected a list of overrides, "
                                  f"got {type(values['overrides']).__name__}")
            values["overrides"] = tuple(Override.from_dict(item, f"{where}.overrides[{index}]")
                                        for index, item in enumerate(values["overrides"]))
        try:
            return cls(**values)
        except RecipeError as exc:
            raise RecipeError(f"{where}.{exc}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> Recipe:
        """From a YAML file (a path object, or a one-line string ending in .yaml/.yml) or YAML text."""
        text, source = _read_source(path_or_text)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source or 'recipe'}: not valid YAML: {exc}") from None
        try:
            return cls.from_dict(data)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}" if source else str(exc)) from None

    @classmethod
    def preset(cls, name: str) -> Recipe:
        if name not in PRESETS:
            raise RecipeError(f"preset {name!r} does not exist; presets: {list(PRESETS)}")
        text = _PRESET_DIR.joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        try:
            return cls.from_yaml(text)
        except RecipeError as exc:
            raise RecipeError(f"presets/{name}.yaml: {exc}") from None


def load_recipe(recipe: Recipe | str | os.PathLike) -> Recipe:
    """A Recipe as is, a preset name (``"w4a4"``), or the path of a YAML recipe file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in PRESETS:
        return Recipe.preset(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe)
        if path.is_file():
            return Recipe.from_yaml(path)
        raise RecipeError(f"recipe {str(recipe)!r} is not a preset (presets: {list(PRESETS)}) "
                          f"and no such file: {path}")
    raise RecipeError(f"recipe: expected a Recipe, a preset name or a YAML path, got {type(recipe).__name__}")


def _check_keys(data: Any, cls: type, where: str) -> None:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted((key for key in data if key not in known), key=str)
    if unknown:
        raise RecipeError(f"{where}.{unknown[0]}: unknown field; valid fields: {known}")


def _spec(data: Any, where: str) -> QuantSpec:
    try:
        return QuantSpec.from_dict(data, where=where)
    except SpecError as exc:
        raise RecipeError(str(exc)) from exc


def _read_source(path_or_text: str | os.PathLike) -> tuple[str, str | None]:
    """(YAML text, the file it came from or None)."""
    is_path = isinstance(path_or_text, os.PathLike) or (
        isinstance(path_or_text, str) and "\n" not in path_or_text
        and path_or_text.endswith((".yaml", ".yml")))
    if not is_path:
        if not isinstance(path_or_text, str):
            raise RecipeError(f"recipe: expected YAML text or a path, got {type(path_or_text).__name__}")
        return path_or_text, None
    path = Path(path_or_text)
    if not path.is_file():
        raise RecipeError(f"{path}: no such file")
    return path.read_text(encoding="utf-8"), str(path)
