"""Bit-exact check of an integer graph against its fake-quant graph's evaluation form (DESIGN §7).

    check_integer(lowered, quantized, inputs) -> IntegerCheck

Both graphs run on the same inputs. Every node of the integer graph that holds codes names the
fake-quant tensor they belong to (``node.meta[CODES_OF]``); the evaluation form's node of that name
is turned into codes on its grid, and the two are compared element by element. A row per tensor:
elements, how many differ, their share and the largest difference in quantization steps. The goal
is ``differing == 0``.

Also reported: how far the evaluation form's head outputs are from the plain fake-quant graph's
(``eval_form_distance``, max |Δ| in float units) and the lowered model's from the fake-quant
graph's (``lowered_distance``): the cost of dyadic multipliers, integer biases and round half up.
For scale, ``float64_distance`` is how far the same fake-quant graph moves when it runs in float64:
a quantized network amplifies float rounding (one flipped code changes the next layer's sums), so
the evaluation form cannot be closer to the float32 fake-quant graph than that, in general.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from yoloq.passes.eval_form import GRID, eval_form, to_codes
from yoloq.passes.graph_utils import image_dependent
from yoloq.passes.lower_to_integer import BOUNDARY, CODES_OF


@dataclasses.dataclass(frozen=True)
class NodeCheck:
    tensor: str
    elements: int
    differing: int
    max_steps: int

    @property
    def share(self) -> float:
        return self.differing / max(self.elements, 1)


@dataclasses.dataclass(frozen=True)
class IntegerCheck:
    rows: tuple[NodeCheck, ...]
    eval_form_distance: float
    lowered_distance: float
    float64_distance: float  # the fake-quant graph in float64 vs float32: its own rounding sensitivity
    unmatched: tuple[str, ...]  # integer-graph tensors with no counterpart in the evaluation form

    @property
    def differing(self) -> int:
        return sum(r.differing for r in self.rows)

    @property
    def verdict(self) -> str:
        missing = f"; {len(self.unmatched)} integer tensor(s) had no counterpart" if self.unmatched else ""
        if self.differing == 0:
            return f"bit-exact: {len(self.rows)} tensors, {sum(r.elements for r in self.rows)} codes, 0 differ{missing}"
        bad = [r for r in self.rows if r.differing]
        worst = max(bad, key=lambda r: r.max_steps)
        return (f"NOT bit-exact: {self.differing} codes differ in {len(bad)} of {len(self.rows)} tensors; "
                f"first {bad[0].tensor}, largest {worst.max_steps} step(s) at {worst.tensor}{missing}")


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps the value of every node that names a quantized tensor."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.seen: dict[str, tuple[torch.Tensor, object]] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if CODES_OF in n.meta and isinstance(value, torch.Tensor):
            self.seen[n.meta[CODES_OF]] = (value, n.meta.get(GRID))
        return value


def _record(gm: fx.GraphModule, x: torch.Tensor) -> tuple[dict, object]:
    recorder = _Recorder(gm)
    out = recorder.run(x)
    return recorder.seen, out


def _max_abs(a, b) -> float:
    left, right = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return max((float((p.float() - q.float()).abs().max()) for p, q in zip(left, right)
                if isinstance(p, torch.Tensor) and p.numel()), default=0.0)


@torch.no_grad()
def check_integer(lowered, quantized, inputs) -> IntegerCheck:
    """Compare ``lowered`` (``lower(quantized)``) with ``quantized``'s evaluation form on ``inputs``
    (a batch, or a list of batches)."""
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    reference = eval_form(quantized).graph_module.eval()
    fake_quant = quantized.graph_module
    was_training = fake_quant.training
    fake_quant.eval()  # BN kept for QAT runs on its running statistics, as the integer graph does
    try:
        return _compare(lowered, fake_quant, reference, batches)
    finally:
        fake_quant.train(was_training)


def _compare(lowered, fake_quant: fx.GraphModule, reference: fx.GraphModule, batches) -> IntegerCheck:
    totals: dict[str, list[int]] = {}
    unmatched: set[str] = set()
    eval_distance = lowered_distance = float64_distance = 0.0
    float64 = copy.deepcopy(fake_quant).double()
    for x in batches:
        ints, int_out = _record(lowered.graph_module, x)
        floats, ref_out = _record(reference, x)
        fake_out = fake_quant(x)
        eval_distance = max(eval_distance, _max_abs(ref_out, fake_out))
        lowered_distance = max(lowered_distance, _max_abs(int_out, fake_out))
        float64_distance = max(float64_distance, _max_abs(float64(x.double()), fake_out))
        for key, (codes, _) in ints.items():
            if key not in floats or floats[key][1] is None:
                unmatched.add(key)
                continue
            value, grid = floats[key]
            steps = (codes.to(torch.int64) - to_codes(value, grid).to(torch.int64)).abs()
            row = totals.setdefault(key, [0, 0, 0])
            row[0] += steps.numel()
            row[1] += int((steps != 0).sum())
            row[2] = max(row[2], int(steps.max()) if steps.numel() else 0)
    rows = tuple(NodeCheck(k, *v) for k, v in totals.items())
    return IntegerCheck(rows, eval_distance, lowered_distance, float64_distance, tuple(sorted(unmatched)))


class _FloatOps(TorchDispatchMode):
    """Records every aten op that reads or makes a floating-point tensor."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = pytree.tree_leaves((args, kwargs, out))
        if any(isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) for t in tensors):
            self.found.append(str(func))
        return out


class _IntegerOnly(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.found: list[str] = []
        self.dependent = image_dependent(gm.graph.nodes)

    def run_node(self, n: fx.Node):
        if n.op in ("placeholder", "output") or BOUNDARY in n.meta or n not in self.dependent:
            return super().run_node(n)
        with _FloatOps() as mode:
            value = super().run_node(n)
        self.found += [f"{n.name}: {op}" for op in dict.fromkeys(mode.found)]
        return value


@torch.no_grad()
def float_ops(lowered, x: torch.Tensor) -> list[str]:
    """``node: aten op`` for every floating-point op that runs between the input quantizer and the
    head dequantization of ``lowered`` on ``x`` (inside modules too) on values that depend on the
    image (``image_dependent``: shape-only constants such as anchor grids are not counted); empty for
    an integer graph."""
    interpreter = _IntegerOnly(lowered.graph_module)
    interpreter.run(x)
    return interpreter.found
