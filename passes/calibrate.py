"""Post-training calibration: observe float statistics, then fix every quantizer's parameters.

    1. every FakeQuantize observes and passes values through unchanged (the float network runs)
    2. the batches run; after each, every observer is told the batch ended (the roots of a shared
       scale are pooled within a batch; ``quantizers/observers.py``)
    3. each quantizer computes scale / zero point (levels for non-uniform schemes) from what it saw
       and switches to quantizing

All quantizers observe the same float network, so the order of layers does not bias the ranges.
Batches are checked first: a float tensor ``B x C x H x W`` with finite values, or a
``CalibrationError`` names the batch and what is wrong; nothing is modified before that.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

from yoloq.pipeline import PassResult
from yoloq.quantizers.fake_quantize import FakeQuantize

NAME = "calibrate"


class CalibrationError(ValueError):
    """Calibration data that cannot be used; names the batch and the problem."""


def check_batches(batches: Iterable[torch.Tensor], channels: int | None = None) -> list[torch.Tensor]:
    """The batches as a list, each verified (see module docstring)."""
    checked = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, torch.Tensor):
            raise CalibrationError(f"calibration batch {i} is a {type(batch).__name__}, expected a torch.Tensor")
        if batch.dim() != 4 or (channels is not None and batch.shape[1] != channels):
            want = f"B x {channels} x H x W" if channels else "B x C x H x W"
            raise CalibrationError(f"calibration batch {i} has shape {tuple(batch.shape)}, expected {want}")
        if not batch.is_floating_point():
            raise CalibrationError(f"calibration batch {i} is {batch.dtype}; expected floats in [0, 1]")
        if not torch.isfinite(batch).all():
            bad = int((~torch.isfinite(batch)).sum())
            raise CalibrationError(f"calibration batch {i} has {bad} NaN/Inf values")
        checked.append(batch)
    if not checked:
        raise CalibrationError("no calibration batches were given")
    return checked


def quantizers(gm: torch.nn.Module) -> list[tuple[str, FakeQuantize]]:
    return [(name, m) for name, m in gm.named_modules() if isinstance(m, FakeQuantize)]


def require_calibrated(gm: torch.nn.Module) -> str | None:
    """``requires`` of a pass that reads calibrated quantizers: None, or why it cannot run."""
    found = quantizers(gm)
    if not found:
        return "no FakeQuantize modules: run insert_quantizers and calibrate first"
    uncalibrated = [name for name, q in found if not q.is_calibrated]
    return f"uncalibrated quantizers (run calibrate first): {uncalibrated[:3]}" if uncalibrated else None


def run_float(gm: torch.nn.Module, batches: Iterable[torch.Tensor], pre_hooks: Iterable[tuple[torch.nn.Module, Any]]) -> None:
    """Run ``batches`` through ``gm``'s float network (every quantizer passes values through), in eval
    mode and without gradients, with each ``(module, hook)`` a forward pre-hook meanwhile; afterwards
    the hooks are gone, the quantizers quantize again and the training flag is as it was."""
    found = [q for _, q in quantizers(gm)]
    hooks = [module.register_forward_pre_hook(hook) for module, hook in pre_hooks]
    was_training = gm.training
    gm.eval()
    try:
        for q in found:
            q.observing, q.quantizing = False, False
        with torch.no_grad():
            for batch in batches:
                gm(batch)
    finally:
        for hook in hooks:
            hook.remove()
        for q in found:
            q.quantizing = True
        gm.train(was_training)


def set_mode(gm: torch.nn.Module, observing: bool, quantizing: bool) -> None:
    for _, q in quantizers(gm):
        q.observing, q.quantizing = observing, quantizing


@dataclasses.dataclass(frozen=True)
class Calibrate:
    batches: Sequence[torch.Tensor]
    name: str = NAME

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        found = quantizers(gm)
        set_mode(gm, observing=True, quantizing=False)
        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                for batch in self.batches:
                    gm(batch)
                    for _, q in found:
                        q.observer.end_batch()
        finally:
            gm.train(was_training)
        for _, q in found:
            q.calibrate_()
        images = sum(int(b.shape[0]) for b in self.batches)
        return PassResult(gm, bool(found), {"quantizers": len(found), "batches": len(self.batches), "images": images})

    @staticmethod
    def requires(gm: fx.GraphModule) -> str | None:
        return None if quantizers(gm) else "no FakeQuantize modules: run insert_quantizers first"


def calibrate(batches: Iterable[torch.Tensor]) -> Calibrate:
    return Calibrate(tuple(check_batches(batches)))
