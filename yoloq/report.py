"""The quantization report: one row per quantizer, with its SQNR against float on a batch.

Every ``FakeQuantize`` is hooked; the network runs once with all quantizers passing values through
(float) and once quantizing, and each quantizer's outputs are compared call by call:

    SQNR = 10 · log10( Σ x_float² / Σ (x_quant - x_float)² )   [dB]

For a weight quantizer that is the weight's own quantization error; for an activation quantizer it
is the error of the whole quantized network up to that tensor, so a collapse shows where it starts.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from yoloq.graph_table import format_table
from yoloq.passes.calibrate import quantizers
from yoloq.passes.insert_quantizers import CONTAINER, QUANTIZES
from yoloq.passes.plan_quantization import QUANT

ROLE_OF_ATTRIBUTE = {"weight_quant": "weight", "pre_act_quant": "pre_activation"}


@dataclasses.dataclass(frozen=True)
class QuantizerRow:
    quantizer: str  # module path of the FakeQuantize
    node: str  # the layer it belongs to, or the node(s) whose output it quantizes
    role: str  # weight, pre_activation, activation or input; with the recipe roles in brackets
    bits: int
    scheme: str
    granularity: str
    scale_min: float
    scale_max: float
    sqnr_db: float

    def cells(self) -> tuple[str, ...]:
        return (self.node, self.role, str(self.bits), self.scheme, self.granularity,
                f"{self.scale_min:.3g}..{self.scale_max:.3g}", f"{self.sqnr_db:.1f}")


@dataclasses.dataclass(frozen=True)
class QuantReport:
    rows: tuple[QuantizerRow, ...]

    def format(self) -> str:
        header = ("node", "role", "bits", "scheme", "granularity", "scale", "SQNR dB")
        return format_table(header, [r.cells() for r in self.rows], max_width=48)

    def by_role(self, role: str) -> list[QuantizerRow]:
        return [r for r in self.rows if r.role.split(" ")[0] == role]


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def _record_outputs(gm: torch.nn.Module, batch: torch.Tensor, quantizing: bool) -> dict[str, list[torch.Tensor]]:
    found = quantizers(gm)
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name, _ in found}
    hooks = []
    for name, q in found:
        q.observing, q.quantizing = False, quantizing
        hooks.append(q.register_forward_hook(lambda m, i, o, name=name: outputs[name].append(o.detach())))
    try:
        with torch.no_grad():
            gm(batch)
    finally:
        for h in hooks:
            h.remove()
        for _, q in found:
            q.quantizing = True
    return outputs


def _activation_owners(gm: fx.GraphModule) -> dict[str, tuple[list[str], set[str], str]]:
    """quantizer path -> (quantized node names, their roles, 'input' or 'activation')."""
    owners: dict[str, tuple[list[str], set[str], str]] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        if n.op == "call_module" and QUANTIZES in n.meta:
            root = by_name.get(n.meta[QUANTIZES])
            names, roles, _ = owners.setdefault(n.target, ([], set(), "activation"))
            names.append(str(root.target) if root is not None and root.op == "call_module" else n.meta[QUANTIZES])
            if root is not None:
                roles |= set(root.meta[QUANT].roles)
                if root.op == "placeholder":
                    owners[n.target] = (names, roles, "input")
    return owners


def _describe(path: str, owners) -> tuple[str, str]:
    if path.startswith(CONTAINER + "."):
        names, roles, kind = owners.get(path, ([path], set(), "activation"))
        node = names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1} shared"
        return node, kind + (f" [{', '.join(sorted(roles))}]" if roles else "")
    layer, _, attribute = path.rpartition(".")
    return layer, ROLE_OF_ATTRIBUTE.get(attribute, attribute)


def build_report(gm: fx.GraphModule, batch: torch.Tensor) -> QuantReport:
    """Rows for every quantizer of a calibrated graph, SQNR measured on ``batch``."""
    was_training = gm.training
    gm.eval()
    try:
        reference = _record_outputs(gm, batch, quantizing=False)
        quantized = _record_outputs(gm, batch, quantizing=True)
    finally:
        gm.train(was_training)
    owners = _activation_owners(gm)
    rows = []
    for path, q in quantizers(gm):
        signal = sum(float(x.double().pow(2).sum()) for x in reference[path])
        noise = sum(float((y.double() - x.double()).pow(2).sum()) for x, y in zip(reference[path], quantized[path]))
        node, role = _describe(path, owners)
        low, high = q.scale_range()
        rows.append(QuantizerRow(path, node, role, q.spec.bits, q.spec.scheme, q.spec.granularity,
                                 low, high, _sqnr(signal, noise)))
    return QuantReport(tuple(rows))
