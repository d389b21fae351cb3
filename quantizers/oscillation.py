"""Weight oscillation tracking (Nagel et al. 2022, "Overcoming oscillations in quantization-aware training").

With straight-through rounding, a latent weight near a rounding boundary flips between two grid
points from one step to the next. Per weight, after every optimizer step:

    q_t      its integer code (``FakeQuantize.codes`` of the weight the quantizer sees)
    moved    q_t ≠ q_{t−1};  direction d_t = sign(q_t − q_{t−1}) when moved, else d_{t−1}
    flip     moved and d_t = −d_{last move} (the code went back the way it came)
    f_t      = m · flip + (1 − m) · f_{t−1}      (EMA of the oscillation frequency, m = momentum)

A weight *oscillates* when f exceeds ``threshold``. Per layer the tracker reports the share of
oscillating weights, the share frozen and the mean frequency; ``state_dict`` makes it resumable.
All ranks of a data-parallel run see identical weights after the all-reduce, so their trackers agree.

The two remedies of the paper act on the same statistics:

    dampening   L_damp = mean over weights of (clip(w/s) − sg(round(clip(w/s))))², the latent
                weight pulled to the centre of its bin (integer units; s and the target detached)
    freezing    a weight whose f exceeds the (annealed) threshold is frozen to the rounded EMA of its
                integer value, ē_t = m · q_t + (1 − m) · ē_{t−1}: after every optimizer step its
                latent value is reset so that it quantizes to that code, whatever the scale learns
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class LayerOscillation:
    name: str
    weights: int
    oscillating: float  # share of weights with frequency above the threshold
    mean_frequency: float
    frozen: float = 0.0  # share of weights frozen


class OscillationTracker:
    """Tracks every quantized layer's weight codes in ``model`` (module docstring).

    The statistics of all layers live in one flat tensor per kind, so an update is a dozen passes
    over every weight at once rather than a dozen small ops per layer (on a CPU the per-op overhead
    of ~60 layers cost more than the arithmetic). The per-layer dicts (``codes``, ``frequency``, ...)
    are views into those tensors; ``state_dict`` keeps the per-layer form and dtypes."""

    KINDS = {"codes": torch.int16, "direction": torch.int8, "frequency": torch.float32,
             "mean_code": torch.float32, "frozen": torch.bool, "frozen_codes": torch.int16}

    def __init__(self, model: nn.Module, momentum: float = 0.01, threshold: float = 0.005):
        from yoloq.passes.insert_quantizers import QuantizedLayer  # passes import quantizers, not back

        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"oscillation momentum must be in (0, 1], got {momentum}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"oscillation threshold must be in [0, 1), got {threshold}")
        self.momentum, self.threshold = momentum, threshold
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, QuantizedLayer) and m.weight_quant is not None}
        self._slices: dict[str, tuple[int, int, torch.Size]] = {}
        start = 0
        for name, layer in self.layers.items():
            shape = layer.layer.weight.shape
            self._slices[name] = (start, start + shape.numel(), shape)
            start += shape.numel()
        # Flat statistics (empty until the first update); codes, directions and frozen codes are held
        # as float (integer values) so that every update is plain float arithmetic.
        self._flat: dict[str, torch.Tensor] = {}
        self.steps = 0

    # ----------------------------------------------------------------------------- per-layer views
    def _view(self, kind: str, name: str) -> torch.Tensor:
        a, b, shape = self._slices[name]
        return self._flat[kind][a:b].view(shape)

    def _views(self, kind: str) -> dict[str, torch.Tensor]:
        if kind not in self._flat:
            return {}
        return {name: self._view(kind, name) for name in self._slices}

    codes = property(lambda self: self._views("codes"))
    direction = property(lambda self: self._views("direction"))
    frequency = property(lambda self: self._views("frequency"))
    mean_code = property(lambda self: self._views("mean_code"))  # EMA of the integer value
    frozen = property(lambda self: self._views("frozen"))  # bool mask
    frozen_codes = property(lambda self: self._views("frozen_codes"))

    @torch.no_grad()
    def current_codes(self, name: str) -> torch.Tensor:
        layer = self.layers[name]
        return layer.weight_quant.codes(layer.effective_weight())

    @torch.no_grad()
    def _all_codes(self) -> torch.Tensor:
        """Every layer's codes as float, written straight into one flat tensor: for a symmetric
        uniform grid ``clamp(round(W/s))`` in three in-place passes (what ``FakeQuantize.codes``
        computes, without its int32 round trip), else through ``codes``."""
        if not self.layers:
            return torch.zeros(0)
        device = next(iter(self.layers.values())).layer.weight.device
        flat = torch.empty(sum(b - a for a, b, _ in self._slices.values()), device=device)
        for name, (a, b, shape) in self._slices.items():
            layer, out = self.layers[name], flat[a:b].view(shape)
            quant = layer.weight_quant
            spec = quant.spec
            if spec.scheme == "uniform" and spec.symmetric and spec.learned in ("none", "lsq"):
                torch.div(layer.effective_weight(), quant._scale(), out=out).round_().clamp_(spec.qmin, spec.qmax)
            else:
                out.copy_(self.current_codes(name))
        return flat

    @torch.no_grad()
    def update(self) -> None:
        """Record one optimizer step (call it after ``optimizer.step()``)."""
        codes = self._all_codes()
        flat = self._flat
        if not flat:
            zeros = torch.zeros_like(codes)
            flat.update(codes=codes, direction=zeros, frequency=zeros.clone(), mean_code=codes.clone(),
                        frozen=torch.zeros_like(codes, dtype=torch.bool), frozen_codes=zeros.clone())
            self.steps += 1
            return
        if flat["codes"].device != codes.device:  # loaded from a checkpoint onto another device
            self._flat = flat = {kind: t.to(codes.device) for kind, t in flat.items()}
        m = self.momentum
        flat["mean_code"].mul_(1.0 - m).add_(codes, alpha=m)
        step = torch.sub(codes, flat["codes"]).sign_()
        direction = flat["direction"]
        # A flip is a move against the last move's direction: step · direction == −1 (0 when unmoved).
        flip = torch.eq(step * direction, -1.0, out=torch.empty_like(step))
        flat["frequency"].mul_(1.0 - m).add_(flip, alpha=m)
        moved = torch.abs(step, out=flip)  # flip is not needed any more
        direction.addcmul_(direction, moved, value=-1.0).add_(step)  # the new step where it moved
        flat["codes"] = codes
        self.steps += 1

    def oscillating(self, name: str) -> torch.Tensor:
        """Boolean mask of ``name``'s weights whose frequency is above the threshold and that are not
        frozen (a frozen weight's frequency decays from where it was, but it no longer moves)."""
        return (self._view("frequency", name) > self.threshold) & ~self._view("frozen", name)

    def layer_stats(self) -> list[LayerOscillation]:
        return [LayerOscillation(name, f.numel(), float(self.oscillating(name).float().mean()), float(f.mean()),
                                 float(self._view("frozen", name).float().mean()))
                for name, f in self.frequency.items()]

    def summary(self) -> dict[str, float]:
        """Shares of all tracked weights that oscillate and that are frozen, and their mean frequency."""
        if not self._flat or not self._flat["frequency"].numel():
            return {"oscillating": 0.0, "frozen": 0.0, "frequency": 0.0}
        frequency, frozen = self._flat["frequency"], self._flat["frozen"]
        total = frequency.numel()
        osc = int(((frequency > self.threshold) & ~frozen).sum())
        return {"oscillating": osc / total, "frozen": int(frozen.sum()) / total,
                "frequency": float(frequency.sum()) / total}

    # ----------------------------------------------------------------------------- remedies
    def dampening_loss(self) -> torch.Tensor:
        """L_damp of the module docstring over every tracked layer (differentiable in the weights)."""
        total, count = None, 0
        for layer in self.layers.values():
            quant = layer.weight_quant
            if quant.spec.scheme != "uniform":
                continue  # bins of a non-uniform grid have no single width to centre in
            zero_point = 0.0 if quant.spec.symmetric else quant._expand(quant.zero_point).detach()
            v = layer.effective_weight() / quant._scale().detach() + zero_point
            clipped = torch.clamp(v, quant.spec.qmin, quant.spec.qmax)
            term = (clipped - torch.round(clipped).detach()).pow(2).sum()
            total = term if total is None else total + term
            count += v.numel()
        if total is None:
            return torch.zeros(())
        return total / count

    @torch.no_grad()
    def freeze_(self, threshold: float) -> int:
        """Freeze every weight whose frequency exceeds ``threshold`` to its rounded mean code; returns
        how many were newly frozen. Call after ``update``; ``apply_frozen_`` then pins them."""
        if not self._flat:
            return 0
        flat = self._flat
        candidates = (flat["frequency"] > threshold) & ~flat["frozen"]
        newly = int(candidates.sum())
        if newly:
            flat["frozen_codes"][candidates] = torch.round(flat["mean_code"][candidates])
            flat["frozen"] |= candidates
        self.apply_frozen_()
        return newly

    @torch.no_grad()
    def apply_frozen_(self) -> None:
        """Reset every frozen weight's latent value to the one its frozen code dequantizes to (with
        the quantizer's current scale), so it keeps that code; call after every optimizer step."""
        if not self._flat or not bool(self._flat["frozen"].any()):
            return
        frozen, frozen_codes = self.frozen, self.frozen_codes
        for name, mask in frozen.items():
            if not bool(mask.any()):
                continue
            layer = self.layers[name]
            quant = layer.weight_quant
            codes = torch.where(mask, frozen_codes[name].to(torch.int32), self.current_codes(name))
            target = quant.dequantize(codes)
            weight = layer.layer.weight
            if layer.fold_bn:  # the quantizer sees W·k
                target = target / layer.bn_factor().view(-1, *([1] * (weight.dim() - 1)))
            weight.data = torch.where(mask, target.to(weight.dtype), weight.data)
        flat = self._flat
        flat["codes"] = torch.where(flat["frozen"], flat["frozen_codes"], flat["codes"])

    def state_dict(self) -> dict:
        state = {"momentum": self.momentum, "threshold": self.threshold, "steps": self.steps}
        for kind, dtype in self.KINDS.items():
            state[kind] = {name: view.to(dtype, copy=True) for name, view in self._views(kind).items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state["codes"]) - set(self.layers))
        if unknown:
            raise ValueError(f"oscillation state names layers this model does not have: {unknown[:5]}")
        missing = sorted(set(self.layers) - set(state["codes"])) if state["codes"] else []
        if missing:
            raise ValueError(f"oscillation state lacks layers this model has: {missing[:5]}")
        self.momentum, self.threshold, self.steps = state["momentum"], state["threshold"], state["steps"]
        self._flat = {}
        if state["codes"]:
            for kind in self.KINDS:
                flat = torch.cat([state[kind][name].reshape(-1) for name in self.layers])
                self._flat[kind] = flat if kind == "frozen" else flat.float()
