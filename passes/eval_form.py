"""The evaluation form of a fake-quant graph: float tensors between nodes, integer requantization.

    before:  Q_x -> QuantizedLayer(conv, act) -> Q_out          y = act(Qp(conv(x̂, Ŵ) + b))
    after:   Q_x -> EvalFormConv -> act -> Q_out                y = act(x̂_p),
             x̂_p = (q_p − z_p)·s_p with q_p the dyadic requantization of the integer accumulator
             (``integer_ops``: same M0, n, integer bias and round-half-up rule as the integer graph)

             a + b -> Q_out   becomes   EvalFormCodes(IntSum)(a, b) -> Q_out
             a @ b -> Q_out   becomes   EvalFormMatmul(a, b) -> Q_out   (float64 accumulator, same M0, n)
             softmax(a, -1)   becomes   EvalFormCodes(IntSoftmax)(a)    (the integer algorithm itself:
                                        the fake-quant graph's float softmax is not its evaluation form)

``EvalFormConv`` computes the accumulator in float64 from the values it is given: x̂/s_x rounds back
to q − z exactly (x̂ = (q − z)·s_x in float32, relative error 2^−24, |q − z| < 2^16), and a float64
convolution of integers is exact while every partial sum stays below 2^53 (checked from the same
bound as the int32 one); ``EvalFormMatmul`` likewise, while K·A·B < 2^53 (K the inner size, A, B
the operands' largest |q − z|; checked). Activations, MaxPool, Upsample and shared-scale Concat stay
float modules; the quantizer nodes stay ``FakeQuantize``. So the integer graph, which uses integer convolutions,
lookup tables and code moves instead, must give the same codes at every quantized tensor.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from yoloq.passes.graph_utils import mark, set_module
from yoloq.passes.insert_quantizers import QUANTIZES, QuantizedLayer
from yoloq.passes.integer_attention import (
    IntSoftmax, MatmulRequant, matmul_requant, requantize, softmax_requant,
)
from yoloq.passes.integer_ops import (
    ConvRequant, Grid, IntRequantize, IntSum, LoweringError, clamp_codes, conv_requant, grid_of,
    round_shift, sum_requant,
)
from yoloq.passes.lower_to_integer import ADDS, CODES_OF, METHOD_ADDS, is_matmul, softmax_input
from yoloq.passes.plan_quantization import CONCATS, QUANT

NAME = "eval_form"
GRID = "yoloq.grid"  # node.meta: the Grid whose codes CODES_OF names
FLOAT64_EXACT = 2**53


def to_codes(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Codes of values on ``grid`` (exact for values that are on it)."""
    return clamp_codes(torch.round(x / grid.scale).to(torch.int64), grid)


class EvalFormConv(nn.Module):
    def __init__(self, p: ConvRequant, x: Grid, out: Grid, act: nn.Module | None):
        super().__init__()
        if p.bound >= FLOAT64_EXACT:
            raise LoweringError(f"accumulator bound {p.bound} exceeds float64's exact integers")
        self.register_buffer("weight", p.weight.double())
        self.register_buffer("bias", p.bias.double())
        self.register_buffer("m0", p.m0.view(1, -1, 1, 1))
        self.register_buffer("shift", p.shift.view(1, -1, 1, 1))
        self.x, self.out_grid = x, out
        self.out_quant = copy.deepcopy(out.quantizer)
        self.act = act
        self.conv = dict(stride=p.stride, padding=p.padding, dilation=p.dilation, groups=p.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = torch.round(x / self.x.scale).double()
        acc = F.conv2d(centred, self.weight, self.bias, **self.conv).to(torch.int64)
        return self.out_quant.dequantize(clamp_codes(round_shift(acc * self.m0, self.shift), self.out_grid))


class EvalFormCodes(nn.Module):
    """Float values → codes → an integer op shared with the integer graph → float values."""

    def __init__(self, op: nn.Module, inputs: list[Grid], out: Grid):
        super().__init__()
        self.op, self.inputs, self.out_quant = op, inputs, copy.deepcopy(out.quantizer)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.out_quant.dequantize(self.op(*(to_codes(x, g) for x, g in zip(xs, self.inputs))))


class EvalFormMatmul(nn.Module):
    """The matmul's accumulator in float64 from the values (exact: every partial sum is an integer
    below K·A·B < 2^53), requantized with ``integer_ops.requantize`` and the shared M0, n."""

    def __init__(self, p: MatmulRequant, a: Grid, b: Grid, out: Grid):
        super().__init__()
        self.p, self.grids, self.out_grid = p, (a, b), out
        self.per_term = a.max_centred * b.max_centred
        self.out_quant = copy.deepcopy(out.quantizer)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[-1] * self.per_term >= FLOAT64_EXACT:
            raise LoweringError(f"matmul bound K·A·B = {a.shape[-1] * self.per_term} passes float64's exact "
                                "integers")
        a, b = (torch.round(t / g.scale).double() for t, g in zip((a, b), self.grids))
        acc = torch.matmul(a, b).to(torch.int64)
        return self.out_quant.dequantize(requantize(acc, self.p.m0, self.p.shift, self.out_grid))


def tensor_grids(gm: fx.GraphModule) -> dict[fx.Node, Grid]:
    """The grid of every quantized tensor node: quantizer outputs and what moves their codes."""
    grids: dict[fx.Node, Grid] = {}
    for node in gm.graph.nodes:
        if node.meta.get(QUANTIZES) is not None:
            grids[node] = grid_of(gm.get_submodule(node.target), node.name)
        elif QUANT in node.meta and node.meta[QUANT].kind == "passthrough":
            found = [grids[a] for a in node.all_input_nodes if a in grids]
            if found:
                grids[node] = found[0]
    return grids


def _output_grid(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, Grid]:
    (q,) = [u for u in node.users if u.meta.get(QUANTIZES) == node.name]
    return q, grid_of(gm.get_submodule(q.target), f"{node.name} output")


def eval_form(qm):
    """A copy of the ``QuantizedModel`` in its evaluation form (module docstring)."""
    qm = copy.deepcopy(qm)
    gm = qm.graph_module
    grids = tensor_grids(gm)
    for node in list(gm.graph.nodes):
        kind = node.meta[QUANT].kind if QUANT in node.meta else "none"
        if kind == "layer":
            _rewrite_layer(gm, node, grids)
        elif kind == "compute":
            _rewrite_compute(gm, node, grids)
        elif node in grids:
            node.meta[CODES_OF], node.meta[GRID] = node.name, grids[node]
    gm.recompile()
    gm.graph.lint()
    return qm


def _rewrite_layer(gm: fx.GraphModule, node: fx.Node, grids) -> None:
    qlayer = gm.get_submodule(node.target)
    if not isinstance(qlayer, QuantizedLayer):
        raise LoweringError(f"layer {node.target}: kept in float by the recipe")
    x_grid = grids[node.args[0]]
    q, out_grid = _output_grid(gm, node)
    act = getattr(qlayer.layer, "act", None)
    conv_grid = out_grid if act is None else grid_of(qlayer.pre_act_quant, f"layer {node.target} pre-activation")
    params = conv_requant(qlayer, x_grid, conv_grid, f"layer {node.target}")
    set_module(gm, node.target, EvalFormConv(params, x_grid, conv_grid, act))
    mark(node, NAME)
    if act is not None:
        node.meta[CODES_OF], node.meta[GRID] = f"{node.target}:pre_activation", conv_grid
        with gm.graph.inserting_after(node):
            applied = gm.graph.call_module(f"{node.target}.act", (node,))
        node.replace_all_uses_with(applied, delete_user_cb=lambda user: user is not applied)
        mark(applied, NAME)


def _rewrite_compute(gm: fx.GraphModule, node: fx.Node, grids) -> None:
    q, out_grid = _output_grid(gm, node)
    sign = ADDS.get(node.target) if node.op == "call_function" else (
        METHOD_ADDS.get(node.target) if node.op == "call_method" else None)
    if sign is not None and len(node.all_input_nodes) == 2 and len(node.args) == 2 and not node.kwargs:
        inputs = [grids[a] for a in node.args]
        op = IntSum(sum_requant(inputs, [1, sign], out_grid, f"node {node.name}"), inputs, out_grid)
        _to_module(gm, node, EvalFormCodes(op, inputs, out_grid), node.args)
    elif node.op == "call_function" and node.target in CONCATS:
        parts = []
        for i, arg in enumerate(node.args[0]):
            grid = grids[arg]
            if (grid.scale, grid.zero_point) != (out_grid.scale, out_grid.zero_point):
                target = f"eval_form_{node.name}_requantize_{i}"
                gm.add_module(target, EvalFormCodes(IntRequantize(grid, out_grid, f"node {node.name}"), [grid], out_grid))
                with gm.graph.inserting_before(node):
                    arg = gm.graph.call_module(target, (arg,))
                arg.meta[CODES_OF], arg.meta[GRID] = f"{node.name}:input_{i}", out_grid
            parts.append(arg)
        node.args = (parts, *node.args[1:])
    elif is_matmul(node):
        a, b = node.args
        if a not in grids or b not in grids:
            raise LoweringError(f"node {node.name}: a matmul operand is not a quantized tensor")
        inner = a.meta["yoloq.example"].shape[-1]
        p = matmul_requant(grids[a], grids[b], out_grid, inner, f"node {node.name}")
        _to_module(gm, node, EvalFormMatmul(p, grids[a], grids[b], out_grid), (a, b))
    elif (arg := softmax_input(gm, node)) is not None:
        p = softmax_requant(grids[arg], out_grid, node.meta["yoloq.example"].shape[-1], f"node {node.name}")
        _to_module(gm, node, EvalFormCodes(IntSoftmax(p, out_grid), [grids[arg]], out_grid), (arg,))
    # pointwise modules stay float: act then the output quantizer, as in the fake-quant graph


def _to_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, args: tuple) -> None:
    """``node`` becomes a call of ``module`` on ``args``, in place: its name (the check's key) stays."""
    target = f"eval_form_{node.name}"
    gm.add_module(target, module)
    node.op, node.target, node.args, node.kwargs = "call_module", target, tuple(args), {}
    mark(node, NAME)
