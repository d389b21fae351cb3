"""``FakeQuantize``: the one module the passes insert; observes, then fake-quantizes, one tensor.

Life cycle::

    observing=True,  quantizing=False   forward(x) = x, the observer sees x        (calibration)
    calibrate_()                        qparams from the observer's range
    observing=False, quantizing=True    forward(x) = x̂ (PTQ evaluation, or QAT with autograd)

Stored qparams (``state_dict`` keys; buffers, or parameters when ``spec.learned != "none"``):

    uniform, learned none / lsq   scale, zero_point   x̂ = (q - z)·s,  q ∈ [qmin, qmax]
    uniform, learned lsq+         scale, offset       x̂ = q·s + β     (zero_point is None)
    pot / apot / codebook         scale, unit_levels  x̂ = s·ℓ_q,      q a level index in [0, L-1]

``scale``, ``zero_point`` and ``offset`` broadcast against the input: shape ``()`` per tensor,
``[1, .., R, .., 1]`` with ``R`` at ``channel_axis`` per channel (R = C) or per group
(R = C / group_size, expanded to channels by repetition in forward). ``unit_levels`` is ``[L]``, or
``[R, L]`` for a per-channel / per-group codebook. Loading a state_dict adopts the saved shapes and,
when it holds qparams, switches the module to quantizing.
"""
from __future__ import annotations

import torch
from torch import nn

from yoloq.quantizers import nonuniform, uniform
from yoloq.quantizers.observers import RowSample, from_rows, make_observer, to_rows
from yoloq.quantizers.spec import QuantSpec

QPARAM_NAMES = ("scale", "zero_point", "offset", "unit_levels")


class FakeQuantize(nn.Module):
    """Fake quantization of one tensor as ``spec`` says; ``channel_axis`` is 0 for conv weights
    (1 for transposed convs) and 1 for activations; per-tensor specs ignore it."""

    def __init__(self, spec: QuantSpec, channel_axis: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.observer = make_observer(spec, channel_axis)
        self.channel_axis = self.observer.channel_axis
        self.observing, self.quantizing = True, False
        self._sample = RowSample() if spec.scheme == "codebook" else None
        self._observed_ndim: int | None = None
        learned = spec.learned != "none"
        self._register("scale", learned)
        uniform_grid = spec.scheme == "uniform"
        self._register("zero_point", False, keep=uniform_grid and spec.learned != "lsq+")
        self._register("offset", True, keep=uniform_grid and spec.learned == "lsq+")
        self._register("unit_levels", False, keep=not uniform_grid)

    def _register(self, name: str, learnable: bool, keep: bool = True) -> None:
        if not keep:
            self.register_buffer(name, None)
        elif learnable:
            self.register_parameter(name, nn.Parameter(torch.empty(0)))
        else:
            self.register_buffer(name, torch.empty(0))

    def _qparam_names(self) -> list[str]:
        return [n for n in QPARAM_NAMES if getattr(self, n) is not None]

    def _assign(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        value = value.detach().to(device=current.device, dtype=torch.float32)
        if isinstance(current, nn.Parameter):
            current.data = value  # same Parameter object, so an optimizer built earlier still sees it
        else:
            setattr(self, name, value)

    @property
    def is_calibrated(self) -> bool:
        return self.scale.numel() > 0

    # ----------------------------------------------------------------------------- calibration
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observer.update(x.detach())
            if self._sample is not None:
                self._sample.update(to_rows(x.detach(), self.spec, self.channel_axis))
            self._observed_ndim = x.dim()
        if not self.quantizing:
            return x
        return self._fake_quantize(x)

    def calibrate_(self) -> FakeQuantize:
        """Compute qparams from the observer, then stop observing and start quantizing."""
        if not self.observer.observed:
            raise RuntimeError(f"FakeQuantize({self.extra_repr()}).calibrate_(): no tensor observed yet; "
                               "run calibration batches through it with observing=True first")
        lo, hi = self.observer.range()
        with torch.no_grad():
            qparams = self._qparams_from_range(lo, hi)
        for name, value in qparams.items():
            if name != "unit_levels":
                value = self._param_shape(value)
            self._assign(name, value)
        if self._sample is not None:  # up to a million values; a fitted codebook no longer needs them
            self._sample = RowSample()
        self.observing, self.quantizing = False, True
        return self

    compute_qparams = calibrate_

    def _param_shape(self, values: torch.Tensor) -> torch.Tensor:
        if self.channel_axis is None:
            return values.reshape(())
        return uniform.per_axis(values, self._observed_ndim, self.channel_axis)

    def _qparams_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.spec
        if spec.scheme == "uniform":
            scale, zero_point = uniform.uniform_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
            if spec.learned == "lsq+":
                return {"scale": scale, "offset": -zero_point * scale}
            return {"scale": scale, "zero_point": zero_point}
        if spec.scheme in ("pot", "apot"):
            table = (nonuniform.pot_levels if spec.scheme == "pot" else nonuniform.apot_levels)(spec.bits, spec.signed)
            scale = torch.maximum(lo.abs(), hi.abs()).clamp_min(uniform.SCALE_EPS)
            return {"scale": scale, "unit_levels": table}
        # The codebook is fitted to the sample clipped to the observer's range, so a percentile or
        # MSE observer keeps outliers from pulling levels out.
        rows = torch.minimum(torch.maximum(self._sample.rows, lo.reshape(-1, 1)), hi.reshape(-1, 1))
        levels = nonuniform.fit_codebook(rows, 2**spec.bits)
        if self.channel_axis is None:
            levels = nonuniform.unique_levels(levels)
        scale = levels.abs().amax(-1).clamp_min(uniform.SCALE_EPS)
        return {"scale": scale, "unit_levels": levels / scale[..., None]}

    # ----------------------------------------------------------------------------- quantizing
    def _check_input(self, x: torch.Tensor) -> None:
        if not self.is_calibrated:
            raise RuntimeError(f"FakeQuantize({self.extra_repr()}): quantizing without qparams; call "
                               "calibrate_() after observing, or load a calibrated state_dict")
        if self.channel_axis is None:
            return
        axis = self.channel_axis % self.scale.dim()
        channels = self.scale.shape[axis] * (self.spec.group_size or 1)
        if x.dim() != self.scale.dim() or x.shape[axis] != channels:
            raise ValueError(f"FakeQuantize was calibrated for {self.scale.dim()}-D inputs with {channels} "
                             f"channels on axis {axis}; got shape {tuple(x.shape)}")

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        if self.spec.granularity != "per_group":
            return t
        return t.repeat_interleave(self.spec.group_size, dim=self.channel_axis % t.dim())

    def _grad_factor(self, x: torch.Tensor) -> float:
        """LSQ's ``g`` with ``N`` elements per learned scale; non-uniform levels are in units of the
        top level, so ``Qp = 1`` there."""
        top = self.spec.qmax if self.spec.scheme == "uniform" else 1
        return uniform.lsq_grad_factor(x.numel() / self.scale.numel(), top)

    def _scale(self) -> torch.Tensor:
        scale = self.scale.clamp_min(uniform.SCALE_EPS) if self.spec.learned != "none" else self.scale
        return self._expand(scale)

    def _per_row(self, fn, v: torch.Tensor) -> torch.Tensor:
        """``fn(v, unit_levels)``, through rows when each row has its own table."""
        if self.unit_levels.dim() == 1:
            return fn(v, self.unit_levels)
        rows = to_rows(v, self.spec, self.channel_axis)
        return from_rows(fn(rows, self.unit_levels), v.shape, self.channel_axis)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        spec = self.spec
        g = self._grad_factor(x)
        if spec.scheme != "uniform":
            scale = self._scale()
            if spec.learned != "none":
                scale = uniform.grad_scale(scale, g)
            v = x / scale
            return self._per_row(nonuniform.project_pass, v) * scale
        if spec.learned == "lsq+":
            return uniform.lsq_plus_fake_quantize(x, self._scale(), self._expand(self.offset), spec.qmin, spec.qmax, g)
        # A symmetric grid's zero point is 0 by construction; a plain 0 saves two passes per call.
        zero_point = 0 if spec.symmetric else self._expand(self.zero_point)
        if isinstance(zero_point, torch.Tensor) and zero_point.numel() == 1:
            zero_point = float(zero_point)  # scalar bounds: cheaper clamps and compares
        if spec.learned == "none":
            return uniform.fake_quantize(x, self._scale(), zero_point, spec.qmin, spec.qmax)
        # The learned scale goes in unclamped: lsq_fake_quantize floors it itself, one op fewer.
        return uniform.lsq_fake_quantize(x, self._expand(self.scale), zero_point, spec.qmin, spec.qmax, g)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """int32 codes: uniform ``[qmin, qmax]``; non-uniform the level index ``[0, L-1]``."""
        self._check_input(x)
        spec, scale = self.spec, self._scale()
        if spec.scheme != "uniform":
            v = x / scale
            return self._per_row(nonuniform.nearest_level_index, v).to(torch.int32)
        if spec.learned == "lsq+":
            return uniform.quantize_with_offset(x, scale, self._expand(self.offset), spec.qmin, spec.qmax)
        return uniform.quantize(x, scale, self._expand(self.zero_point), spec.qmin, spec.qmax)

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Float values of ``codes`` (as ``codes`` returns them); equal to ``forward`` bit for bit."""
        self._check_input(codes)
        spec, scale = self.spec, self._scale()
        if spec.scheme != "uniform":
            return self._per_row(nonuniform.take_levels, codes.long()) * scale
        if spec.learned == "lsq+":
            return codes.to(torch.float32) * scale + self._expand(self.offset)
        return uniform.dequantize(codes, scale, self._expand(self.zero_point))

    # ----------------------------------------------------------------------------- reporting
    @property
    def levels(self) -> torch.Tensor | None:
        """Absolute level values: ``[L]`` per tensor, ``[R, L]`` per row; None on a uniform grid."""
        if self.unit_levels is None or not self.is_calibrated:
            return None
        scale = self.scale.detach()
        return scale * self.unit_levels if scale.dim() == 0 else scale.reshape(-1, 1) * self.unit_levels

    def scale_range(self) -> tuple[float, float]:
        if not self.is_calibrated:
            raise RuntimeError(f"FakeQuantize({self.extra_repr()}).scale_range(): not calibrated")
        scale = self.scale.detach()
        return float(scale.min()), float(scale.max())

    def extra_repr(self) -> str:
        s = self.spec
        group = f", group_size={s.group_size}" if s.granularity == "per_group" else ""
        return (f"bits={s.bits}, scheme={s.scheme}, granularity={s.granularity}{group}, signed={s.signed}, "
                f"symmetric={s.symmetric}, observer={s.observer}, learned={s.learned}, "
                f"channel_axis={self.channel_axis}, observing={self.observing}, quantizing={self.quantizing}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A fresh module holds empty qparams; adopt the saved shapes so loading is a plain copy.
        for name in self._qparam_names():
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.shape != getattr(self, name).shape:
                self._assign(name, torch.empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.is_calibrated:
            self.observing, self.quantizing = False, True
