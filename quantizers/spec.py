"""``QuantSpec``: how one tensor is quantized. The contract between recipes, planning and quantizers.

A spec is plain, frozen, validated data: it names the grid (bits, signedness, symmetric or affine,
uniform or one of the non-uniform schemes), how finely the grid's scale varies (per tensor, per
output channel, per group of ``group_size`` output channels), how the range is found from data
(the observer) and whether scale and offset are learned during QAT (LSQ / LSQ+). Every invalid
value raises ``SpecError`` naming the field and the valid values.

Integer range for ``bits = b``: signed ``[-2^(b-1), 2^(b-1) - 1]``, unsigned ``[0, 2^b - 1]``.
A symmetric signed grid keeps the zero point at 0; an affine grid learns/observes a zero point.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
SCHEMES = ("uniform", "pot", "apot", "codebook")
OBSERVERS = ("minmax", "ema_minmax", "percentile", "mse", "entropy")
LEARNED = ("none", "lsq", "lsq+")
MIN_BITS, MAX_BITS = 2, 16


class SpecError(ValueError):
    """An invalid quantization spec; the message names the field and the valid values."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: str = "per_tensor"
    group_size: int | None = None  # output channels per group; only with granularity per_group
    scheme: str = "uniform"
    observer: str = "minmax"
    learned: str = "none"
    percentile: float = 99.99  # for the percentile observer: the |x| percentile kept in range
    momentum: float = 0.1  # for ema_minmax: weight of the newest batch

    def __post_init__(self) -> None:
        problem = validate(self)
        if problem:
            raise SpecError(problem)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that differ from the defaults, so recipes stay short."""
        default = QuantSpec()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "spec") -> QuantSpec:
        """Build from a mapping; ``where`` prefixes error messages (e.g. ``overrides[2].weight``)."""
        if isinstance(data, QuantSpec):
            return data
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: expected a mapping of spec fields, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise SpecError(f"{where}: unknown field(s) {unknown}; valid fields: {known}")
        try:
            return cls(**dict(data))
        except SpecError as exc:
            raise SpecError(f"{where}.{exc}") from None

    def replace(self, **changes: Any) -> QuantSpec:
        return dataclasses.replace(self, **changes)


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> str | None:
    return None if value in valid else f"{name}: {value!r} is not one of {list(valid)}"


def validate(spec: QuantSpec) -> str | None:
    """None when ``spec`` is valid, else the first problem as ``field: what is wrong``."""
    if not isinstance(spec.bits, int) or isinstance(spec.bits, bool) or not MIN_BITS <= spec.bits <= MAX_BITS:
        return f"bits: {spec.bits!r} is not an integer in [{MIN_BITS}, {MAX_BITS}]"
    for name in ("signed", "symmetric"):
        if not isinstance(getattr(spec, name), bool):
            return f"{name}: {getattr(spec, name)!r} is not true or false"
    for name, valid in (("granularity", GRANULARITIES), ("scheme", SCHEMES), ("observer", OBSERVERS),
                        ("learned", LEARNED)):
        if problem := _choice(name, getattr(spec, name), valid):
            return problem
    if spec.granularity == "per_group":
        if not isinstance(spec.group_size, int) or isinstance(spec.group_size, bool) or spec.group_size < 1:
            return f"group_size: {spec.group_size!r} must be a positive integer with granularity per_group"
    elif spec.group_size is not None:
        return f"group_size: set to {spec.group_size!r} but granularity is {spec.granularity!r}, not 'per_group'"
    if not 50.0 < float(spec.percentile) <= 100.0:
        return f"percentile: {spec.percentile!r} is not in (50, 100]"
    if not 0.0 < float(spec.momentum) <= 1.0:
        return f"momentum: {spec.momentum!r} is not in (0, 1]"
    if spec.scheme != "uniform" and spec.learned == "lsq+":
        return f"learned: 'lsq+' learns an offset on a uniform grid; scheme is {spec.scheme!r} (use 'lsq' or 'none')"
    if spec.scheme in ("pot", "apot") and not spec.symmetric:
        return f"symmetric: scheme {spec.scheme!r} is a symmetric grid; set symmetric: true"
    return None
