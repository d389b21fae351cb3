"""Uniform integer grids: qparams from a range, quantize / dequantize, and fake quantization.

A uniform grid with scale ``s > 0``, zero point ``z`` and codes ``[qmin, qmax]``::

    q = clamp(round(x / s) + z, qmin, qmax)        round half to even (torch.round)
    x̂ = (q - z) · s

Three differentiable forms of ``x -> x̂`` are used during training:

* ``fake_quantize``: fixed ``s, z``; straight-through estimator (STE), ``∂x̂/∂x = 1`` where the
  clamp leaves ``round(x/s) + z`` unchanged, 0 where it clamps.
* ``lsq_fake_quantize`` (LSQ, Esser et al. 2020): learned ``s``. With ``v = x/s`` and
  ``x̂ = round(clamp(v, qmin - z, qmax - z)) · s`` (the same values as above),

      ∂x̂/∂s = round(v) - v      if qmin - z < v < qmax - z
              qmin - z           if v <= qmin - z
              qmax - z           if v >= qmax - z

  multiplied by ``g = 1 / sqrt(N · Qp)`` (N elements per scale, ``Qp = qmax``).
* ``lsq_plus_fake_quantize`` (LSQ+, Bhalgat et al. 2020): learned ``s`` and float offset ``β``,
  ``x̂ = round(clamp((x - β)/s, qmin, qmax)) · s + β``; ``∂x̂/∂β = 0`` inside, ``1`` outside, also
  scaled by ``g``.

Every scale and offset broadcasts against ``x``; ``per_axis`` shapes a per-channel vector for that.
"""
from __future__ import annotations

import math

import torch

SCALE_EPS = 1e-8  # floor of every scale, so an all-zero tensor still has a valid grid


def per_axis(values: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """View a 1-D per-channel vector as ``[1, .., C, .., 1]`` (``C`` at ``axis``) to broadcast."""
    shape = [1] * ndim
    shape[axis % ndim] = values.numel()
    return values.reshape(shape)


def uniform_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int,
                    symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of a grid covering ``[lo, hi] ∪ {0}``, elementwise over the range.

    symmetric: ``s = max(|lo|, |hi|) / qmax``, ``z = 0`` (``±max|x|`` land on ``±qmax``).
    affine:    ``lo' = min(lo, 0)``, ``hi' = max(hi, 0)``, ``s = (hi' - lo') / (qmax - qmin)``,
               ``z = clamp(qmin - round(lo' / s), qmin, qmax)``, an integer, so 0 is exact.

    ``s`` is floored at ``SCALE_EPS``; the zero point is a float tensor holding integers.
    """
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    if symmetric:
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(SCALE_EPS)
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float,
             qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, qmin, qmax)`` as int32."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float) -> torch.Tensor:
    """``(q - z) · s`` in float32; exactly the value ``fake_quantize`` returns for the same codes."""
    return (codes.to(torch.float32) - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float,
                  qmin: int, qmax: int) -> torch.Tensor:
    """``dequantize(quantize(x))`` with the STE: gradient w.r.t. ``x`` is exactly 1 where
    ``qmin <= round(x/s) + z <= qmax`` and 0 where the clamp acts. ``s, z`` get no gradient."""
    if not x.requires_grad:
        with torch.no_grad():
            return _ste_forward(x, scale, zero_point, qmin, qmax)[0]
    return _SteFakeQuantize.apply(x, scale, zero_point, qmin, qmax)


def _ste_forward(x, scale, zero_point, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized x, mask where the clamp did not act); the zero point is skipped when it is 0."""
    centred = isinstance(zero_point, (int, float)) and zero_point == 0
    unclamped = torch.round(x / scale)
    if not centred:
        unclamped = unclamped + zero_point
    clamped = torch.clamp(unclamped, qmin, qmax)
    inside = clamped == unclamped
    if not centred:
        clamped = clamped - zero_point
    return clamped * scale, inside


class _SteFakeQuantize(torch.autograd.Function):
    """One saved mask instead of autograd's graph of the masked identity: training stays cheap."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        with torch.no_grad():
            value, inside = _ste_forward(x, scale, zero_point, qmin, qmax)
        ctx.save_for_backward(inside)
        return value

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward. Written as ``round(x) + (x - x)`` with the second
    term's gradient kept, so the forward value is exactly ``torch.round(x)``."""
    return torch.round(x).detach() + (x - x.detach())


def grad_scale(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` forward, ``factor · ∂L/∂t`` backward. The textbook form ``(t - t·g).detach() + t·g``
    can differ from ``t`` by one ulp; adding an exact zero that carries the gradient does not."""
    scaled = t * factor
    return t.detach() + (scaled - scaled.detach())


def lsq_grad_factor(elements_per_scale: float, qmax: int) -> float:
    """LSQ's gradient-scale factor ``g = 1 / sqrt(N · Qp)``."""
    return 1.0 / math.sqrt(max(float(elements_per_scale), 1.0) * max(qmax, 1))


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float,
                      qmin: int, qmax: int, grad_factor: float | None = None) -> torch.Tensor:
    """LSQ fake quantization with a learnable ``scale`` (module docstring for the gradients).

    ``grad_factor`` defaults to ``lsq_grad_factor(x.numel() / scale.numel(), qmax)``; pass it
    explicitly when ``scale`` was expanded from fewer learned values (per-group).
    ``zero_point`` is held fixed (an integer tensor or 0); the values equal ``fake_quantize``.
    """
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x.numel() / scale.numel(), qmax)
    low, high = qmin - zero_point, qmax - zero_point
    return _LsqFakeQuantize.apply(x, scale, low, high, grad_factor)


class _LsqFakeQuantize(torch.autograd.Function):
    """``round(clamp(x/s, lo, hi)) · s`` with LSQ's gradients written out (Esser et al. 2020, eq. 3):

        ∂x̂/∂x = 1 inside (lo < x/s < hi), 0 outside
        ∂x̂/∂s = round(x/s) − x/s inside, lo below, hi above;  then times g

    with the mask and ∂x̂/∂s saved from the forward's own passes instead of autograd's graph of
    divisions, wheres and straight-through terms (the values are the same)."""

    @staticmethod
    def forward(ctx, x, scale, low, high, grad_factor):
        v = x / scale
        clamped = torch.clamp(v, low, high)
        rounded = torch.round(clamped)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # Saved from the forward's own passes; ends are ends (v == lo counts as below).
            inside = (v > low) & (v < high)
            d_scale = torch.where(inside, rounded - v, clamped) if ctx.needs_input_grad[1] else None
            ctx.save_for_backward(inside, d_scale)
            ctx.scale_shape, ctx.grad_factor = scale.shape, grad_factor
        return rounded * scale

    @staticmethod
    def backward(ctx, grad):
        inside, d_scale = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (grad * d_scale).sum_to_size(ctx.scale_shape) * ctx.grad_factor
        return grad_x, grad_s, None, None, None


def lsq_plus_fake_quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                           qmin: int, qmax: int, grad_factor: float | None = None) -> torch.Tensor:
    """LSQ+ fake quantization ``round(clamp((x - β)/s, qmin, qmax)) · s + β`` with learnable
    ``s`` and ``β``, both gradients scaled by ``g`` (default as in ``lsq_fake_quantize``)."""
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x.numel() / scale.numel(), qmax)
    scale, offset = grad_scale(scale, grad_factor), grad_scale(offset, grad_factor)
    return round_pass(torch.clamp((x - offset) / scale, qmin, qmax)) * scale + offset


def quantize_with_offset(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                         qmin: int, qmax: int) -> torch.Tensor:
    """LSQ+ codes ``clamp(round((x - β)/s), qmin, qmax)`` as int32; ``x̂ = q · s + β``."""
    return torch.clamp(torch.round((x - offset) / scale), qmin, qmax).to(torch.int32)
