"""A readable listing of a GraphModule: node, op, target, output shape, the pass that made it."""
from __future__ import annotations

from collections import Counter

import torch.fx as fx


def _target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def graph_rows(gm: fx.GraphModule) -> list[tuple[str, str, str, str, str]]:
    return [
        (n.name, n.op, _target(gm, n), str(n.meta.get("yoloq.example", "")), str(n.meta.get("yoloq.origin", "")))
        for n in gm.graph.nodes
    ]


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], max_width: int = 60) -> str:
    cells = [tuple(c if len(c) <= max_width else c[: max_width - 1] + "…" for c in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_graph(gm: fx.GraphModule) -> str:
    return format_table(("node", "op", "target", "output", "created by"), graph_rows(gm))


def summarise_graph(gm: fx.GraphModule) -> Counter:
    """Node counts by kind: module class for call_module, else the op."""
    return Counter(
        type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else n.op for n in gm.graph.nodes
    )
