"""``QATHook``: what quantization-aware training needs, attachable to any training loop and loss.

``yoloq.tools.qat.train_qat`` is built on it; a user with a trainer of their own writes::

    qm = yoloq.prepare_qat(model, "w4a4", calib=batches)        # BN kept, quantizers calibrated
    hook = QATHook(qm)
    optimizer = torch.optim.AdamW(hook.param_groups(lr=1e-4, scale_lr=1e-4))
    qm.graph_module.train()
    for images, targets in loader:
        loss = my_loss(qm.graph_module(images), targets)      # raw head outputs, any loss
        hook.check_loss(loss, images)                          # NaN/Inf: stops, naming the layer
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        hook.after_step()                                      # oscillation statistics, EMA, freezing
        print(hook.stats())
    hook.finish()                                              # the EMA copy into the model, if enabled

With ``dampening=λ`` add ``hook.regularization()`` to the loss (the oscillation dampening term,
its weight ramped from 0 to λ by a cosine over ``total_steps``); with ``freeze=(f_start, f_end)``
weights whose oscillation frequency exceeds a threshold annealed from f_start to f_end are frozen;
with ``ema_decay=α`` an EMA of weights, BN statistics and quantizer scales is kept and ``finish``
loads it into the model (see ``quantizers/oscillation.py`` and ``quantizers/ema.py``).

Parameter groups: quantizer scales and offsets (their own learning rate, no weight decay), conv and
linear weights (weight decay), and the rest — biases, BatchNorm affine parameters — without decay.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx
from torch import nn

from yoloq.quantizers.ema import QuantizedEMA
from yoloq.quantizers.fake_quantize import FakeQuantize
from yoloq.quantizers.oscillation import OscillationTracker
from yoloq.quantizers.uniform import SCALE_EPS

COLLAPSE_FACTOR = 1e-3  # a learned scale below this share of its calibrated value has collapsed


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the culprit layer."""


def network_of(model: nn.Module) -> fx.GraphModule:
    """The trainable graph of a ``QuantizedModel`` (or the GraphModule itself)."""
    network = getattr(model, "graph_module", model)
    if not isinstance(network, fx.GraphModule):
        raise TypeError(f"expected a QuantizedModel or a torch.fx.GraphModule, got {type(model).__name__}")
    return network


def split_parameters(network: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by group: ``scales``, ``weights`` (decayed) and ``other``."""
    quantizer_params = {id(p) for m in network.modules() if isinstance(m, FakeQuantize) for p in m.parameters()}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"scales": [], "weights": [], "other": []}
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        key = "scales" if id(p) in quantizer_params else "weights" if p.dim() > 1 else "other"
        groups[key].append((name, p))
    return groups


class QATHook:
    """QAT bookkeeping for one quantized network (module docstring)."""

    def __init__(self, model: nn.Module, oscillation_momentum: float = 0.01, oscillation_threshold: float = 0.005,
                 *, ema_decay: float | None = None, ema_tau: float = 2000.0, dampening: float = 0.0,
                 freeze: tuple[float, float] | None = None, total_steps: int | None = None):
        self.network = network_of(model)
        self.tracker = OscillationTracker(self.network, oscillation_momentum, oscillation_threshold)
        if dampening < 0 or not math.isfinite(dampening):
            raise ValueError(f"dampening must be a finite weight >= 0, got {dampening!r}")
        if freeze is not None and (len(freeze) != 2 or not all(0 < f < 1 for f in freeze)):
            raise ValueError(f"freeze must be (start, end) thresholds in (0, 1), got {freeze!r}")
        if (dampening or freeze) and not total_steps:
            raise ValueError("dampening and freezing are scheduled over total_steps; give it")
        self.dampening, self.freeze, self.total_steps = dampening, freeze, total_steps
        self.ema = QuantizedEMA(self.network, ema_decay, ema_tau) if ema_decay is not None else None
        self.step = 0
        self.calibrated_scales = {name: float(m.scale.detach().abs().min())
                                  for name, m in self.network.named_modules()
                                  if isinstance(m, FakeQuantize) and m.is_calibrated}

    def param_groups(self, lr: float, scale_lr: float = 1e-4, weight_decay: float = 5e-4) -> list[dict]:
        for what, value in (("lr", lr), ("scale_lr", scale_lr), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
        groups = split_parameters(self.network)
        settings = {"scales": (scale_lr, 0.0), "weights": (lr, weight_decay), "other": (lr, 0.0)}
        return [{"params": [p for _, p in groups[key]], "lr": settings[key][0], "weight_decay": settings[key][1],
                 "name": key} for key in ("scales", "weights", "other") if groups[key]]

    # ------------------------------------------------------------------------------ divergence
    def check_loss(self, loss: torch.Tensor, inputs: torch.Tensor | None = None) -> None:
        """Raise ``TrainingDiverged`` naming the step and culprit when ``loss`` is not finite."""
        if bool(torch.isfinite(loss.detach()).all()):
            return
        raise TrainingDiverged(f"step {self.step}: the loss is {float(loss.detach().flatten()[0])}; "
                               + self.diagnose(inputs))

    def collapsed_scales(self) -> list[str]:
        """Quantizers whose learned scale is not finite or fell below ``COLLAPSE_FACTOR`` of its start."""
        found = []
        for name, m in self.network.named_modules():
            if not isinstance(m, FakeQuantize) or not m.is_calibrated:
                continue
            scale = m.scale.detach()
            low = float(scale.abs().min()) if torch.isfinite(scale).all() else float("nan")
            start = self.calibrated_scales.get(name, low)
            if not math.isfinite(low) or low <= SCALE_EPS or low < start * COLLAPSE_FACTOR:
                found.append(f"{name} (scale {low:.3g}, calibrated {start:.3g})")
        return found

    def diagnose(self, inputs: torch.Tensor | None = None) -> str:
        parts = []
        collapsed = self.collapsed_scales()
        if collapsed:
            parts.append(f"collapsed quantizer scale(s): {', '.join(collapsed[:5])}")
        bad = [n for n, p in self.network.named_parameters() if not torch.isfinite(p.detach()).all()]
        if bad:
            parts.append(f"non-finite parameter(s): {', '.join(bad[:5])}")
        if inputs is not None:
            node = first_nonfinite_node(self.network, inputs)
            if node:
                parts.append(f"first non-finite output at graph node {node}")
        return "; ".join(parts) or "no parameter or scale is broken: the loss itself overflowed (lower the lr)"

    # ------------------------------------------------------------------------------ steps
    def progress(self) -> float:
        return min(self.step / self.total_steps, 1.0) if self.total_steps else 0.0

    def regularization(self) -> torch.Tensor | None:
        """The dampening term to add to the loss (None when dampening is off)."""
        if not self.dampening:
            return None
        weight = self.dampening * 0.5 * (1.0 - math.cos(math.pi * self.progress()))
        return weight * self.tracker.dampening_loss()

    def freeze_threshold(self) -> float | None:
        if self.freeze is None:
            return None
        start, end = self.freeze
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * self.progress()))

    def after_step(self) -> None:
        """Call after every ``optimizer.step()``: pins frozen weights, updates the oscillation
        statistics, freezes what now oscillates too often, and updates the EMA."""
        self.tracker.apply_frozen_()
        self.tracker.update()
        threshold = self.freeze_threshold()
        if threshold is not None:
            self.tracker.freeze_(threshold)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.network)

    def finish(self) -> None:
        """End of training: load the EMA copy into the model (evaluation and export use it)."""
        if self.ema is not None:
            self.ema.copy_to(self.network)

    def stats(self) -> dict[str, float]:
        return {"step": self.step, **self.tracker.summary()}

    def state_dict(self) -> dict:
        return {"step": self.step, "calibrated_scales": dict(self.calibrated_scales),
                "tracker": self.tracker.state_dict(), "ema": None if self.ema is None else self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.calibrated_scales = dict(state["calibrated_scales"])
        self.tracker.load_state_dict(state["tracker"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])


@torch.no_grad()
def first_nonfinite_node(network: fx.GraphModule, inputs: torch.Tensor) -> str | None:
    """The first node (graph order) whose output holds NaN or Inf on ``inputs``, with its module."""
    probe = copy.deepcopy(network)  # batch statistics of a train-mode BN would otherwise move

    class Finder(fx.Interpreter):
        found: str | None = None

        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if self.found is None and isinstance(out, torch.Tensor) and out.is_floating_point() \
                    and not torch.isfinite(out).all():
                where = f" ({n.target})" if n.op == "call_module" else ""
                self.found = f"{n.name}{where}"
            return out

    finder = Finder(probe)
    try:
        finder.run(inputs)
    except Exception:  # the diagnosis must not hide the divergence it explains
        pass
    return finder.found
