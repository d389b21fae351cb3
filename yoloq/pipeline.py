"""Pass infrastructure: the result every pass returns, the runner, and the one place that orders passes.

A pass is a callable ``GraphModule -> PassResult``. It may carry two optional predicates,
``requires(gm) -> str | None`` and ``ensures(gm) -> str | None``: ``None`` means the condition
holds, a string is the reason it does not. The runner checks them around every pass, lints and
recompiles the graph after it, times it, and turns any failure into a ``PassError`` that names
the pass and the passes that ran before it, so a broken pipeline points at its culprit.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch.fx as fx


@dataclasses.dataclass
class PassResult:
    """What a pass hands back: the (possibly new) graph, whether it changed, counters and notes."""

    gm: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


class Pass(Protocol):
    name: str

    def __call__(self, gm: fx.GraphModule) -> PassResult: ...


class PassError(RuntimeError):
    """A pass failed, or broke a predicate; the message names it and the passes before it."""


@dataclasses.dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    modified: bool
    stats: dict[str, Any]
    notes: tuple[str, ...]


Callback = Callable[[str, PassResult, float], None]


def pass_name(p: Any) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def _check(p: Any, hook: str, gm: fx.GraphModule) -> str | None:
    predicate = getattr(p, hook, None)
    return None if predicate is None else predicate(gm)


def run_pipeline(
    gm: fx.GraphModule, passes: Sequence[Any], callback: Callback | None = None, verify: bool = True
) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run ``passes`` in order. ``callback(name, result, seconds)`` sees every pass (dumps, timing)."""
    records: list[PassRecord] = []
    for p in passes:
        name = pass_name(p)
        where = f"{name} failed after [{', '.join(r.name for r in records)}]"
        try:
            if reason := _check(p, "requires", gm):
                raise PassError(f"{where}: requirement not met: {reason}")
            start = time.perf_counter()
            result = p(gm)
            seconds = time.perf_counter() - start
            if not isinstance(result, PassResult):
                raise PassError(f"{where}: returned {type(result).__name__}, not PassResult")
            if verify:
                result.gm.graph.lint()
            result.gm.recompile()
            if reason := _check(p, "ensures", result.gm):
                raise PassError(f"{where}: guarantee broken: {reason}")
        except PassError:
            raise
        except Exception as exc:
            raise PassError(f"{where}: {type(exc).__name__}: {exc}") from exc
        gm = result.gm
        records.append(PassRecord(name, seconds, result.modified, dict(result.stats), tuple(result.notes)))
        if callback is not None:
            callback(name, result, seconds)
    return gm, records


def build_pipeline(stage: str = "fused", recipe: Any = None, calib: Sequence[Any] | None = None,
                   qat: bool = False) -> tuple[Any, ...]:
    """The one place that knows pass order. ``stage`` names how far the rewrite goes:
    ``captured`` < ``folded`` < ``fused`` < ``quantized`` (needs ``recipe``) < ``calibrated``
    (needs ``recipe`` and ``calib`` batches).

    ``qat=True`` prepares for quantization-aware training: BatchNorm is not folded into the float
    weights (it stays after the quantized conv, or is fold-simulated per ``recipe.qat_batchnorm``).
    Without ``qat``, ``recipe.tighten_pre_activation`` and then ``recipe.weight_rounding == "gptq"``
    or else ``recipe.bias_correction`` add those passes after calibration (QAT learns its weights
    and biases, and its activation grids move)."""
    from yoloq.passes.bias_correction import bias_correction
    from yoloq.passes.calibrate import calibrate
    from yoloq.passes.fold_conv_bn import fold_conv_bn
    from yoloq.passes.fold_implicit import fold_implicit
    from yoloq.passes.fuse_conv_act import fuse_conv_act
    from yoloq.passes.gptq import gptq
    from yoloq.passes.insert_quantizers import insert_quantizers
    from yoloq.passes.plan_quantization import plan_quantization
    from yoloq.passes.qat_batchnorm import qat_batchnorm
    from yoloq.passes.tighten_pre_activation import tighten_pre_activation

    order = ("captured", "folded", "fused", "quantized", "calibrated")
    if stage not in order:
        raise ValueError(f"unknown pipeline stage {stage!r}; valid stages: {list(order)}")
    if order.index(stage) >= order.index("quantized") and recipe is None:
        raise ValueError(f"pipeline stage {stage!r} needs a recipe")
    if stage == "calibrated" and calib is None:
        raise ValueError("pipeline stage 'calibrated' needs calibration batches (calib)")
    steps: list[tuple[str, Any]] = [("folded", fold_implicit)] + ([] if qat else [("folded", fold_conv_bn)])
    steps.append(("fused", fuse_conv_act))
    if recipe is not None:
        steps += [("quantized", plan_quantization(recipe)), ("quantized", insert_quantizers)]
        if qat:
            steps.append(("quantized", qat_batchnorm(recipe.qat_batchnorm)))
    if calib is not None:
        steps.append(("calibrated", calibrate(calib)))
        ptq = recipe is not None and not qat  # QAT learns its weights and biases; its grids move
        if ptq and recipe.tighten_pre_activation:
            steps.append(("calibrated", tighten_pre_activation))
        if ptq and recipe.weight_rounding == "gptq":
            steps.append(("calibrated", gptq(calib)))  # it minimises the mean error too: no bias correction
        elif ptq and recipe.bias_correction:
            steps.append(("calibrated", bias_correction(calib)))
    return tuple(p for step, p in steps if order.index(step) <= order.index(stage))
