"""Weight oscillation tracking (Nagel et al. 2022, "Overcoming oscillations in quantization-aware training").

With straight-through rounding, a latent weight near a rounding boundary flips between two grid
points from one step to the next. Per weight, after every optimizer step:

    q_t      its integer code (``FakeQuantize.codes`` of the weight the quantizer sees)
    moved    q_t ≠ q_{t−1};  direction d_t = sign(q_t − q_{t−1}) when moved, else d_{t−1}
    flip     moved and d_t = −d_{last move} (the code went back the way it came)
    f_t      = m · flip + (1 − m) · f_{t−1}      (EMA of the oscillation frequency, m = momentum)

A weight *oscillates* when f exceeds ``threshold``. Per layer the tracker reports the share of
oscillating weights and the mean frequency; ``state_dict`` makes it resumable. All ranks of a
data-parallel run see identical weights after the all-reduce, so their trackers agree.
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
                continue
            step = torch.sign(codes - self.codes[name]).to(torch.int8)
            moved = step != 0
            flip = moved & (step == -self.direction[name])
            self.frequency[name].mul_(1.0 - self.momentum).add_(flip.float(), alpha=self.momentum)
            self.direction[name] = torch.where(moved, step, self.direction[name])
            self.codes[name] = codes
        self.steps += 1

    def oscillating(self, name: str) -> torch.Tensor:
        """Boolean mask of ``name``'s weights whose frequency is above the threshold."""
        return self.frequency[name] > self.threshold

    def layer_stats(self) -> list[LayerOscillation]:
        return [LayerOscillation(name, f.numel(), float(self.oscillating(name).float().mean()), float(f.mean()))
                for name, f in self.frequency.items()]

    def summary(self) -> dict[str, float]:
        """Share of all tracked weights that oscillate, and their mean frequency."""
        if not self.frequency:
            return {"oscillating": 0.0, "frequency": 0.0}
        total = sum(f.numel() for f in self.frequency.values())
        osc = sum(int(self.oscillating(n).sum()) for n in self.frequency)
        mean = sum(float(f.sum()) for f in self.frequency.values()) / total
        return {"oscillating": osc / total, "frequency": mean}

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "threshold": self.threshold, "steps": self.steps,
                "codes": dict(self.codes), "direction": dict(self.direction), "frequency": dict(self.frequency)}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state["codes"]) - set(self.layers))
        if unknown:
            raise ValueError(f"oscillation state names layers this model does not have: {unknown[:5]}")
        self.momentum, self.threshold, self.steps = state["momentum"], state["threshold"], state["steps"]
        self.codes, self.direction = dict(state["codes"]), dict(state["direction"])
        self.frequency = dict(state["frequency"])
