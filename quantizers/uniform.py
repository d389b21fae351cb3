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
    with torch.no_grad():
        unclamped = torch.round(x / scale) + zero_point
        inside = (unclamped >= qmin) & (unclamped <= qmax)
        value = (torch.clamp(unclamped, qmin, qmax) - zero_point) * scale
    if not x.requires_grad:
        return value
    # value + 0 keeps the forward bit-exact; the masked identity carries the gradient.
    return value + (x - x.detach()) * inside


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
    scale = grad_scale(scale, grad_factor)
    v = x / scale
    low, high = qmin - zero_point, qmax - zero_point
    # where, not clamp: a tensor bound would share the gradient at a tie; here an end is an end.
    clipped = torch.where(v <= low, low, torch.where(v >= high, high, v))
    return round_pass(clipped) * scale


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
