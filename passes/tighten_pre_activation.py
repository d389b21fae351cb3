"""Shrink each calibrated pre-activation grid to the values whose final code can still differ.

    before:  Qp on [lo, hi]    -> act -> Qa          (calibrated: Qp from the pre-activation's range)
    after:   Qp on [lo*, hi*]  -> act -> Qa          lo* >= lo, hi* <= hi

A fused layer's pre-activation ``t`` reaches the rest of the network only as ``Qa(act(Qp(t)))``:
its activation quantizer (the node's only user, DESIGN §7) rounds ``act(t)`` to its own grid. Below
some ``lo*`` every ``t`` in ``[lo, lo*]`` gives the same final code as ``lo`` (SiLU's tail: once
``|act(t)|`` is under half of Qa's step, the code is Qa's zero; ReLU: everything below 0), and
above some ``hi*`` every ``t`` gives the code of ``hi`` (Qa clips there). Qp needs to tell apart
only the values in between, so its range becomes ``[lo*, hi*]``: the same number of levels on a
shorter range, a finer step, and values beyond the new ends clamp to an end that yields the code
they had. ``lo*`` and ``hi*`` are the outermost points where the final code still changes, found by
evaluating ``Qa(act(t))`` on a dense grid of ``t`` over Qp's current range (any pointwise activation,
any activation grid). An affine grid whose integer zero point would leave an end inside
``[lo*, hi*]`` is widened by one step on each side. Nothing is estimated from data, so the pass
needs no batches.

Why it matters: the pre-activation range of a SiLU layer spans its negative tail, of which only
the first ~5 units reach the activation grid, and outliers far beyond the activation grid's top
(calibrated with MSE, which clips them). Grids already ``FINE_ENOUGH`` times finer than the
activation grid (the presets' 16-bit pre-activations) are left alone.

On yolov5n.pt (COCO128, W8A8 with 8-bit pre-activations, 32 calibration images) the grid of
model.1 goes from [-126, 115] to [-3.2, 65.6], 3.7x finer (median over layers 0.74x), and the raw
head outputs' SQNR on 32 other images rises from 23.0 to 30.1 dB (18.7 to 25.4 dB after the
decoder's sigmoid). mAP50-95 at 640 does not resolve it: over four disjoint calibration sets the
ONNX export with QLinearConv scores 0.3405 without, 0.3402 with the pass (0.3430 in a run without
the one-step widening above; FP32 0.3505) - moves of a few tenths on one 128-image set follow from
perturbations far below a step.

Uniform pre-activation grids only (a non-uniform Qp keeps its levels); PTQ only (``build_pipeline``
leaves it out of QAT, where the activation grid moves while training). A per-channel Qa or Qp is
handled row by row; a per-tensor Qp over a per-channel Qa takes the widest of the channels' ranges.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from yoloq.passes.calibrate import require_calibrated
from yoloq.passes.graph_utils import module_of
from yoloq.passes.insert_quantizers import QUANTIZES, QuantizedLayer
from yoloq.pipeline import PassResult
from yoloq.quantizers.fake_quantize import FakeQuantize

NAME = "tighten_pre_activation"
SAMPLES_PER_LEVEL = 4  # dense-grid points per level of Qp's current grid, at least MIN_POINTS per row
MIN_POINTS, MAX_ELEMENTS = 1 << 16, 1 << 22
# A pre-activation grid with this many times the activation grid's levels is left as calibrated: its
# rounding is already far below the activation's (a 16-bit grid before an 8-bit one: 1/256 of a
# step), narrowing it changed nothing measurable (w8a8 on yolov5n.pt, four calibration sets: 0.3428
# vs 0.3422 mAP50-95), and larger codes bring ONNX Runtime's float32 requantization of the exported
# ConvInteger accumulators nearer to ties, where it parts from the integer graph's dyadic one.
FINE_ENOUGH = 64


def _activation_quantizer(gm: fx.GraphModule, node: fx.Node) -> FakeQuantize | None:
    users = [u for u in node.users if u.meta.get(QUANTIZES) == node.name]
    quant = module_of(gm, users[0]) if len(users) == 1 else None
    return quant if isinstance(quant, FakeQuantize) and quant.is_calibrated else None


def _tightenable(q: FakeQuantize | None) -> bool:
    return (q is not None and q.is_calibrated and q.spec.scheme == "uniform" and q.zero_point is not None
            and q.channel_axis in (None, 1))


def changing_range(lo: torch.Tensor, hi: torch.Tensor, act: torch.nn.Module, out: FakeQuantize,
                   levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``lo``, ``hi`` (shape [rows]; rows = 1 or the channels of a per-channel ``out``),
    the outermost points of ``[lo, hi]`` where ``out(act(t))`` still changes, on a dense grid of
    ``SAMPLES_PER_LEVEL`` points per step of a ``levels``-step grid (each end is the last point whose
    code equals that end's, so the true change point is never passed)."""
    rows = lo.numel()
    points = max(min(max(SAMPLES_PER_LEVEL * levels, MIN_POINTS), MAX_ELEMENTS // rows), 2)
    fraction = torch.linspace(0.0, 1.0, points, dtype=torch.float64, device=lo.device)
    t = (lo.double()[:, None] + (hi - lo).double()[:, None] * fraction).float()
    with torch.no_grad():
        y = act(t)
        codes = out(y[None, :, :, None])[0, :, :, 0] if out.channel_axis is not None else out(y)
    first = (codes != codes[:, :1]).float().argmax(1)  # 0 where nothing changes
    last = points - 1 - (codes != codes[:, -1:]).float().flip(1).argmax(1)
    rows_index = torch.arange(rows, device=lo.device)
    new_lo = torch.where(first > 0, t[rows_index, (first - 1).clamp_min(0)], lo)
    new_hi = torch.where(last < points - 1, t[rows_index, (last + 1).clamp_max(points - 1)], hi)
    return new_lo, new_hi


def _tighten(layer: QuantizedLayer, out: FakeQuantize) -> float:
    """Narrow ``layer``'s pre-activation grid in place; returns new step / old step (largest row)."""
    pre, act = layer.pre_act_quant, layer.layer.act
    scale, zero = pre.scale.detach().flatten(), pre.zero_point.detach().flatten()
    lo, hi = (pre.spec.qmin - zero) * scale, (pre.spec.qmax - zero) * scale
    rows = out.scale.numel() if out.channel_axis is not None else 1
    if rows > 1 and lo.numel() == 1:  # a per-tensor Qp before a per-channel Qa: every channel's view
        lo, hi = lo.expand(rows), hi.expand(rows)
    elif rows > 1 and lo.numel() != rows:
        return 1.0  # per-group on one side and per-channel on the other: left as calibrated
    new_lo, new_hi = changing_range(lo, hi, act, out, pre.spec.qmax - pre.spec.qmin)
    if pre.channel_axis is None:
        new_lo, new_hi = new_lo.min().reshape(()), new_hi.max().reshape(())
    qparams = pre._qparams_from_range(new_lo, new_hi)
    if not pre.spec.symmetric:  # the zero point rounds to an integer and may shift an end inward
        step, zero = qparams["scale"], qparams["zero_point"]
        if ((pre.spec.qmin - zero) * step > new_lo).any() or ((pre.spec.qmax - zero) * step < new_hi).any():
            qparams = pre._qparams_from_range(new_lo - step, new_hi + step)
    for name, value in qparams.items():
        pre._assign(name, pre._param_shape(value))
    return float((pre.scale.detach().flatten() / scale).max())


def tighten_pre_activation(gm: fx.GraphModule) -> PassResult:
    ratios: dict[str, float] = {}
    candidates = 0
    for node in gm.graph.nodes:
        layer = module_of(gm, node)
        if not isinstance(layer, QuantizedLayer) or getattr(layer.layer, "act", None) is None:
            continue
        out, pre = _activation_quantizer(gm, node), layer.pre_act_quant
        if not _tightenable(pre) or out is None:
            continue
        candidates += 1
        if pre.spec.qmax - pre.spec.qmin < FINE_ENOUGH * (out.spec.qmax - out.spec.qmin):
            ratios[str(node.target)] = _tighten(layer, out)
    tightened = {name: r for name, r in ratios.items() if r < 1.0}
    notes = []
    if tightened:
        finest = min(tightened, key=tightened.get)
        ordered = sorted(tightened.values())
        notes.append(f"median step x{ordered[len(ordered) // 2]:.2f}, finest x{tightened[finest]:.2f} at {finest}")
    return PassResult(gm, bool(tightened), {"layers": candidates, "tightened": len(tightened)}, notes)


tighten_pre_activation.name = NAME
tighten_pre_activation.requires = require_calibrated
