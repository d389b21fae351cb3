"""GPTQ weight rounding (Frantar et al. 2023, "GPTQ"; Frantar & Alistarh 2022, "Optimal Brain
Compression"): pick each layer's weight codes for the layer's output over the calibration images,
not for each weight alone.

    nearest:  Ŵ = s·clamp(round(W / s))                     each weight's own error, ≤ s/2
    gptq:     columns j = 1..K of W (K = C_in·k_h·k_w, in order of decreasing H_jj):
                  q_j = s·clamp(round(w_j / s))               w_j as updated so far
                  w_{>j} -= (w_j - q_j) · U_{j,>j} / U_jj     U: upper Cholesky factor of H⁻¹
              minimising  E‖(Ŵ - W) x‖²  with  H = E[x xᵀ] + λ·mean(diag H)·I

``x`` is the layer's input as im2col columns (one per output position; a grouped conv has one
``H`` per group), in the float network over the calibration batches (at most ``COLUMNS`` random
positions per batch, drawn evenly from its images). The grid is the weight quantizer's own: scale and clamp as calibrated, per
tensor, channel or group of output channels. Each error a column makes is spread over the columns
not yet rounded, where the inputs' correlation lets them absorb it. The objective includes the mean
output error, so ``bias_correction`` does not run after it (``build_pipeline``).

The chosen codes have to survive the fake-quant graph's own rounding: each weight moves to the
nearest value that rounds to its code (``s·(q ± ROUNDING_MARGIN)``; weights whose code is their
nearest one do not move), so the evaluation form, the integer graph and the export all read the
GPTQ codes, and the float network (what the report compares against) changes only where a weight
crossed a rounding boundary.

On yolov5n.pt (COCO128 at 640, 32 calibration images), 4-bit per-channel weights (the w4a8
preset, 8-bit activations): mAP50-95 0.021 with nearest rounding, 0.278 with GPTQ (FP32 0.3505,
square inputs). With 8-bit weights the layers' output error from their weights drops 4.8x (median
over layers), but mAP does not resolve it (four calibration sets: 0.3428 vs 0.3435 with bias
correction), so the w8a8 preset keeps nearest rounding and bias correction.

Uniform weight grids only: a power-of-two, APoT or codebook weight grid keeps nearest rounding
(``stats["skipped"]``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from yoloq.passes.calibrate import check_batches, require_calibrated, run_float
from yoloq.passes.insert_quantizers import QuantizedLayer
from yoloq.pipeline import PassResult

NAME = "gptq"
DAMPING = 0.01  # λ: H's diagonal mean times this is added to the diagonal (GPTQ's default)
COLUMNS = 16384  # random im2col positions kept per layer and batch
ROUNDING_MARGIN = 0.499  # where a moved weight lands, in steps from its code


def _roundable(m: nn.Module) -> bool:
    return (isinstance(m, QuantizedLayer) and m.weight_quant is not None and m.weight_quant.spec.scheme == "uniform"
            and isinstance(m.layer, (nn.Conv2d, nn.Linear)) and not isinstance(m.layer, nn.ConvTranspose2d)
            and not m.fold_bn)


class _Hessian:
    """Running ``Σ x xᵀ`` per group of ``layer``'s im2col input columns (float64)."""

    def __init__(self, layer: QuantizedLayer, generator: torch.Generator) -> None:
        self.layer, self.generator, self.total, self.count = layer, generator, None, 0

    def _columns(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.layer.layer
        if isinstance(conv, nn.Linear):
            return x.reshape(-1, x.shape[-1])[None]  # one group: [1, N, K]
        cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # B, C_in·kh·kw, L
        groups = conv.groups
        cols = cols.view(cols.shape[0], groups, -1, cols.shape[-1])  # input channels split by group
        return cols.permute(1, 0, 3, 2).reshape(groups, -1, cols.shape[2])  # [G, B·L, K]

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        parts = x.split(1) if isinstance(self.layer.layer, nn.Conv2d) else (x,)  # one image's im2col at a time
        for part in parts:
            cols = self._columns(part)
            if cols.shape[1] > COLUMNS // len(parts):
                keep = torch.randperm(cols.shape[1], generator=self.generator)[:COLUMNS // len(parts)]
                cols = cols[:, keep.to(cols.device)]
            cols = cols.double()
            gram = cols.transpose(1, 2) @ cols
            self.total = gram if self.total is None else self.total + gram
            self.count += cols.shape[1]

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


def gptq_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
               hessian: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Integer codes for ``weight`` [C, K] on the grid ``s·(q - z)`` (``scale``, ``zero`` [C, 1]),
    chosen by GPTQ with ``hessian`` [K, K] (module docstring)."""
    w = weight.double().clone()
    s, z = scale.double(), zero.double()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs that were always 0: unit curvature, so their weights round to nearest
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damping * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(w)
    for j in range(w.shape[1]):
        column = w[:, j:j + 1]
        q = torch.clamp(torch.round(column / s) + z, qmin, qmax)
        codes[:, j:j + 1] = q
        error = (column - (q - z) * s) / u[j, j]
        w[:, j + 1:] -= error @ u[j:j + 1, j + 1:]
    return codes[:, torch.argsort(order)].to(weight.dtype)


def _round_layer(layer: QuantizedLayer, hessians: torch.Tensor) -> float:
    """Move ``layer``'s weights onto their GPTQ codes; returns the share of codes not the nearest."""
    quant, weight = layer.weight_quant, layer.layer.weight
    channels, groups = weight.shape[0], hessians.shape[0]
    flat = weight.detach().reshape(channels, -1)
    scale = quant._scale().detach().expand(weight.shape).reshape(channels, -1)[:, :1]
    zero = (quant.zero_point.detach().expand(weight.shape).reshape(channels, -1)[:, :1]
            if not quant.spec.symmetric else torch.zeros_like(scale))
    rows = [t.split(channels // groups) for t in (flat, scale, zero)]  # each conv group's output channels
    codes = torch.cat([gptq_codes(w, s, z, quant.spec.qmin, quant.spec.qmax, h)
                       for w, s, z, h in zip(*rows, hessians)]).to(flat.dtype)
    nearest = torch.clamp(torch.round(flat / scale) + zero, quant.spec.qmin, quant.spec.qmax)
    low, high = (codes - zero - ROUNDING_MARGIN) * scale, (codes - zero + ROUNDING_MARGIN) * scale
    moved = torch.where(codes == nearest, flat, torch.minimum(torch.maximum(flat, low), high))
    with torch.no_grad():
        weight.copy_(moved.reshape(weight.shape))
    return float((codes != nearest).double().mean())


@dataclasses.dataclass(frozen=True)
class Gptq:
    batches: Sequence[torch.Tensor]
    name: str = NAME

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        layers = {name: m for name, m in gm.named_modules() if _roundable(m)}
        skipped = sum(isinstance(m, QuantizedLayer) and m.weight_quant is not None for m in gm.modules()) - len(layers)
        generator = torch.Generator().manual_seed(0)
        hessians = {name: _Hessian(m, generator) for name, m in layers.items()}
        run_float(gm, self.batches, [(m, hessians[name]) for name, m in layers.items()])
        changed = {name: _round_layer(layer, hessians[name].mean()) for name, layer in layers.items()
                   if hessians[name].count}
        for layer in layers.values():  # a nearest-rounding mean correction no longer applies
            layer.bias_correction = None
        notes = [f"{sum(changed.values()) / max(len(changed), 1):.1%} of codes differ from nearest rounding "
                 f"(mean over layers)"] if changed else []
        images = sum(int(b.shape[0]) for b in self.batches)
        return PassResult(gm, bool(changed), {"layers": len(changed), "skipped": skipped, "images": images}, notes)

    @staticmethod
    def requires(gm: fx.GraphModule) -> str | None:
        reason = require_calibrated(gm)
        if reason is not None:
            return reason
        simulated = [name for name, m in gm.named_modules() if isinstance(m, QuantizedLayer) and m.fold_bn]
        return f"layers with fold-simulated BN (a QAT graph): {simulated[:3]}" if simulated else None


def gptq(batches: Iterable[torch.Tensor]) -> Gptq:
    return Gptq(tuple(check_batches(batches)))
