"""What a node's quantizers say: bits, scheme, granularity, scale range, SQNR and oscillation.

Two kinds of graph hold quantization facts in different places:

* fake-quant graphs (planned, quantized, calibrated, QAT-prepared) — the ``QuantAnnotation`` under
  ``node.meta["yoloq.quant"]`` says what is planned, the ``QuantizedLayer`` / ``FakeQuantize``
  modules say what the scales are now;
* the integer graph — no annotations survive lowering, so the integer modules' own grids
  (``IntConv2d.out``, ``IntSum.out``, the boundary quantizers) are read instead.

The SQNR comes from a ``QuantReport`` (its rows name quantizer module paths) and the oscillation
shares from an ``OscillationTracker``; both are optional, and a node without them just says less.
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch.fx as fx

from yoloq.passes.insert_quantizers import QUANTIZES, QuantizedLayer
from yoloq.passes.integer_ops import (
    DequantizeOutput, Grid, IntConv2d, IntRequantize, IntSum, Lut, QuantizeInput,
)
from yoloq.passes.lower_to_integer import CODES_OF
from yoloq.passes.plan_quantization import QUANT, QuantAnnotation
from yoloq.quantizers.fake_quantize import FakeQuantize
from yoloq.quantizers.spec import QuantSpec
from yoloq.report import QuantizerRow

ROLE_ABBREVIATION = {"weight": "W", "pre_activation": "P", "activation": "A", "output": "A", "input": "A",
                     "lookup table": "A"}


@dataclasses.dataclass(frozen=True)
class QuantFacts:
    bits: int | None  # what the node is coloured by
    roles: tuple[tuple[str, str], ...]  # (role, one line: bits · scheme · granularity · scale · SQNR)
    badge: str  # e.g. "W4 P16 A4" for the node's second line
    sqnr_db: float | None = None  # the lowest SQNR among its quantizers' report rows


NO_FACTS = QuantFacts(None, (), "")


@dataclasses.dataclass(frozen=True)
class Sources:
    """The optional inputs, indexed once: report rows by quantizer path, oscillation by layer name."""

    rows: dict[str, QuantizerRow]
    rows_by_node_name: dict[str, QuantizerRow]  # the path with dots as underscores, as fx names nodes
    oscillation: dict[str, object]

    @classmethod
    def of(cls, report, oscillation) -> Sources:
        rows = {r.quantizer: r for r in report.rows} if report is not None else {}
        stats = {s.name: s for s in oscillation.layer_stats()} if oscillation is not None else {}
        return cls(rows, {path.replace(".", "_"): row for path, row in rows.items()}, stats)

    def row(self, path: str) -> QuantizerRow | None:
        return self.rows.get(path)

    def row_of_node_name(self, name: str) -> QuantizerRow | None:
        """The row of a fake-quant node *name* (``activation_quantizers_g4_1``: the 2nd call of g4)."""
        return self.rows_by_node_name.get(name) or self.rows_by_node_name.get(re.sub(r"_\d+$", "", name))

    def layer_oscillation(self, qualname: str) -> str | None:
        """A tracker built on a QuantizedModel names layers ``graph_module.<name>``; match the suffix."""
        for name, s in self.oscillation.items():
            if name == qualname or name.endswith("." + qualname):
                return (f"{100 * s.oscillating:.2f}% oscillating · {100 * s.frozen:.2f}% frozen · "
                        f"mean frequency {s.mean_frequency:.4f} ({s.weights} weights)")
        return None


def _scale_text(low: float, high: float) -> str:
    return f"scale {low:.3g}" if low == high else f"scale {low:.3g}…{high:.3g}"


def _sqnr_text(row: QuantizerRow | None) -> str:
    if row is None:
        return ""
    return " · SQNR ∞ dB" if math.isinf(row.sqnr_db) else f" · SQNR {row.sqnr_db:.1f} dB"


def spec_line(spec: QuantSpec, quantizer: FakeQuantize | None, row: QuantizerRow | None) -> str:
    """``4 bits · uniform · per_channel · unsigned affine · scale a…b`` (scale from the live
    quantizer, else from the report row)."""
    grid = ("signed" if spec.signed else "unsigned") + (" symmetric" if spec.symmetric else " affine")
    parts = [f"{spec.bits} bits", spec.scheme, spec.granularity, grid]
    if quantizer is not None and quantizer.is_calibrated:
        parts.append(_scale_text(*quantizer.scale_range()))
    elif row is not None:
        parts.append(_scale_text(row.scale_min, row.scale_max))
    elif quantizer is not None:
        parts.append("not calibrated")
    return " · ".join(parts)


class _Facts:
    """Collects a node's role lines, its badge and the report rows they used."""

    def __init__(self, bits: int | None = None):
        self.bits, self.roles, self.badge, self.sqnr = bits, [], [], []

    def add(self, role: str, line: str, bits: int | None = None, row: QuantizerRow | None = None) -> None:
        self.roles.append((role, line + _sqnr_text(row)))
        if bits is not None:
            self.badge.append(f"{ROLE_ABBREVIATION.get(role, role[:1].upper())}{bits}")
        if row is not None:
            self.sqnr.append(row.sqnr_db)

    def spec(self, role: str, spec: QuantSpec, quantizer: FakeQuantize | None, row: QuantizerRow | None) -> None:
        self.add(role, spec_line(spec, quantizer, row), spec.bits, row)

    def done(self, badge: str | None = None) -> QuantFacts:
        return QuantFacts(self.bits, tuple(self.roles), " ".join(self.badge) if badge is None else badge,
                          min(self.sqnr) if self.sqnr else None)


def _output_quantizer(gm: fx.GraphModule, node: fx.Node) -> tuple[str, FakeQuantize] | None:
    for user in node.users:
        if user.meta.get(QUANTIZES) == node.name and user.op == "call_module":
            return str(user.target), gm.get_submodule(user.target)
    return None


def fake_quant_facts(gm: fx.GraphModule, node: fx.Node, src: Sources) -> QuantFacts:
    annotation = node.meta.get(QUANT)
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(module, FakeQuantize):
        facts = _Facts(module.spec.bits)
        role = "input" if node.meta.get(QUANTIZES) in _placeholders(gm) else "activation"
        facts.spec(role, module.spec, module, src.row(str(node.target)))
        return facts.done()
    if isinstance(module, QuantizedLayer):
        return _layer_facts(gm, node, module, src)
    if not isinstance(annotation, QuantAnnotation) or annotation.output is None:
        if isinstance(annotation, QuantAnnotation) and annotation.skip:
            return QuantFacts(None, (("recipe", "kept in float (skip)"),), "float")
        return NO_FACTS
    if annotation.kind == "layer":  # planned, quantizers not inserted yet
        facts = _Facts(annotation.weight.bits if annotation.weight else annotation.output.bits)
        for role in ("weight", "pre_activation", "output"):
            if (spec := getattr(annotation, role)) is not None:
                facts.add(role, spec_line(spec, None, None) + " (planned)", spec.bits)
        return facts.done()
    if annotation.kind == "input":
        facts, out = _Facts(None), _output_quantizer(gm, node)
        facts.add("quantized after it", spec_line(annotation.output, out and out[1], None),
                  row=src.row(out[0]) if out else None)
        return facts.done("float")
    path = f"activation_quantizers.g{annotation.group}"
    facts = _Facts(annotation.output.bits)
    role = "output" if annotation.kind == "compute" else f"codes of scale group g{annotation.group}"
    facts.add(role, spec_line(annotation.output, _submodule(gm, path), None), row=src.row(path))
    return facts.done(f"A{annotation.output.bits}")


def _layer_facts(gm: fx.GraphModule, node: fx.Node, layer: QuantizedLayer, src: Sources) -> QuantFacts:
    target = str(node.target)
    facts = _Facts(layer.weight_quant.spec.bits if layer.weight_quant is not None else None)
    for role, quantizer, attribute in (("weight", layer.weight_quant, "weight_quant"),
                                       ("pre_activation", layer.pre_act_quant, "pre_act_quant")):
        if quantizer is not None:
            facts.spec(role, quantizer.spec, quantizer, src.row(f"{target}.{attribute}"))
    if (out := _output_quantizer(gm, node)) is not None:
        facts.spec("output", out[1].spec, out[1], src.row(out[0]))
    if oscillation := src.layer_oscillation(target):
        facts.add("weight oscillation", oscillation)
    return facts.done()


def _placeholders(gm: fx.GraphModule) -> set[str]:
    return {n.name for n in gm.graph.nodes if n.op == "placeholder"}


def _submodule(gm: fx.GraphModule, path: str):
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


# ----------------------------------------------------------------------------- integer graph
def grid_bits(qmin: int, qmax: int) -> int:
    return max(1, math.ceil(math.log2(qmax - qmin + 1)))


def grid_line(grid: Grid) -> str:
    return (f"{grid_bits(grid.qmin, grid.qmax)} bits · codes [{grid.qmin}, {grid.qmax}] · zero point "
            f"{grid.zero_point} · scale {grid.scale:.3g}")


def integer_facts(gm: fx.GraphModule, node: fx.Node, src: Sources, input_bits: int | None) -> QuantFacts:
    """``input_bits``: the width of the codes flowing in (what views, cat and pooling keep)."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    codes_of = str(node.meta.get(CODES_OF, ""))
    layer, _, role = codes_of.partition(":")
    if isinstance(module, IntConv2d):
        facts = _Facts(module.bits)
        qualname = layer if role == "pre_activation" else None
        facts.add("weight", f"{module.bits} bits · {'signed' if module.signed else 'unsigned'} codes · "
                            f"{module.weight.dtype} accumulator", module.bits,
                  src.row(f"{qualname}.weight_quant") if qualname else None)
        out_bits = grid_bits(module.out.qmin, module.out.qmax)
        facts.add("pre_activation" if qualname else "output", grid_line(module.out), out_bits,
                  src.row(f"{layer}.pre_act_quant") if qualname else src.row_of_node_name(codes_of))
        if qualname and (oscillation := src.layer_oscillation(qualname)):
            facts.add("weight oscillation", oscillation)
        return facts.done()
    if isinstance(module, Lut):
        low, high = int(module.table.min()), int(module.table.max())
        facts = _Facts(grid_bits(low, high))
        facts.add("lookup table", f"{module.table.numel()} entries over input codes from {module.x_min}; "
                                  f"outputs in [{low}, {high}] (≈{facts.bits} bits)", facts.bits,
                  src.row_of_node_name(codes_of))
        return facts.done()
    if isinstance(module, (IntSum, IntRequantize)):
        out = module.out if isinstance(module, IntSum) else module.inner.out
        facts = _Facts(grid_bits(out.qmin, out.qmax))
        facts.add("output", grid_line(out), facts.bits, src.row_of_node_name(codes_of))
        return facts.done()
    if isinstance(module, (QuantizeInput, DequantizeOutput)):
        q, quantize = module.quantizer, isinstance(module, QuantizeInput)
        facts = _Facts(q.spec.bits if quantize else None)
        facts.spec("codes out" if quantize else "codes in (float out)", q.spec, q, None)
        return facts.done(f"float→{q.spec.bits}b" if quantize else f"{q.spec.bits}b→float")
    if input_bits is not None and codes_of:
        return QuantFacts(input_bits, (("codes", f"{input_bits}-bit codes moved, not recomputed"),), f"{input_bits}b")
    return NO_FACTS
