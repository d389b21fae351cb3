"""Lower a calibrated fake-quant graph to an integer-only graph (DESIGN §7).

    before:  x -> Q_in -> QuantizedLayer(conv, act) -> Q_g1 -> cat -> maxpool -> ... -> Q_head -> out
    after:   x -> QuantizeInput -> IntConv2d -> Lut -> cat -> maxpool -> ... -> IntConv2d
               -> DequantizeOutput -> out                 (then the float Decoder, as before)

Between ``QuantizeInput`` and ``DequantizeOutput`` every tensor is integer codes:

    QuantizedLayer       IntConv2d: int32 conv of (q − z) with (q_w − z_w), bias in the accumulator
                         domain, dyadic requantization (round half up) to the pre-activation grid;
                         then Lut: a table over every pre-activation code → output codes
                         (a layer without activation requantizes straight to its output grid)
    Add / Sub            IntSum: inputs requantized to the output grid in one rounding
    pointwise module     Lut over its input's codes (SiLU, Sigmoid, Hardswish, anything pointwise;
                         a scalar multiply such as attention's ``q * scale`` too)
    matmul of two        IntMatmul: integer matmul of (q_a − z_a), (q_b − z_b), dyadic requantization
    quantized tensors
    softmax (last dim)   IntSoftmax: exponential table over max_row(q) − q, integer row sum, one
                         integer division (``integer_ops``)
    Concat (requantize)  IntRequantize on each input whose grid differs, then cat
    MaxPool, views,      the same op on codes (a shared-scale group: no arithmetic)
    cat (shared), chunk
    nearest Upsample     UpsampleNearestCodes (index repetition)
    quantizer nodes      vanish: the root before them already produced their codes

The numbers (multipliers, shifts, integer biases, tables) come from ``integer_ops``, which
``eval_form`` uses too, so the two graphs compute the same codes. Every created node carries
``node.meta[CODES_OF]``: the fake-quant tensor whose codes it holds (``check_integer`` pairs on it).
"""
from __future__ import annotations

import copy
import itertools
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from yoloq.passes.fuse_conv_act import is_pointwise
from yoloq.passes.graph_utils import DTYPE_ONLY, mark
from yoloq.passes.insert_quantizers import QUANTIZES, QuantizedLayer
from yoloq.passes.integer_attention import IntMatmul, IntSoftmax, matmul_requant, softmax_requant
from yoloq.passes.integer_ops import (
    DequantizeOutput, Grid, IntConv2d, IntRequantize, IntSum, LoweringError, Lut, QuantizeInput,
    UpsampleNearestCodes, conv_requant, grid_of, lookup_table, sum_requant, upsample_factors,
)
from yoloq.passes.plan_quantization import CONCATS, QUANT
from yoloq.pipeline import PassResult
from yoloq.quantizers.fake_quantize import FakeQuantize

NAME = "lower_to_integer"
CODES_OF = "yoloq.codes_of"  # node.meta: name of the fake-quant tensor whose codes this node holds
BOUNDARY = "yoloq.boundary"  # node.meta: "input" / "output" on the two float boundary nodes
ADDS = {operator.add: 1, torch.add: 1, operator.sub: -1, torch.sub: -1}
METHOD_ADDS = {"add": 1, "__add__": 1, "sub": -1, "__sub__": -1}
MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
METHOD_MATMULS = {"matmul", "__matmul__", "bmm", "mm"}
SOFTMAXES = {torch.softmax, F.softmax}


class LoweredModel(nn.Module):
    """Integer graph (float only at its two boundaries) and the float decoder:
    ``model(x) = decoder(graph_module(x))``. ``stats`` says how it was built."""

    def __init__(self, graph_module: fx.GraphModule, decoder: nn.Module, stats: dict):
        super().__init__()
        self.graph_module = graph_module
        self.decoder = decoder
        self.stats = stats

    def forward(self, x: torch.Tensor):
        return self.decoder(self.graph_module(x))


class _Lowering:
    def __init__(self, gm: fx.GraphModule):
        self.old, self.graph, self.root = gm, fx.Graph(), nn.Module()
        self.env: dict[fx.Node, fx.Node] = {}
        self.grids: dict[fx.Node, Grid] = {}
        self.stats = {"conv": 0, "lut": 0, "sum": 0, "matmul": 0, "softmax": 0, "int64_layers": [],
                      "max_accumulator_bound": 0, "min_multiplier_bits": 31}

    def module(self, node: fx.Node) -> nn.Module:
        return self.old.get_submodule(node.target)

    def add(self, name: str, module: nn.Module) -> str:
        target, suffix = name.replace(".", "_"), 0
        while hasattr(self.root, target):  # a module called twice gets one integer module per call
            suffix += 1
            target = f"{name.replace('.', '_')}_{suffix}"
        self.root.add_module(target, module)
        return target

    def emit(self, name: str, module: nn.Module, args: tuple, codes_of: str, grid: Grid) -> fx.Node:
        new = self.graph.call_module(self.add(name, module), args)
        new.meta[CODES_OF] = codes_of
        mark(new, NAME)
        self.grids[new] = grid
        return new

    def output_quantizer(self, node: fx.Node) -> fx.Node:
        users = [u for u in node.users if u.meta.get(QUANTIZES) == node.name]
        if len(users) != 1:
            raise LoweringError(f"node {node.name}: its output is not quantized (kept float?); the integer "
                                "graph needs a quantized output here")
        return users[0]

    def out_grid(self, node: fx.Node) -> tuple[fx.Node, Grid]:
        q = self.output_quantizer(node)
        return q, grid_of(self.module(q), f"{node.name} output")


def lower_to_integer(gm: fx.GraphModule) -> PassResult:
    """The pass: a calibrated fake-quant graph → a new integer graph (the input graph is untouched)."""
    low = _Lowering(gm)
    for node in gm.graph.nodes:
        _lower_node(low, node)
    integer = fx.GraphModule(low.root, low.graph, "IntegerGraph")
    return PassResult(integer, True, low.stats,
                      [f"int64 accumulators (int32 bound exceeded): {low.stats['int64_layers']}"]
                      if low.stats["int64_layers"] else [])


def _requires(gm: fx.GraphModule) -> str | None:
    quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantize)]
    if not quantizers:
        return "no quantizers: run yoloq.quantize (plan, insert, calibrate) first"
    missing = [name for name, m in gm.named_modules() if isinstance(m, FakeQuantize) and not m.is_calibrated]
    return f"uncalibrated quantizers: {missing[:3]}; calibrate before lowering" if missing else None


lower_to_integer.name = NAME
lower_to_integer.requires = _requires


def lower(qm) -> LoweredModel:
    """The integer-only form of a calibrated ``QuantizedModel`` (module docstring); raises
    ``LoweringError`` naming the node for anything it cannot compute in integers."""
    if reason := _requires(qm.graph_module):
        raise LoweringError(f"cannot lower: {reason}")
    result = lower_to_integer(qm.graph_module)
    result.gm.graph.lint()
    return LoweredModel(result.gm, copy.deepcopy(qm.decoder), result.stats)


def _lower_node(low: _Lowering, node: fx.Node) -> None:
    kind = node.meta[QUANT].kind if QUANT in node.meta else "none"
    if node.op == "placeholder":
        x = low.graph.placeholder(node.name)
        q, grid = low.out_grid(node)
        low.env[node] = low.emit("quantize_input", QuantizeInput(copy.deepcopy(grid.quantizer)), (x,), q.name, grid)
        low.env[node].meta[BOUNDARY] = "input"
    elif node.meta.get(QUANTIZES) is not None:  # its root already made these codes
        low.env[node] = low.env[node.all_input_nodes[0]]
    elif node.op == "output":
        _lower_output(low, node)
    elif kind == "layer":
        _lower_layer(low, node)
    elif kind == "compute":
        _lower_compute(low, node)
    elif kind == "passthrough":
        _lower_passthrough(low, node)
    elif node.op == "call_method" and node.target in DTYPE_ONLY and node.args[DTYPE_ONLY[node.target]] in low.env \
            and low.env[node.args[DTYPE_ONLY[node.target]]] in low.grids:
        # e.g. arange(...).type_as(feature): the feature now holds integer codes, its float dtype is meant
        dtype = node.meta["yoloq.example"].dtype
        low.env[node] = low.graph.call_method("to", (low.env[node.args[0]], dtype))
    else:  # guards, shape reads, shape constants (anchor grids): copied as they are
        _copy(low, node, module=copy.deepcopy(low.module(node)) if node.op == "call_module" else None)


def _input(low: _Lowering, node: fx.Node, arg: fx.Node) -> tuple[fx.Node, Grid]:
    if arg not in low.env or low.env[arg] not in low.grids:
        raise LoweringError(f"node {node.name}: input {arg.name} is not a quantized tensor")
    return low.env[arg], low.grids[low.env[arg]]


def _lower_layer(low: _Lowering, node: fx.Node) -> None:
    qlayer = low.module(node)
    if not isinstance(qlayer, QuantizedLayer):
        raise LoweringError(f"layer {node.target}: kept in float by the recipe; the integer graph cannot run it")
    x, x_grid = _input(low, node, node.args[0])
    q, out_grid = low.out_grid(node)
    act = getattr(qlayer.layer, "act", None)
    conv_grid = out_grid
    if act is not None:
        conv_grid = grid_of(qlayer.pre_act_quant, f"layer {node.target} pre-activation (the lookup table's input)")
    params = conv_requant(qlayer, x_grid, conv_grid, f"layer {node.target}")
    low.stats["conv"] += 1
    low.stats["max_accumulator_bound"] = max(low.stats["max_accumulator_bound"], params.bound)
    if params.accumulator == torch.int64:
        low.stats["int64_layers"].append(str(node.target))
    low.stats["min_multiplier_bits"] = min(low.stats["min_multiplier_bits"], params.multiplier_bits)
    key = f"{node.target}:pre_activation" if act is not None else q.name
    y = low.emit(str(node.target), IntConv2d(params, x_grid, conv_grid), (x,), key, conv_grid)
    if act is not None:
        table = lookup_table(act, conv_grid, out_grid)
        y = low.emit(f"{node.target}.act", Lut(table, conv_grid), (y,), q.name, out_grid)
        low.stats["lut"] += 1
    low.env[node] = y


def _lower_compute(low: _Lowering, node: fx.Node) -> None:
    q, out_grid = low.out_grid(node)
    tensors = node.all_input_nodes
    sign = ADDS.get(node.target) if node.op == "call_function" else (
        METHOD_ADDS.get(node.target) if node.op == "call_method" else None)
    if sign is not None and len(tensors) == 2 and len(node.args) == 2 and not node.kwargs:
        inputs = [_input(low, node, a) for a in node.args]
        grids = [g for _, g in inputs]
        params = sum_requant(grids, [1, sign], out_grid, f"node {node.name}")
        low.env[node] = low.emit(node.name, IntSum(params, grids, out_grid), tuple(n for n, _ in inputs),
                                 q.name, out_grid)
        low.stats["sum"] += 1
    elif node.op == "call_function" and node.target in CONCATS:
        _lower_requantized_cat(low, node, q.name, out_grid)
    elif is_matmul(node):
        _lower_matmul(low, node, q.name, out_grid)
    elif (arg := softmax_input(low.old, node)) is not None:
        x, x_grid = _input(low, node, arg)
        params = softmax_requant(x_grid, out_grid, node.meta["yoloq.example"].shape[-1], f"node {node.name}")
        low.env[node] = low.emit(node.name, IntSoftmax(params, out_grid), (x,), q.name, out_grid)
        low.stats["softmax"] += 1
    elif len(tensors) == 1 and (fn := _pointwise(low, node)) is not None:
        x, x_grid = _input(low, node, tensors[0])
        low.env[node] = low.emit(node.name, Lut(lookup_table(fn, x_grid, out_grid), x_grid), (x,), q.name, out_grid)
        low.stats["lut"] += 1
    else:
        what = node.target if node.op != "call_module" else type(low.module(node)).__name__
        raise LoweringError(f"node {node.name}: {node.op} {what} is not supported by the integer lowering; "
                            "keep it in float through the recipe, or cut the graph before it")


def is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MATMULS) or (
        node.op == "call_method" and node.target in METHOD_MATMULS)


def softmax_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input of a softmax over the last dim; None when ``node`` is no softmax; LoweringError for a
    softmax the integer graph cannot compute (another dim, a dtype argument)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Softmax):
            return None
        dim, dtype = module.dim, None
    elif (node.op == "call_function" and node.target in SOFTMAXES) or (
            node.op == "call_method" and node.target == "softmax"):
        at = 3 if node.target is F.softmax else 2  # F.softmax(input, dim, _stacklevel, dtype)
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dtype = node.kwargs.get("dtype", node.args[at] if len(node.args) > at else None)
    else:
        return None
    ndim = len(node.meta["yoloq.example"].shape)
    if dim not in (-1, ndim - 1) or dtype is not None:
        raise LoweringError(f"node {node.name}: softmax over dim {dim} of a {ndim}-d tensor (dtype {dtype}) is "
                            "not supported: the integer softmax runs over the last dim in the input's dtype; "
                            "transpose the reduced dim to the end, or keep it in float through the recipe")
    return node.args[0]


def _lower_matmul(low: _Lowering, node: fx.Node, key: str, out_grid: Grid) -> None:
    operands = node.args
    if len(operands) != 2 or node.kwargs:
        raise LoweringError(f"node {node.name}: {node.target} called with {len(operands)} positional arguments "
                            f"and {sorted(node.kwargs)}; the integer lowering reads matmul(a, b) only")
    for arg in operands:
        if not isinstance(arg, fx.Node) or low.grids.get(low.env.get(arg)) is None:
            name = arg.name if isinstance(arg, fx.Node) else repr(arg)
            raise LoweringError(f"node {node.name}: {node.target} with operand {name}, which is not a quantized "
                                "tensor (a float constant or weight?); the integer matmul multiplies two quantized "
                                "activations: make a constant operand a Conv2d/Linear layer, or keep it in float "
                                "through the recipe")
    (a, a_grid), (b, b_grid) = (_input(low, node, arg) for arg in operands)
    inner = operands[0].meta["yoloq.example"].shape[-1]
    params = matmul_requant(a_grid, b_grid, out_grid, inner, f"node {node.name}")
    low.env[node] = low.emit(node.name, IntMatmul(params, a_grid, b_grid, out_grid), (a, b), key, out_grid)
    low.stats["matmul"] += 1
    low.stats["max_accumulator_bound"] = max(low.stats["max_accumulator_bound"], params.bound)
    low.stats["min_multiplier_bits"] = min(low.stats["min_multiplier_bits"], params.multiplier_bits)
    if params.accumulator == torch.int64:
        low.stats["int64_layers"].append(node.name)


def _pointwise(low: _Lowering, node: fx.Node):
    """The node as a one-tensor function when it is pointwise (fuse_conv_act's probe), else None."""
    if node.op == "call_module":
        module = low.module(node)
        return module if is_pointwise(module) else None
    arg = node.all_input_nodes[0]

    def fn(x):
        args = fx.node.map_arg(node.args, lambda a: x if a is arg else a)
        kwargs = fx.node.map_arg(node.kwargs, lambda a: x if a is arg else a)
        return node.target(*args, **kwargs) if node.op == "call_function" else getattr(x, node.target)(*args[1:], **kwargs)

    probe = type("Probe", (nn.Module,), {"forward": lambda self, x: fn(x)})()
    return fn if is_pointwise(probe) else None


def _lower_requantized_cat(low: _Lowering, node: fx.Node, key: str, out_grid: Grid) -> None:
    parts = []
    for i, arg in enumerate(node.args[0]):
        x, grid = _input(low, node, arg)
        if (grid.scale, grid.zero_point) != (out_grid.scale, out_grid.zero_point):
            x = low.emit(f"{node.name}.requantize_{i}", IntRequantize(grid, out_grid, f"node {node.name}"),
                         (x,), f"{node.name}:input_{i}", out_grid)
        parts.append(x)
    new = low.graph.call_function(node.target, (parts, *node.args[1:]), node.kwargs)
    new.meta[CODES_OF] = key
    low.grids[new] = out_grid
    low.env[node] = new


def _lower_passthrough(low: _Lowering, node: fx.Node) -> None:
    found = [g for a in node.all_input_nodes if (g := low.grids.get(low.env.get(a))) is not None]
    if not found:
        raise LoweringError(f"node {node.name}: moves a tensor that is not quantized")
    if len({(g.scale, g.zero_point) for g in found}) > 1:
        raise LoweringError(f"node {node.name}: inputs on different grids in a shared-scale group")
    grid = found[0]
    module = None
    if node.op == "call_module":
        module = copy.deepcopy(low.module(node))
        if isinstance(module, nn.Upsample):
            module = UpsampleNearestCodes(upsample_factors(module, f"node {node.name}"))
    new = _copy(low, node, module)
    low.grids[new] = grid
    new.meta[CODES_OF] = node.name


def _copy(low: _Lowering, node: fx.Node, module: nn.Module | None) -> fx.Node:
    args = fx.node.map_arg(node.args, low.env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, low.env.__getitem__)
    if node.op == "call_module":  # a module called several times (SPPF's pool) is copied once
        target = str(node.target).replace(".", "_")
        if not hasattr(low.root, target):
            low.root.add_module(target, module)
        new = low.graph.call_module(target, args, kwargs)
    else:
        new = low.graph.create_node(node.op, node.target, args, kwargs)
    low.env[node] = new
    return new


def _lower_output(low: _Lowering, node: fx.Node) -> None:
    counter = itertools.count()

    def dequantize(arg: fx.Node) -> fx.Node:
        codes = low.env[arg]
        grid = low.grids.get(codes)
        if grid is None and QUANT in arg.meta and arg.meta[QUANT].kind == "none":
            return codes  # a shape constant for the decoder (anchor grid), float in both graphs
        if grid is None:
            raise LoweringError(f"head output {arg.name} is not quantized; the integer graph hands over "
                                "quantized head outputs only")
        out = low.graph.call_module(low.add(f"dequantize_{next(counter)}", DequantizeOutput(
            copy.deepcopy(grid.quantizer))), (codes,))
        out.meta[BOUNDARY] = "output"
        return out

    low.graph.output(fx.node.map_arg(node.args[0], dequantize))
