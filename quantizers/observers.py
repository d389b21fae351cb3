"""Observers: statistics over calibration batches -> a ``(min, max)`` range per scale.

Every observer views a batch as *rows*, one row per scale the spec asks for::

    per_tensor   [1, numel]                        range shape ()
    per_channel  [C, numel / C]  (C = x.shape[axis])   range shape [C]
    per_group    [C / n, numel · n / C]  (n = group_size, consecutive channels)   range shape [C / n]

and reduces each row to a range:

* minmax:      running ``min`` / ``max``.
* ema_minmax:  ``r ← r + m · (r_batch - r)`` with ``m = spec.momentum``; the first batch sets ``r``.
* percentile:  symmetric: ``a = P_p(|x|)``, range ``[max(min x, -a), min(max x, a)]``;
               affine: ``[P_(100-p)(x), P_p(x)]``. The mean of the per-batch ranges.
* mse:         ``argmin_c mean((Q_c(x) - x)^2)`` over 100 clipping ratios ``c`` from 1.0 to 0.2 of
               the batch's min-max range (``Q_c`` the spec's grid on ``c·[min, max]``; the uniform
               grid stands in for a codebook). The mean of the per-batch ranges.

* entropy:     TensorRT calibration: a 2048-bin histogram of ``|x|``, threshold ``T = i·w`` with
               ``i`` minimising ``KL(P_i || Q_i)`` (``P_i`` the first ``i`` bins with the tail folded
               into the last, ``Q_i`` those bins merged into ``qmax + 1`` levels and spread back);
               range ``[max(min x, -T), min(max x, T)]``.

For percentile and MSE a *batch* is everything observed since the last ``end_batch()`` (``range()``
ends a pending one). The roots of a scale-sharing group (a Concat's inputs) each call the group's
one quantizer once per forward pass, and ``calibrate`` ends the batch after the pass, so their
values are pooled, each in proportion to its size, and one search fits the range they share.
Fitting each root alone and averaging the ranges clips the widest root: on yolov5n (W8A8, COCO128)
the concat quantizers alone then cost 33.5 dB SQNR at the head outputs; pooled, 38.0 dB, as with
min-max ranges (38.4 dB).

Percentile and MSE sample at most ``SAMPLE_CAP`` / ``MSE_SAMPLE_CAP`` elements per batch with a
generator seeded per observer, so results are deterministic.
"""
from __future__ import annotations

import torch

from yoloq.quantizers.nonuniform import apot_levels, nonuniform_fake_quantize, pot_levels
from yoloq.quantizers.spec import QuantSpec, SpecError
from yoloq.quantizers.uniform import SCALE_EPS, fake_quantize, uniform_qparams

SAMPLE_CAP = 1_000_000
MSE_STEPS, MSE_MIN_RATIO = 100, 0.2
# The MSE search quantizes its sample once per candidate range: 2^17 values per row estimate the
# error to well under a percent, and keep a 640x640 batch of 8 at ~0.1 s per tensor, not ~1 s.
MSE_SAMPLE_CAP = 1 << 17
HISTOGRAM_BINS = 2048
KL_MAX_CANDIDATES = 256  # thresholds tried by the entropy search; spaced evenly over the bins


def to_rows(x: torch.Tensor, spec: QuantSpec, channel_axis: int | None) -> torch.Tensor:
    """``x`` as ``[rows, elements]``, one row per scale (module docstring)."""
    if spec.granularity == "per_tensor":
        return x.reshape(1, -1)
    axis = channel_axis % x.dim()
    channels = x.shape[axis]
    rows = x.movedim(axis, 0).reshape(channels, -1)
    if spec.granularity == "per_group":
        if channels % spec.group_size:
            raise SpecError(f"group_size: {channels} channels on axis {axis} are not divisible by "
                            f"group_size {spec.group_size}")
        rows = rows.reshape(channels // spec.group_size, -1)
    return rows


def from_rows(rows: torch.Tensor, shape: torch.Size, channel_axis: int | None) -> torch.Tensor:
    """Inverse of ``to_rows`` for a tensor of the given ``shape``."""
    if channel_axis is None:
        return rows.reshape(shape)
    axis = channel_axis % len(shape)
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return rows.reshape(moved).movedim(0, axis)


def sample_columns(rows: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    """At most about ``cap`` elements: the same random columns (with replacement) of every row."""
    count, width = rows.shape
    if rows.numel() <= cap:
        return rows
    index = torch.randint(width, (max(cap // count, 1),), generator=generator)
    return rows[:, index.to(rows.device)]


class Observer:
    """Base: turns batches into rows, checks they keep their channel count, returns the range."""

    def __init__(self, spec: QuantSpec, channel_axis: int | None = None) -> None:
        if spec.granularity != "per_tensor" and channel_axis is None:
            raise SpecError(f"granularity: {spec.granularity!r} needs a channel_axis (0 for weights, "
                            "1 for activations)")
        self.spec = spec
        self.channel_axis = channel_axis if spec.granularity != "per_tensor" else None
        self.channels: int | None = None
        self.batches = 0
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(0)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            raise ValueError(f"{type(self).__name__}: cannot observe an empty tensor of shape {tuple(x.shape)}")
        channels = x.shape[self.channel_axis % x.dim()] if self.channel_axis is not None else None
        if self.channels is not None and channels != self.channels:
            raise ValueError(f"{type(self).__name__}: earlier batches had {self.channels} channels on "
                             f"axis {self.channel_axis}, this one has shape {tuple(x.shape)}")
        rows = to_rows(x.detach(), self.spec, self.channel_axis).to(torch.float32)
        self.channels = channels
        self.batches += 1
        return rows

    @property
    def observed(self) -> bool:
        return self.batches > 0

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def end_batch(self) -> None:
        """Marks the end of one calibration batch; only observers that reduce per batch care."""

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``: 0-d per tensor, ``[rows]`` per channel or group."""
        if not self.observed:
            raise RuntimeError(f"{type(self).__name__}: no tensor observed yet; run calibration batches first")
        lo, hi = self._range()
        if self.spec.granularity == "per_tensor":
            return lo.reshape(()), hi.reshape(())
        return lo, hi

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    def update(self, x: torch.Tensor) -> None:
        self._track_extremes(self.rows(x))

    def _track_extremes(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(1), rows.amax(1)
        if self.batches > 1:
            lo, hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self.lo, self.hi = lo, hi

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi


class EmaMinMaxObserver(MinMaxObserver):
    def update(self, x: torch.Tensor) -> None:
        rows = self.rows(x)
        lo, hi = rows.amin(1), rows.amax(1)
        if self.batches > 1:
            m = self.spec.momentum
            lo, hi = self.lo + m * (lo - self.lo), self.hi + m * (hi - self.hi)
        self.lo, self.hi = lo, hi


def pool_columns(a: torch.Tensor, a_width: int, b: torch.Tensor, b_width: int, cap: int,
                 generator: torch.Generator) -> torch.Tensor:
    """One sample of the columns of two tensors, ``a`` and ``b`` being samples (or all) of their
    ``a_width`` and ``b_width`` columns: both whole when they fit in ``cap``, else at most about
    ``cap`` elements drawn (with replacement) from each in proportion to its width."""
    if a.shape[1] == a_width and b.shape[1] == b_width and a.numel() + b.numel() <= cap:
        return torch.cat([a, b], dim=1)
    columns = max(cap // a.shape[0], 2)
    from_a = min(max(round(columns * a_width / (a_width + b_width)), 1), columns - 1)
    picks = [torch.randint(t.shape[1], (n,), generator=generator) for t, n in ((a, from_a), (b, columns - from_a))]
    return torch.cat([a[:, picks[0].to(a.device)], b[:, picks[1].to(b.device)]], dim=1)


class _BatchMeanObserver(MinMaxObserver):
    """Reduces each batch (module docstring) to a range with ``batch_range`` on a sample of at most
    ``sample_cap`` elements and the batch's extremes; keeps the mean of those ranges."""

    sample_cap = SAMPLE_CAP

    def __init__(self, spec: QuantSpec, channel_axis: int | None = None) -> None:
        super().__init__(spec, channel_axis)
        self.pending: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = None
        self.ended = 0  # batches reduced to a range

    def update(self, x: torch.Tensor) -> None:
        rows = self.rows(x)
        sample, width = sample_columns(rows, self.sample_cap, self.generator), rows.shape[1]
        lo, hi = rows.amin(1), rows.amax(1)
        if self.pending is not None:
            pooled, pooled_width, pooled_lo, pooled_hi = self.pending
            sample = pool_columns(pooled, pooled_width, sample, width, self.sample_cap, self.generator)
            width, lo, hi = pooled_width + width, torch.minimum(pooled_lo, lo), torch.maximum(pooled_hi, hi)
        self.pending = (sample, width, lo, hi)

    def end_batch(self) -> None:
        if self.pending is None:
            return
        sample, _, lo, hi = self.pending
        self.pending = None
        lo, hi = self.batch_range(sample, lo, hi)
        self.ended += 1
        if self.ended > 1:
            lo, hi = self.lo + (lo - self.lo) / self.ended, self.hi + (hi - self.hi) / self.ended
        self.lo, self.hi = lo, hi

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.end_batch()
        return self.lo, self.hi

    def batch_range(self, sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The range for one batch from a sample of its rows and their true extremes ``lo``, ``hi``."""
        raise NotImplementedError


class PercentileObserver(_BatchMeanObserver):
    def batch_range(self, sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.spec.percentile / 100.0
        if self.spec.symmetric:
            a = torch.quantile(sample.abs(), q, dim=1)
            return torch.maximum(lo, -a), torch.minimum(hi, a)
        return torch.quantile(sample, 1.0 - q, dim=1), torch.quantile(sample, q, dim=1)


def grid_error_fn(spec: QuantSpec):
    """``(rows, lo, hi) -> rows quantized`` on the spec's grid with range ``[lo, hi]`` per row."""
    if spec.scheme in ("pot", "apot"):
        table = (pot_levels if spec.scheme == "pot" else apot_levels)(spec.bits, spec.signed)

        def nonuniform(rows, lo, hi):
            scale = torch.maximum(lo.abs(), hi.abs()).clamp_min(SCALE_EPS)[:, None]
            return nonuniform_fake_quantize(rows, scale, table.to(rows.device))
        return nonuniform

    def uniform(rows, lo, hi):
        scale, zero_point = uniform_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
        return fake_quantize(rows, scale[:, None], zero_point[:, None], spec.qmin, spec.qmax)
    return uniform


class MseObserver(_BatchMeanObserver):
    sample_cap = MSE_SAMPLE_CAP

    def batch_range(self, sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        quantized = grid_error_fn(self.spec)
        best_error = torch.full_like(lo, float("inf"))
        best_ratio = torch.ones_like(lo)
        for ratio in torch.linspace(1.0, MSE_MIN_RATIO, MSE_STEPS).tolist():
            error = (quantized(sample, lo * ratio, hi * ratio) - sample).square().mean(1)
            better = error < best_error  # strict: on a tie the wider range stays
            best_error = torch.where(better, error, best_error)
            best_ratio = torch.where(better, ratio, best_ratio)
        return lo * best_ratio, hi * best_ratio


def _kl_divergence(hist: torch.Tensor, bins: int, levels: int) -> torch.Tensor:
    """``KL(P || Q)`` per row for the threshold at ``bins`` bins (TensorRT's construction)."""
    kept = hist[:, :bins]
    p = kept.clone()
    p[:, -1] += hist[:, bins:].sum(1)
    nonzero = (p > 0).to(hist.dtype)
    chunk = (torch.arange(bins, device=hist.device) // (bins // levels)).clamp(max=levels - 1)
    mass = hist.new_zeros(hist.shape[0], levels).index_add_(1, chunk, kept)
    support = hist.new_zeros(hist.shape[0], levels).index_add_(1, chunk, nonzero)
    q = (mass / support.clamp_min(1.0))[:, chunk] * nonzero
    p = p / p.sum(1, keepdim=True).clamp_min(1e-30)
    q = q / q.sum(1, keepdim=True).clamp_min(1e-30)
    # A bin P has and Q lacks (tail mass alone in a chunk) costs a lot, not infinity.
    return (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-12).log())).sum(1)


def kl_threshold_bins(hist: torch.Tensor, levels: int) -> torch.Tensor:
    """Per row, the number of histogram bins whose upper edge is the KL-optimal threshold."""
    count, total = hist.shape
    best_bins = torch.full((count,), total, dtype=torch.long, device=hist.device)
    if levels >= total:
        return best_bins
    step = max(1, (total - levels) // KL_MAX_CANDIDATES)
    best = torch.full((count,), float("inf"), device=hist.device)
    for bins in [*range(levels, total, step), total]:
        kl = _kl_divergence(hist, bins, levels)
        better = kl < best
        best = torch.where(better, kl, best)
        best_bins = torch.where(better, bins, best_bins)
    return best_bins


class EntropyObserver(MinMaxObserver):
    def update(self, x: torch.Tensor) -> None:
        rows = self.rows(x)
        self._track_extremes(rows)
        magnitudes = rows.abs()
        needed = magnitudes.amax(1).clamp_min(SCALE_EPS) / HISTOGRAM_BINS
        if self.batches == 1:
            self.width, self.hist = needed, rows.new_zeros(rows.shape[0], HISTOGRAM_BINS)
        elif bool((needed > self.width).any()):
            wider = torch.maximum(self.width, needed)
            self.hist, self.width = _rebin(self.hist, self.width, wider), wider
        index = (magnitudes / self.width[:, None]).floor().long().clamp(0, HISTOGRAM_BINS - 1)
        self.hist.scatter_add_(1, index, torch.ones_like(magnitudes))

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        threshold = kl_threshold_bins(self.hist, self.spec.qmax + 1).to(self.width.dtype) * self.width
        return torch.maximum(self.lo, -threshold), torch.minimum(self.hi, threshold)


def _rebin(hist: torch.Tensor, width: torch.Tensor, new_width: torch.Tensor) -> torch.Tensor:
    """Move each old bin's count to the wider bin holding its centre (the range grew)."""
    centres = (torch.arange(hist.shape[1], device=hist.device) + 0.5) * width[:, None]
    index = (centres / new_width[:, None]).floor().long().clamp(0, hist.shape[1] - 1)
    return torch.zeros_like(hist).scatter_add_(1, index, hist)


class RowSample:
    """A bounded, deterministic sample of the rows seen across batches (to fit a codebook)."""

    def __init__(self, cap: int = SAMPLE_CAP) -> None:
        self.cap, self.rows = cap, None
        self.generator = torch.Generator().manual_seed(0)

    def update(self, rows: torch.Tensor) -> None:
        rows = sample_columns(rows.detach().to(torch.float32), self.cap, self.generator)
        merged = rows if self.rows is None else torch.cat([self.rows, rows], dim=1)
        self.rows = sample_columns(merged, self.cap, self.generator)


OBSERVER_CLASSES = {"minmax": MinMaxObserver, "ema_minmax": EmaMinMaxObserver,
                    "percentile": PercentileObserver, "mse": MseObserver, "entropy": EntropyObserver}


def make_observer(spec: QuantSpec, channel_axis: int | None = None) -> Observer:
    """The observer ``spec.observer`` names, reducing over every dim but ``channel_axis``."""
    return OBSERVER_CLASSES[spec.observer](spec, channel_axis)
