"""Quantizer-aware exponential moving average of a quantized network (the seed paper's EMA).

Every floating-point entry of the network's state — latent weights, biases, BatchNorm parameters
and running statistics, and the quantizers' learned scales and offsets — is averaged:

    θ̄_t = d_t · θ̄_{t−1} + (1 − d_t) · θ_t,     d_t = α · (1 − exp(−t / τ))

The ramp (d_1 ≈ 0) lets the average follow the early, fast-moving weights and settle to α
(0.9999 in the paper) later; τ = 2000 steps as YOLOv5's ModelEMA. Since scales are averaged with
the weights they quantize, the EMA copy is itself a consistent quantized network: ``copy_to``
loads it into a model for evaluation, correction and export. Integer entries (zero points,
counters) are copied, not averaged.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class QuantizedEMA:
    def __init__(self, network: nn.Module, decay: float = 0.9999, tau: float = 2000.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if tau <= 0:
            raise ValueError(f"EMA tau (ramp length in steps) must be > 0, got {tau}")
        self.decay, self.tau, self.updates = decay, tau, 0
        self.state = {k: v.detach().clone() for k, v in network.state_dict().items()}

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        for key, value in network.state_dict().items():
            average = self.state.get(key)
            if average is None or average.shape != value.shape:
                self.state[key] = value.detach().clone()
            elif value.is_floating_point():
                average.mul_(d).add_(value.detach(), alpha=1.0 - d)
            else:
                average.copy_(value)

    @torch.no_grad()
    def copy_to(self, network: nn.Module) -> None:
        """Load the averaged state into ``network`` (same architecture)."""
        network.load_state_dict(self.state)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "tau": self.tau, "updates": self.updates, "state": dict(self.state)}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.tau, self.updates = state["decay"], state["tau"], state["updates"]
        self.state = {k: v.clone() for k, v in state["state"].items()}
