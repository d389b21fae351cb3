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
    """Tracks every quantized layer's weight codes in ``model`` (module docstring)."""

    def __init__(self, model: nn.Module, momentum: float = 0.01, threshold: float = 0.005):
        from yoloq.passes.insert_quantizers import QuantizedLayer  # passes import quantizers, not back

        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"oscillation momentum must be in (0, 1], got {momentum}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"oscillation threshold must be in [0, 1), got {threshold}")
        self.momentum, self.threshold = momentum, threshold
        self.layers = {name: m for name, m in model.named_modules()
                       if isinstance(m, QuantizedLayer) and m.weight_quant is not None}
        self.codes: dict[str, torch.Tensor] = {}
        self.direction: dict[str, torch.Tensor] = {}
        self.frequency: dict[str, torch.Tensor] = {}
        self.mean_code: dict[str, torch.Tensor] = {}  # EMA of the integer value
        self.frozen: dict[str, torch.Tensor] = {}  # bool mask
        self.frozen_codes: dict[str, torch.Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def current_codes(self, name: str) -> torch.Tensor:
        layer = self.layers[name]
        return layer.weight_quant.codes(layer.effective_weight()).to(torch.int16)

    @torch.no_grad()
    def update(self) -> None:
        """Record one optimizer step (call it after ``optimizer.step()``)."""
        for name in self.layers:
            codes = self.current_codes(name)
            if name not in self.codes:
                self.codes[name] = codes
                self.direction[name] = torch.zeros_like(codes, dtype=torch.int8)
                self.frequency[name] = torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
                self.mean_code[name] = codes.float()
                self.frozen[name] = torch.zeros_like(codes, dtype=torch.bool)
                self.frozen_codes[name] = torch.zeros_like(codes)
                continue
            self.mean_code[name].mul_(1.0 - self.momentum).add_(codes.float(), alpha=self.momentum)
            step = torch.sign(codes - self.codes[name]).to(torch.int8)
            moved = step != 0
            flip = moved & (step == -self.direction[name])
            self.frequency[name].mul_(1.0 - self.momentum).add_(flip.float(), alpha=self.momentum)
            self.direction[name] = torch.where(moved, step, self.direction[name])
            self.codes[name] = codes
        self.steps += 1

    def oscillating(self, name: str) -> torch.Tensor:
        """Boolean mask of ``name``'s weights whose frequency is above the threshold and that are not
        frozen (a frozen weight's frequency decays from where it was, but it no longer moves)."""
        return (self.frequency[name] > self.threshold) & ~self.frozen[name]

    def layer_stats(self) -> list[LayerOscillation]:
        return [LayerOscillation(name, f.numel(), float(self.oscillating(name).float().mean()), float(f.mean()),
                                 float(self.frozen[name].float().mean()))
                for name, f in self.frequency.items()]

    def summary(self) -> dict[str, float]:
        """Shares of all tracked weights that oscillate and that are frozen, and their mean frequency."""
        if not self.frequency:
            return {"oscillating": 0.0, "frozen": 0.0, "frequency": 0.0}
        total = sum(f.numel() for f in self.frequency.values())
        osc = sum(int(self.oscillating(n).sum()) for n in self.frequency)
        frozen = sum(int(m.sum()) for m in self.frozen.values())
        mean = sum(float(f.sum()) for f in self.frequency.values()) / total
        return {"oscillating": osc / total, "frozen": frozen / total, "frequency": mean}

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
        newly = 0
        for name in self.frequency:
            candidates = (self.frequency[name] > threshold) & ~self.frozen[name]
            count = int(candidates.sum())
            if count:
                self.frozen_codes[name][candidates] = torch.round(self.mean_code[name][candidates]).to(torch.int16)
                self.frozen[name] |= candidates
                newly += count
        self.apply_frozen_()
        return newly

    @torch.no_grad()
    def apply_frozen_(self) -> None:
        """Reset every frozen weight's latent value to the one its frozen code dequantizes to (with
        the quantizer's current scale), so it keeps that code; call after every optimizer step."""
        for name, mask in self.frozen.items():
            if not bool(mask.any()):
                continue
            layer = self.layers[name]
            quant = layer.weight_quant
            codes = torch.where(mask, self.frozen_codes[name], self.current_codes(name)).to(torch.int32)
            target = quant.dequantize(codes)
            weight = layer.layer.weight
            if layer.fold_bn:  # the quantizer sees W·k
                target = target / layer.bn_factor().view(-1, *([1] * (weight.dim() - 1)))
            weight.data = torch.where(mask, target.to(weight.dtype), weight.data)
            self.codes[name] = torch.where(mask, self.frozen_codes[name], self.codes[name])

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "threshold": self.threshold, "steps": self.steps,
                "codes": dict(self.codes), "direction": dict(self.direction), "frequency": dict(self.frequency),
                "mean_code": dict(self.mean_code), "frozen": dict(self.frozen), "frozen_codes": dict(self.frozen_codes)}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state["codes"]) - set(self.layers))
        if unknown:
            raise ValueError(f"oscillation state names layers this model does not have: {unknown[:5]}")
        self.momentum, self.threshold, self.steps = state["momentum"], state["threshold"], state["steps"]
        self.codes, self.direction = dict(state["codes"]), dict(state["direction"])
        self.frequency = dict(state["frequency"])
        self.mean_code, self.frozen = dict(state["mean_code"]), dict(state["frozen"])
        self.frozen_codes = dict(state["frozen_codes"])
