"""A weight quantizer's grid multiplied per output channel: what folding a per-channel factor needs.

    before:  Q(W)[c]  = s_c · u(q)            u(q) = q − z on a uniform grid, ℓ_q on a non-uniform one
    after:   Q'(W)[c] = |t_c| s_c · u(q)      (LSQ+ adds its offset: o_c → t_c · o_c)

Zero points and unit levels do not change, so levels scale with the step: for ``t_c > 0``,
``Q'(t_c · W_c) = t_c · Q(W_c)`` with the same codes, on every grid. For ``t_c < 0`` the value
``t_c · Q(W_c)`` is the *mirror* of a grid point, and lies on the new grid only where the grid
holds the mirrored code (``−(q − z)`` in range, ``−ℓ_q`` a level); callers check that.

The result is per-channel whatever the input's granularity: a per-tensor or per-group scale (and
zero point, offset, per-group codebook) is first repeated over the channels, which changes no
value and no code.
"""
from __future__ import annotations

import copy

import torch

from yoloq.quantizers.fake_quantize import FakeQuantize
from yoloq.quantizers.observers import make_observer
from yoloq.quantizers.uniform import per_axis


def _per_channel(q: FakeQuantize, values: torch.Tensor, channels: int, ndim: int, axis: int) -> torch.Tensor:
    """A per-tensor ``()`` or per-channel / per-group qparam as a ``[1, .., C, .., 1]`` tensor."""
    if q.spec.granularity == "per_tensor":
        flat = values.reshape(1).expand(channels)
    else:
        flat = values.flatten()
        if q.spec.granularity == "per_group":
            flat = flat.repeat_interleave(q.spec.group_size)
    return per_axis(flat.clone(), ndim, axis)


@torch.no_grad()
def rescaled_per_channel(q: FakeQuantize, factor: torch.Tensor, ndim: int, axis: int) -> FakeQuantize:
    """A new per-channel quantizer whose grid is ``q``'s multiplied by ``factor`` (one value per
    channel on ``axis`` of an ``ndim``-D weight; module docstring). ``q`` is left as it was."""
    if not q.is_calibrated:
        raise RuntimeError(f"FakeQuantize({q.extra_repr()}): cannot rescale a quantizer without qparams")
    channels = factor.numel()
    factor = factor.detach().to(device=q.scale.device, dtype=torch.float32)
    out = copy.deepcopy(q)
    out.spec = q.spec.replace(granularity="per_channel", group_size=None)
    out.channel_axis = axis
    out.observer = make_observer(out.spec, axis)  # a later re-calibration sees per-channel rows
    out._observed_ndim = ndim
    view = per_axis(factor, ndim, axis)
    out._assign("scale", _per_channel(q, q.scale, channels, ndim, axis) * view.abs())
    if q.zero_point is not None:
        out._assign("zero_point", _per_channel(q, q.zero_point, channels, ndim, axis))
    if q.offset is not None:
        out._assign("offset", _per_channel(q, q.offset, channels, ndim, axis) * view)
    if q.unit_levels is not None and q.unit_levels.dim() == 2 and q.spec.granularity == "per_group":
        out._assign("unit_levels", q.unit_levels.repeat_interleave(q.spec.group_size, dim=0))
    return out
