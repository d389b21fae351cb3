"""Uniform integer grids: qparams from a range, quantize / dequantize, and fake quantization.

A uniform grid with scale ``s > 0``, zero point ``z`` and codes ``[qmin, qmax]``::

    q = clamp(round(x / s) + z, qmin, qmax)        round half to even (torch.round)
    x̂ = (q - z) · s

Three differentiable forms of ``x -> x̂`` are used during training:

* ``fake_quantize``: fixed ``s, z``; straight-through estimator (STE), ``∂x̂/∂x = 1`` where the
  clamp leaves ``round(x/s) + z`` unchanged, 0 where it clamps. While training, a grid of 2^16
  levels or more is simulated by its clamp alone (``_fine_grid_ste``).
* ``lsq_fake_quantize`` (LSQ, Esser et al. 2020): learned ``s``. With ``v = x/s`` and
  ``x̂ = round(clamp(v, qmin - z, qmax - z)) · s`` (the same values as above),

      ∂x̂/∂s = round(v) - v      if qmin - z <= v <= qmax - z   (ends inside)
              qmin - z           if v < qmin - z
              qmax - z           if v > qmax - z

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
    if qmax - qmin >= FINE_GRID_LEVELS - 1:
        return _fine_grid_ste(x, scale, zero_point, qmin, qmax)
    return _SteFakeQuantize.apply(x, scale, zero_point, qmin, qmax)


FINE_GRID_LEVELS = 2**16  # a fixed grid this fine is simulated by its clamp alone while training


def _fine_grid_ste(x: torch.Tensor, scale: torch.Tensor, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Training form of a fixed grid with at least 2^16 levels (the 16-bit pre-activation): the clamp
    to the grid's ends, without the rounding. Rounding moves a value by at most half a step, 1/131072
    of the range, thousands of times less than the step of the 8- or 4-bit grid that follows; leaving
    it out saves three passes over every conv output; the gradient is the STE's, 1 inside and 0
    beyond the ends. Evaluation (no gradient), the evaluation form and the integer graph round.
    When nothing clamps, ``x`` itself is returned."""
    with torch.no_grad():
        low, high = (qmin - zero_point) * scale, (qmax - zero_point) * scale
        if low.numel() == 1 and high.numel() == 1:
            smallest, largest = torch.aminmax(x.detach())
            if bool((smallest >= low) & (largest <= high)):
                return x
    return _ClampSte.apply(x, low, high)


class _ClampSte(torch.autograd.Function):
    """``clamp(x, low, high)`` with gradient 1 inside (ends included) and 0 outside, the mask made
    as float 0/1 by the comparison (``_ste_forward`` says why)."""

    @staticmethod
    def forward(ctx, x, low, high):
        out = torch.clamp(x, low, high)
        inside = torch.eq(out, x, out=torch.empty_like(out))
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return torch.mul(grad, inside, out=inside), None, None  # a second backward fails loudly


def _ste_forward(x, scale, zero_point, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized x, mask where the clamp did not act); the zero point is skipped when it is 0.

    Written for speed on large activations: in-place passes where the value is ours, and the mask
    made as float 0/1 by the comparison itself (``out=``): on the CPU, float × bool, bool -> float
    and ``torch.where`` each take 3–10× as long as one float pass."""
    centred = isinstance(zero_point, (int, float)) and zero_point == 0
    unclamped = (x / scale).round_()
    if not centred:
        unclamped += zero_point
    clamped = torch.clamp(unclamped, qmin, qmax)
    inside = torch.eq(clamped, unclamped, out=unclamped)  # unclamped is not needed after this
    if not centred:
        clamped -= zero_point
    clamped *= scale
    return clamped, inside


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
        return torch.mul(grad, inside, out=inside), None, None, None, None  # a second backward fails loudly


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
    ``scale`` is floored at ``SCALE_EPS`` inside (its gradient is 0 where the floor acts, as through
    ``clamp_min``), so a learned scale goes in as it is, without a separate clamp in the graph.
    """
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x.numel() / scale.numel(), qmax)
    low, high = qmin - zero_point, qmax - zero_point
    return _LsqFakeQuantize.apply(x, scale, low, high, grad_factor)


class _LsqFakeQuantize(torch.autograd.Function):
    """``round(clamp(x/s, lo, hi)) · s`` with LSQ's gradients written out (Esser et al. 2020, eq. 3):

        ∂x̂/∂x = 1 inside (lo ≤ x/s ≤ hi), 0 outside
        ∂x̂/∂s = round(x/s) − x/s inside, lo below, hi above;  then times g

    with the mask and ∂x̂/∂s saved from the forward's own passes instead of autograd's graph of
    divisions, wheres and straight-through terms (the values are the same). The ends count as inside
    (the paper's strict ``<`` differs only on the measure-zero set ``x/s ∈ {lo, hi}``), so one
    comparison of the clamped value with ``v`` gives the mask. Outside the range the rounded value
    *is* the end (lo, hi are integers), so ``∂x̂/∂s = rounded − v · inside`` needs no ``where``; the
    mask is float 0/1 (``_ste_forward`` says why), and a single scale's gradient is one dot product
    instead of a product tensor and a sum."""

    @staticmethod
    def forward(ctx, x, scale, low, high, grad_factor):
        # Three fresh tensors at most (output, mask, ∂x̂/∂s): on the CPU the first touch of a fresh
        # large buffer costs about as much as two passes over it, so temporaries are reused in place.
        raw, scale = scale, scale.clamp_min(SCALE_EPS)
        v = x / scale
        out = torch.clamp(v, low, high)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return out.round_().mul_(scale)
        inside = torch.eq(out, v, out=torch.empty_like(v))
        out.round_()
        d_scale = None
        if ctx.needs_input_grad[1]:  # rounded − v · inside, written over v
            d_scale = torch.sub(out, v.mul_(inside), out=v)
        ctx.save_for_backward(inside, d_scale, raw)
        ctx.scale_shape, ctx.grad_factor = scale.shape, grad_factor
        return out.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        inside, d_scale, raw_scale = ctx.saved_tensors
        # The mask is ours: the product goes into it (autograd's version check makes a second
        # backward through this graph an error, not a silent wrong gradient).
        grad_x = torch.mul(grad, inside, out=inside) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            if len(ctx.scale_shape) == 0 or ctx.scale_shape.numel() == 1:
                flat = grad.reshape(-1)
                total = torch.dot(flat, d_scale.reshape(-1).to(flat.dtype))
                grad_s = (total * ctx.grad_factor).reshape(ctx.scale_shape)
            else:
                grad_s = (grad * d_scale).sum_to_size(ctx.scale_shape) * ctx.grad_factor
            grad_s = grad_s * (raw_scale >= SCALE_EPS)  # none below the floor
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
