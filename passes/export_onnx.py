"""QDQ ONNX export of a calibrated ``QuantizedModel``, decoder included (ORT check: check_onnx.py).

    before:  Q_x -> QuantizedLayer(conv, act) -> Q_out -> ...           (fake-quant graph)
    after:   Q -> DQ -> Conv(DQ(W_int8, s_w, axis 0), DQ(b_int32, s_x·s_w, axis 0)) -> Q(uint8) -> DQ
                 (an 8-bit output: the pattern ORT fuses into QLinearConv), or, for a wider output
             Q(uint8) -> ConvInteger(W + 128) -> + b_int32 -> DQ(step, axis 1)
                 -> Q16 -> Cast -> Gather(table) -> DQ -> Q -> DQ -> ... -> heads -> decoder (float) -> boxes

Every quantized tensor becomes a QuantizeLinear / DequantizeLinear pair with our scale and zero
point (``QuantizeLinear`` is ``saturate(round_half_even(x / s) + z)``, the same formula as our fake
quantizer); weights are stored as integer initializers with a per-channel DequantizeLinear, and the
bias as the int32 accumulator-domain bias of ``integer_ops.conv_requant``, so the file holds the
numbers the integer graph uses. Each Conv's input gets its own Q -> DQ (exact: the value is on that
grid already), so every Conv reads a DequantizeLinear, the pattern ORT fuses into QLinearConv.

How it is built: the fake-quant graph is copied and its quantizers and layers are swapped for
modules whose ``torch.autograd.Function`` carries an ONNX ``symbolic``; the TorchScript exporter
(opset ≤ 20) then writes the QDQ nodes exactly as given, and the decoder is exported with it.
A higher opset (21: int16 and int4 QDQ) is set afterwards: opset 21 changed only the types those
operators accept. Building the graph with onnx.helper would mean re-writing every op and the
decoder by hand; the exporter already does that.

Choices, measured in tests/test_export_onnx.py (tiny-yolo; yolov5n in the slow test):
  pre_activation  a fused Conv-act has a 16-bit pre-activation (the integer graph's table input);
                  ORT's QLinearConv outputs 8 bits only, so such a Conv (and a 16-bit head) is
                  written as ConvInteger, the exact int32 accumulator, then dequantized and
                  requantized to the wide grid (uint8 weight codes + 128: ORT's int8-weight
                  ConvInteger is ~6x slower; 4-bit weights stored as INT4 keep DQ -> float Conv).
    "table"  (default) Q(int16) -> Cast -> Gather(the integer graph's table) -> DQ: our activation
             codes exactly; ORT's own Sigmoid differs from torch's and moves codes at ties
             (tiny-yolo w4a8: 1 head step instead of 72).
    "keep"   int16 QDQ on the pre-activation, then the activation as float ONNX ops.
    "drop"   Conv -> activation in float, no pre-activation rounding (w8a8: ~70 head steps).
  With an 8-bit pre-activation (a recipe's ``pre_activation: {bits: 8, signed: false,
  symmetric: false}``) every Conv is DQ -> Conv -> Q(uint8) and ORT fuses it into QLinearConv
  (integer accumulation): tiny-yolo then gives our codes exactly, yolov5n 57 of 60 convs fused.
    "qlinear"  for such 8-bit pre-activations: SiLU / Sigmoid / LeakyReLU / ReLU as the float ops
             ORT fuses with their QDQ into QLinearSigmoid, QLinearMul, QLinearLeakyRelu (SiLU =
             x·σ(x), σ on a uint8 grid of step 1/255): ORT's own lookup kernels instead of a Gather
             over our table, which ORT runs ~10x slower than they (yolov5n at 640, 2 threads:
             ~34 ms vs ~120 ms a frame). The price: σ is rounded on its way and ORT builds the
             tables from its own float functions, so codes differ from the integer graph's by a
             step here and there (benchmarks/ort_latency.py reports how far, and the mAP).
             Wider grids and other activations are exported as with "keep".
  weights of 4 bits  INT4 initializers (opset 21; ORT runs INT4 DequantizeLinear; it has no INT4
                  QLinearConv, so the Conv runs in float); below opset 21 int8 initializers holding
                  the 4-bit codes (exact).
  grids narrower than their container (a 4-bit activation in uint8) get a Clip before the Q so
                  the codes saturate where ours do.
  16-bit tensors below opset 21 stay float (no int16 QuantizeLinear before opset 21); reported.
Where ORT runs a Conv in float, it accumulates in float32 and rounds half to even, we accumulate
exactly and round half up: a code at a tie moves by one step, rarely (yolov5n: from 5e-6 of the
codes at layer 4), and is carried on; by the heads most values differ a little (yolov5n W8A8:
max 0.48 of a head range of 19, mean 0.04) — less than the fake-quant graph differs (0.80).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import operator
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from onnx import helper, numpy_helper
from torch import nn

from yoloq.passes.eval_form import tensor_grids
from yoloq.passes.graph_utils import set_module
from yoloq.passes.insert_quantizers import QUANTIZES, QuantizedLayer
from yoloq.passes.integer_ops import Grid, LoweringError, conv_requant, grid_of, layer_affine, lookup_table
from yoloq.passes.plan_quantization import CONCATS, QUANT

TORCHSCRIPT_MAX_OPSET = 20
CONTAINERS = {(0, 255): torch.uint8, (-128, 127): torch.int8, (0, 65535): torch.uint16, (-32768, 32767): torch.int16}
PRE_ACTIVATION = ("keep", "drop", "table", "qlinear")
SIGMOID_GRID = (1.0 / 255.0, 0)  # "qlinear": uint8 scale and zero point of SiLU's sigmoid factor
INT4_MARK = "codes4"  # initializer names of 4-bit weight codes, turned into INT4 after export


class ExportError(ValueError):
    """The model cannot be exported as asked; the message names the tensor and the way out."""


@dataclasses.dataclass(frozen=True)
class ExportReport:
    path: Path
    opset: int
    imgsz: int
    pre_activation: str
    op_counts: dict  # op_type -> count in the written file
    int4_weights: int  # layers whose weights are INT4 initializers
    int8_held_low_bit: int  # layers whose <8-bit codes sit in int8 initializers (opset < 21)
    float_tensors: tuple[str, ...]  # quantized tensors left float (16-bit ones below opset 21)
    head_outputs: tuple[str, ...]
    output: str  # the decoder's first output ("boxes")
    dynamic_size: bool = False  # images' height and width free (else fixed at imgsz x imgsz)


def _container(grid_min: int, grid_max: int, opset: int) -> tuple[torch.dtype | None, bool]:
    """(ONNX integer type for codes in [grid_min, grid_max], clip needed) or (None, _) to stay float."""
    for (lo, hi), dtype in CONTAINERS.items():
        if lo <= grid_min and grid_max <= hi:
            if dtype.itemsize == 2 and opset < 21:
                return None, False
            return dtype, (lo, hi) != (grid_min, grid_max)
    raise ExportError(f"codes [{grid_min}, {grid_max}] fit no ONNX integer type")


class _QDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float, zero: int, qmin: int, qmax: int, dtype, clip: bool):
        # ``scale`` is a float32 value held in a Python float: the same quotient as our fake quantizer's
        return (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale

    @staticmethod
    def symbolic(g, x, scale, zero, qmin, qmax, dtype, clip):
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero, dtype=dtype))
        if clip:  # the grid is narrower than its container: saturate where our codes do
            lo = g.op("Constant", value_t=torch.tensor((qmin - zero) * scale, dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor((qmax - zero) * scale, dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class _TableActivation(torch.autograd.Function):
    """The integer graph's lookup table: Q(pre-activation) -> Gather(table) -> DQ(output grid)."""

    @staticmethod
    def forward(ctx, x, table, pre_scale: float, pre_zero: int, pre_min: int, pre_max: int, pre_dtype,
                out_scale: float, out_zero: int, out_dtype):
        codes = torch.clamp(torch.round(x / pre_scale) + pre_zero, pre_min, pre_max).long()
        return (table[codes - pre_min].float() - out_zero) * out_scale

    @staticmethod
    def symbolic(g, x, table, pre_scale, pre_zero, pre_min, pre_max, pre_dtype, out_scale, out_zero, out_dtype):
        s = g.op("Constant", value_t=torch.tensor(pre_scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(pre_zero, dtype=pre_dtype))
        codes = g.op("Cast", g.op("QuantizeLinear", x, s, z), to_i=onnx.TensorProto.INT32)
        index = g.op("Sub", codes, g.op("Constant", value_t=torch.tensor(pre_min, dtype=torch.int32)))
        looked_up = g.op("Gather", table, index, axis_i=0)
        out_s = g.op("Constant", value_t=torch.tensor(out_scale, dtype=torch.float32))
        out_z = g.op("Constant", value_t=torch.tensor(out_zero, dtype=out_dtype))
        return g.op("DequantizeLinear", looked_up, out_s, out_z)


class TableActivation(nn.Module):
    """A fused activation exported as the integer graph's table over the pre-activation codes."""

    def __init__(self, act: nn.Module, pre: Grid, out: Grid, opset: int):
        super().__init__()
        self.pre_dtype, _ = _container(pre.qmin, pre.qmax, opset)
        out_dtype, _ = _container(out.qmin, out.qmax, opset)
        table = lookup_table(act, pre, out)
        # Over the whole container: a code QuantizeLinear saturates to outside the grid reads the
        # entry of the grid's end, which is what saturating at the grid gives.
        info = torch.iinfo(self.pre_dtype)
        table = torch.cat([table[:1].expand(pre.qmin - info.min), table, table[-1:].expand(info.max - pre.qmax)])
        self.register_buffer("table", table.to(out_dtype))
        self.pre = dataclasses.replace(pre.numbers(), qmin=info.min, qmax=info.max)
        self.out = out.numbers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, o = self.pre, self.out
        return _TableActivation.apply(x, self.table, p.scale, p.zero_point, p.qmin, p.qmax, self.pre_dtype,
                                      o.scale, o.zero_point, self.table.dtype)


class QLinearActivation(nn.Module):
    """A fused activation as the float ops ONNX Runtime fuses with their QDQ neighbours into its
    integer kernels, on an 8-bit pre-activation: LeakyReLU and ReLU between DQ and Q (QLinearLeakyRelu;
    ReLU folds into the QLinearConv's range), Sigmoid as QLinearSigmoid, and SiLU as x·σ(x) with σ
    on its own uint8 grid (``SIGMOID_GRID``): QLinearSigmoid then QLinearMul. ORT builds those
    kernels' tables from its own float functions and rounds σ on the way, so codes differ from the
    integer graph's single table by a step here and there (what ``check_onnx`` reports)."""

    KINDS = (nn.SiLU, nn.Sigmoid, nn.LeakyReLU, nn.ReLU)

    def __init__(self, act: nn.Module, pre: Grid, opset: int):
        super().__init__()
        self.act, self.pre_qdq = act, QDQ(pre, opset)
        sigmoid = Grid(*SIGMOID_GRID, 0, 255, None) if isinstance(act, nn.SiLU) else None
        self.sigmoid_qdq = QDQ(sigmoid, opset) if sigmoid is not None else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x = self.pre_qdq(y)
        if self.sigmoid_qdq is None:
            return self.act(x)
        return x * self.sigmoid_qdq(torch.sigmoid(x))


class QDQ(nn.Module):
    """Fake quantization on ``grid`` that exports as QuantizeLinear -> DequantizeLinear."""

    def __init__(self, grid: Grid, opset: int):
        super().__init__()
        self.grid = grid.numbers()
        self.dtype, self.clip = _container(grid.qmin, grid.qmax, opset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return x
        g = self.grid
        return _QDQ.apply(x, g.scale, g.zero_point, g.qmin, g.qmax, self.dtype, self.clip)


class _DequantizedConv(torch.autograd.Function):
    """Conv(x, DequantizeLinear(W codes, axis 0), DequantizeLinear(int32 bias, axis 0)) as one op, so
    the exporter writes exactly that."""

    @staticmethod
    def forward(ctx, x, codes, w_scale, w_zero, bias_codes, bias_scale, bias_zero, sh, sw, ph, pw, dh, dw, groups):
        stride, padding, dilation = (sh, sw), (ph, pw), (dh, dw)
        shape = (-1, 1, 1, 1)
        weight = (codes.float() - w_zero.float().view(shape)) * w_scale.view(shape)
        bias = (bias_codes.float() - bias_zero.float()) * bias_scale
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def symbolic(g, x, codes, w_scale, w_zero, bias_codes, bias_scale, bias_zero, sh, sw, ph, pw, dh, dw, groups):
        weight = g.op("DequantizeLinear", codes, w_scale, w_zero, axis_i=0)
        bias = g.op("DequantizeLinear", bias_codes, bias_scale, bias_zero, axis_i=0)
        return g.op("Conv", x, weight, bias, strides_i=[sh, sw], pads_i=[ph, pw, ph, pw], dilations_i=[dh, dw],
                    group_i=groups)


class _IntegerConv(torch.autograd.Function):
    """DequantizeLinear(ConvInteger(QuantizeLinear(x), W_u8) + bias_i32, steps, axis 1): a conv whose
    output grid is wider than 8 bits, which ORT cannot fuse into QLinearConv, still accumulates in
    integers (MLAS's u8·u8 kernel; the int8 weight codes are stored shifted by 128, with zero point
    128, because ORT's ConvInteger runs ~6x slower on int8 weights). The output is the exact
    accumulator times its step G·s_w·s_x, before any requantization."""

    @staticmethod
    def forward(ctx, x, x_scale, x_zero, codes_u8, bias, steps, sh, sw, ph, pw, dh, dw, groups):
        q = torch.clamp(torch.round(x / x_scale) + x_zero.float(), 0, 255) - x_zero.float()
        weight = codes_u8.double() - 128.0
        acc = F.conv2d(q.double(), weight, bias.double().flatten(), (sh, sw), (ph, pw), (dh, dw), groups)
        return (acc * steps.double().view(1, -1, 1, 1)).float()

    @staticmethod
    def symbolic(g, x, x_scale, x_zero, codes_u8, bias, steps, sh, sw, ph, pw, dh, dw, groups):
        q = g.op("QuantizeLinear", x, x_scale, x_zero)
        w_zero = g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))
        acc = g.op("ConvInteger", q, codes_u8, x_zero, w_zero, strides_i=[sh, sw], pads_i=[ph, pw, ph, pw],
                   dilations_i=[dh, dw], group_i=groups)
        acc = g.op("Add", acc, bias)
        zero = g.op("Constant", value_t=torch.zeros(steps.type().sizes()[0], dtype=torch.int32))
        return g.op("DequantizeLinear", acc, steps, zero, axis_i=1)


class QDQConv(nn.Module):
    """A ``QuantizedLayer`` as Q/DQ input, DQ weight and bias, float Conv, [16-bit QDQ], activation."""

    def __init__(self, qlayer: QuantizedLayer, x: Grid, pre: Grid | None, out: Grid, opset: int, where: str):
        super().__init__()
        p = conv_requant(qlayer, x, pre or out, where)
        gain, _ = layer_affine(qlayer)  # kept BN and QC scale the weight's dequantization per channel
        quant_scale = qlayer.weight_quant._scale().detach().double().expand(p.codes.shape).flatten(1)[:, 0]
        w_scale = (gain * quant_scale).float()  # G·s_w: DequantizeLinear(codes) = G ⊙ Ŵ
        steps = gain * quant_scale * x.scale  # the accumulator step the integer bias is counted in
        dtype = torch.int8 if p.signed else torch.uint8
        name = INT4_MARK if p.bits <= 4 and p.signed and opset >= 21 else "codes"  # else held in 8 bits
        self.register_buffer(name, p.codes.to(dtype))
        self.codes_name, self.bits = name, p.bits
        self.register_buffer("weight_scale", w_scale)
        zero = p.weight_zero.expand(p.codes.shape).flatten(1)[:, 0]
        self.register_buffer("weight_zero", zero.to(dtype).contiguous())
        if p.bias.abs().max() < 2**31:  # int32 accumulator-domain bias: what QLinearConv reads
            self.register_buffer("bias_codes", p.bias.to(torch.int32))
            self.register_buffer("bias_scale", torch.tensor(x.scale, dtype=torch.float32) * w_scale)
            self.register_buffer("bias_zero", torch.zeros_like(self.bias_codes))
        else:  # a bias beyond int32 (DESIGN §7 int64 layers) stays float; that Conv does not fuse
            self.register_buffer("bias_codes", None)
            self.register_buffer("float_bias", (p.bias.double() * steps).float())
        self.input_qdq, self.pre_qdq = QDQ(x, opset), QDQ(pre, opset) if pre is not None else None
        self.act = getattr(qlayer.layer, "act", None)
        self.conv = dict(stride=p.stride, padding=p.padding, dilation=p.dilation, groups=p.groups)
        # Integer accumulation where ORT cannot fuse (an output grid wider than 8 bits): ConvInteger
        # on uint8 input codes and symmetric weight codes (not 4-bit ones stored as INT4: what 4 bits
        # buy in the file is memory, and ORT has no integer conv for them).
        wide = (pre or out).qmax - (pre or out).qmin > 255
        self.integer = (wide and self.bias_codes is not None and 0 <= x.qmin and x.qmax <= 255
                        and bool((p.weight_zero == 0).all()) and p.signed and name != INT4_MARK)
        if self.integer:
            self.register_buffer("codes_u8", (p.codes + 128).to(torch.uint8))
            self.register_buffer("bias_acc", p.bias.to(torch.int32).view(1, -1, 1, 1))
            self.register_buffer("steps", steps.float())
            self.register_buffer("x_scale", torch.tensor(x.scale, dtype=torch.float32))
            self.register_buffer("x_zero", torch.tensor(x.zero_point, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_qdq(x)
        codes = getattr(self, self.codes_name)
        if self.integer:
            y = _IntegerConv.apply(x, self.x_scale, self.x_zero, self.codes_u8, self.bias_acc, self.steps,
                                   *self.conv["stride"], *self.conv["padding"], *self.conv["dilation"],
                                   self.conv["groups"])
        elif self.bias_codes is not None:
            y = _DequantizedConv.apply(x, codes, self.weight_scale, self.weight_zero, self.bias_codes, self.bias_scale,
                                       self.bias_zero, *self.conv["stride"], *self.conv["padding"],
                                       *self.conv["dilation"], self.conv["groups"])
        else:  # no fusion for this conv anyway: the bias stays float
            shape = (-1, 1, 1, 1)
            weight = (codes.float() - self.weight_zero.float().view(shape)) * self.weight_scale.view(shape)
            y = F.conv2d(x, weight, self.float_bias, **self.conv)
        if self.act is None:
            return y
        return self.act(self.pre_qdq(y) if self.pre_qdq is not None else y)


class _WithDecoder(nn.Module):
    """forward(x) = (*head outputs, decoder's first output): the file gives heads and boxes."""

    def __init__(self, network: fx.GraphModule, decoder: nn.Module):
        super().__init__()
        self.network, self.decoder = network, decoder

    def forward(self, x: torch.Tensor):
        heads = self.network(x)
        decoded = self.decoder(heads)
        first = decoded[0] if isinstance(decoded, (tuple, list)) else decoded
        return (*pytree.tree_leaves(heads), first)


def qdq_module(qm, opset: int = 21, pre_activation: str = "table") -> tuple[nn.Module, tuple[str, ...]]:
    """The exportable module of ``qm`` (see module docstring) and the quantized tensors left float."""
    if pre_activation not in PRE_ACTIVATION:
        raise ValueError(f"pre_activation must be one of {PRE_ACTIVATION}, got {pre_activation!r}")
    gm = copy.deepcopy(qm.graph_module).eval()
    grids = tensor_grids(gm)
    left_float = []
    for node in list(gm.graph.nodes):
        if node.meta.get(QUANTIZES) is not None:
            qdq = QDQ(grids[node], opset)
            if qdq.dtype is None:
                left_float.append(node.name)
            set_module(gm, node.target, qdq)
        elif QUANT in node.meta and node.meta[QUANT].kind == "layer":
            conv = _qdq_conv(gm, node, grids, opset, pre_activation)
            tabled = isinstance(conv.act, (TableActivation, QLinearActivation))
            if conv.act is not None and not tabled and (conv.pre_qdq is None or conv.pre_qdq.dtype is None):
                left_float.append(f"{node.target}:pre_activation")
            set_module(gm, node.target, conv)
        elif node in grids and _regroups_codes(gm, node):
            _requantize_after(gm, node, grids, opset)
    gm.recompile()
    return _WithDecoder(gm, copy.deepcopy(qm.decoder)).eval(), tuple(left_float)


def _regroups_codes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A Concat or Upsample, or a slice of a chunk that a Concat takes: exact on codes, but ORT runs
    them on codes (QLinearConcat, uint8 Resize) only when a QuantizeLinear follows directly (a Concat
    with that one consumer) and every Concat input comes from a DequantizeLinear."""
    if node.op == "call_function":
        if node.target in CONCATS:
            return True
        return node.target is operator.getitem and any(u.op == "call_function" and u.target in CONCATS
                                                       for u in node.users)
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Upsample)


def _requantize_after(gm: fx.GraphModule, node: fx.Node, grids: dict, opset: int) -> None:
    """Q -> DQ on ``node``'s own grid (exact: its values are on it) between it and its users, for the
    8-bit grids ORT's kernels take."""
    qdq = QDQ(grids[node], opset)
    if qdq.dtype is None or qdq.dtype.itemsize != 1:
        return
    name = f"regroup_qdq_{node.name}"
    gm.add_submodule(name, qdq)
    with gm.graph.inserting_after(node):
        requantized = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(requantized, delete_user_cb=lambda user: user is not requantized)
    grids[requantized] = grids[node]


def _qdq_conv(gm: fx.GraphModule, node: fx.Node, grids, opset: int, pre_activation: str) -> QDQConv:
    qlayer = gm.get_submodule(node.target)
    if not isinstance(qlayer, QuantizedLayer):
        raise ExportError(f"layer {node.target}: kept in float by the recipe; the QDQ export needs it quantized")
    (q,) = [u for u in node.users if u.meta.get(QUANTIZES) == node.name]
    out = grids[q]
    has_act = getattr(qlayer.layer, "act", None) is not None
    pre = grid_of(qlayer.pre_act_quant, f"layer {node.target} pre-activation") if has_act else None
    module = QDQConv(qlayer, grids[node.args[0]], pre, out, opset, f"layer {node.target}")
    if pre is not None and pre_activation == "drop":
        module.pre_qdq = None  # the requantization multiplier still came from the pre-activation grid
    elif pre is not None and pre_activation == "table":
        pre_type, out_type = _container(pre.qmin, pre.qmax, opset)[0], _container(out.qmin, out.qmax, opset)[0]
        if pre_type is not None and out_type is not None and out_type.itemsize == 1:
            module.pre_qdq, module.act = None, TableActivation(module.act, pre, out, opset)
        # else (a 16-bit pre-activation below opset 21, or a 16-bit output): as "keep"
    elif pre is not None and pre_activation == "qlinear":
        eight_bit = pre.qmax - pre.qmin <= 255 and out.qmax - out.qmin <= 255
        if eight_bit and isinstance(module.act, QLinearActivation.KINDS):
            module.pre_qdq, module.act = None, QLinearActivation(module.act, pre, opset)
        # else (a wider grid, or an activation ORT has no integer kernel for): as "keep"
    return module


def export_onnx(qm, path, imgsz: int = 640, opset: int = 21, pre_activation: str = "table",
                batch: int = 1, dynamic_size: bool = False) -> ExportReport:
    """Write ``qm`` (a calibrated ``QuantizedModel``) to ``path`` as QDQ ONNX, checked by
    ``onnx.checker``. Input ``images`` (batch x 3 x imgsz x imgsz, any batch; ``batch`` is the one
    traced); outputs ``head0..headN`` (dequantized raw head tensors) and ``boxes`` (the decoder's
    first output). ``dynamic_size``: height and width are free too (any multiple of the largest
    stride, e.g. the rectangular letterboxes of YOLOv5's val), with the head and box counts
    following; the decoder's grids are then built from shapes in the graph, as in the float
    model. The numbers in the file are the same either way."""
    from yoloq.passes.lower_to_integer import LoweredModel, _requires

    if isinstance(qm, LoweredModel):
        raise ExportError("export_onnx takes the QuantizedModel: a LoweredModel keeps only integer "
                          "multipliers, not the float scales QDQ nodes need (export the model you lowered)")
    if not 13 <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {opset}: QDQ export needs 13 ≤ opset ≤ {onnx.defs.onnx_opset_version()}")
    if reason := _requires(qm.graph_module):
        raise ExportError(f"cannot export: {reason}")
    try:
        module, left_float = qdq_module(qm, opset, pre_activation)
    except LoweringError as exc:
        raise ExportError(str(exc)) from None
    path = Path(path)
    x = torch.zeros(batch, 3, imgsz, imgsz)
    with torch.no_grad():
        head_ranks = [t.dim() for t in module(x)[:-1]]
    heads = tuple(f"head{i}" for i in range(len(head_ranks)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and trace warnings
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                          input_names=["images"], output_names=[*heads, "boxes"], do_constant_folding=True,
                          dynamic_axes=_dynamic_axes(heads, head_ranks, dynamic_size),
                          autograd_inlining=False)  # use our symbolics; inlining also broke the exporter
    model = onnx.load(str(path))
    int4 = _finish(model, opset)
    held = sum(isinstance(m, QDQConv) and m.bits < 8 and m.codes_name != INT4_MARK for m in module.modules())
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    if dynamic_size:
        _check_free_size(module, path, batch, imgsz)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return ExportReport(path, opset, imgsz, pre_activation, dict(counts), int4, held, left_float, heads, "boxes",
                        dynamic_size)


FREE_SIZE_PROBE = 64  # extra width the free-size check runs at: a multiple of every YOLO stride (8-64)


def _check_free_size(module: nn.Module, path: Path, batch: int, imgsz: int) -> None:
    """Run the written file at imgsz x (imgsz + 64), a size it was not traced at: a decoder that
    turned a shape into a constant while tracing gives the wrong number of boxes there, or fails."""
    from yoloq.passes.check_onnx import onnx_session

    x = torch.zeros(batch, 3, imgsz, imgsz + FREE_SIZE_PROBE)
    with torch.no_grad():
        want = tuple(module(x)[-1].shape)
    try:
        got = onnx_session(path).run(["boxes"], {"images": x.numpy()})[0].shape
    except Exception as exc:  # ORT's shape errors have no common type
        raise ExportError(f"dynamic_size: {path} fails at {imgsz}x{imgsz + FREE_SIZE_PROBE} "
                          f"({type(exc).__name__}: {str(exc)[:200]}); export at a fixed size") from None
    if tuple(got) != want:
        raise ExportError(f"dynamic_size: {path} gives boxes {list(got)} at {imgsz}x{imgsz + FREE_SIZE_PROBE} where "
                          f"the model gives {list(want)}: its decoder fixed a size while tracing; export at a fixed size")


def _dynamic_axes(heads: tuple[str, ...], ranks: list[int], dynamic_size: bool) -> dict[str, dict[int, str]]:
    """Batch always free; with ``dynamic_size`` also the image's H x W, each N x C x H x W head's
    grid and the box count."""
    if not dynamic_size:
        return {name: {0: "batch"} for name in ("images", *heads, "boxes")}
    grids = {head: {0: "batch", 2: f"{head}_height", 3: f"{head}_width"} if rank == 4 else {0: "batch"}
             for head, rank in zip(heads, ranks)}
    return {"images": {0: "batch", 2: "height", 3: "width"}, **grids, "boxes": {0: "batch", 1: "boxes"}}


def _finish(model: onnx.ModelProto, opset: int) -> int:
    """Set the opset (21 only widened Q/DQ and shape ops' types), let shape reads skip dequantization,
    and store 4-bit codes as INT4."""
    _shapes_before_dequantization(model)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    int4 = 0
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    for n in model.graph.node:  # the exporter deduplicates equal initializers through Identity nodes
        if n.op_type == "Identity" and n.input[0] in values:
            values[n.output[0]] = values[n.input[0]]
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or INT4_MARK not in node.input[0]:
            continue
        for i, suffix in ((0, "_int4"), (2, "_zero_int4")):  # zero points may be shared (deduplicated): own copy
            array = values[node.input[i]].astype(np.int8)
            name = node.input[0] + suffix
            model.graph.initializer.append(helper.make_tensor(name, onnx.TensorProto.INT4, array.shape,
                                                              array.flatten().tolist()))
            node.input[i] = name
        int4 += 1
    used = {i for n in model.graph.node for i in n.input}  # drop the int8 copies the INT4 ones replace
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return int4


def _shapes_before_dequantization(model: onnx.ModelProto) -> int:
    """``Shape(DequantizeLinear(q))`` -> ``Shape(q)`` (the same shape). The decoder reads each head's
    shape (the batch is dynamic); ORT gives every consumer of a DequantizeLinear its own copy, so
    each shape read cost a full dequantization of the head (yolov5n at 640: ~1.5 ms a frame)."""
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    moved = 0
    for node in model.graph.node:
        if node.op_type == "Shape" and node.input[0] in dequantized:
            node.input[0] = dequantized[node.input[0]]
            moved += 1
    return moved
