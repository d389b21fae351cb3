"""Collapse a graph by module prefix, so a 300-node YOLO reads as its ~25 blocks.

With ``depth = 2`` every node whose module path is longer than two names (``model.2.cv1.conv``,
the ``cat`` inside ``model.2``'s forward, the quantizer after ``model.2.cv3``) joins the box of its
prefix ``model.2``; nodes at the root or at depth ≤ 2 stay themselves, and a prefix that holds a
single node is not boxed. ``expand`` names one box whose members stay expanded (the page's
click-to-expand view). Edges between two members vanish; edges into or out of a box are kept once.

A box is coloured by the bit width most of its members use, and lists the rest in its details.
"""
from __future__ import annotations

import math
from collections import Counter

from yoloq.tools.viz.view import BOX_PREFIX, VizGraph, VizNode

AUTO_MIN_NODES = 40  # graphs up to this size are drawn whole by collapse_depth="auto"
AUTO_MIN_BOXES = 8  # "auto" picks the shallowest depth that still shows this many nodes


def box_id(prefix: tuple[str, ...]) -> str:
    return BOX_PREFIX + ".".join(prefix)


def collapse(graph: VizGraph, depth: int | None, expand: str = "") -> VizGraph:
    if depth is None:
        return graph
    if depth < 1:
        raise ValueError(f"collapse depth must be at least 1, got {depth}")
    opened = tuple(expand[len(BOX_PREFIX):].split(".")) if expand else ()
    prefix_of: dict[str, tuple[str, ...]] = {}
    for n in graph.nodes:
        if len(n.path) > depth and not (opened and n.path[:len(opened)] == opened):
            prefix_of[n.id] = n.path[:depth]
    members = Counter(prefix_of.values())
    rep = {n.id: box_id(prefix_of[n.id]) if members[prefix_of.get(n.id)] > 1 else n.id for n in graph.nodes}
    inside: dict[str, list[VizNode]] = {}
    for n in graph.nodes:
        inside.setdefault(rep[n.id], []).append(n)
    nodes = tuple(group[0] if rep_id == group[0].id else _box(rep_id, group, graph.module_types)
                  for rep_id, group in inside.items())
    edges: dict[tuple[str, str], str] = {}
    for a, b, status in graph.edges:
        key = (rep[a], rep[b])
        if key[0] != key[1]:
            edges[key] = status if edges.get(key, status) == status else "changed"
    return VizGraph(graph.title, nodes, tuple((a, b, s) for (a, b), s in edges.items()),
                    expanded=expand, module_types=graph.module_types, diff=graph.diff)


def _box(node_id: str, members: list[VizNode], module_types: dict[str, str]) -> VizNode:
    prefix = node_id[len(BOX_PREFIX):]
    bits = Counter(m.bits for m in members if m.bits is not None)
    common = bits.most_common(1)[0][0] if bits else None
    widths = ", ".join(f"{b} bits ×{c}" for b, c in sorted(bits.items()))
    floats = sum(m.bits is None for m in members)
    kinds = Counter(m.kind for m in members)
    details = [("box", prefix), ("module", module_types.get(prefix, "—")), ("nodes inside", str(len(members))),
               ("kinds", ", ".join(f"{k} ×{c}" if c > 1 else k for k, c in kinds.most_common())),
               ("bit widths", ", ".join(filter(None, (widths, f"float ×{floats}" if floats else ""))))]
    scored = [m for m in members if m.sqnr_db is not None]
    worst = min(scored, key=lambda m: m.sqnr_db) if scored else None
    if worst is not None:
        sqnr = "∞" if math.isinf(worst.sqnr_db) else f"{worst.sqnr_db:.1f}"
        details.append(("lowest SQNR", f"{sqnr} dB at {worst.label}"))
    statuses = Counter(m.status for m in members)
    if set(statuses) != {""}:
        details.append(("diff", ", ".join(f"{s or 'kept'} ×{c}" for s, c in statuses.most_common())))
    status = next(iter(statuses)) if len(statuses) == 1 else "changed"
    if any(m.head for m in members):
        details.append(("head output", "holds a raw head output: the float decoder reads it"))
    details.append(("expand", "click the box (or give a larger collapse depth)"))
    badge = " ".join(f"{b}b×{c}" for b, c in sorted(bits.items()))
    return VizNode(
        id=node_id, label=prefix, kind=module_types.get(prefix, "module"), path=tuple(prefix.split(".")),
        bits=common, sublabel=f"{len(members)} nodes" + (f" · {badge}" if badge else ""),
        head=any(m.head for m in members), sqnr_db=worst.sqnr_db if worst else None, status=status,
        details=tuple(details), members=tuple(m.id for m in members),
    )


def auto_depth(graph: VizGraph) -> int | None:
    """The shallowest depth that still shows ``AUTO_MIN_BOXES`` nodes; None (everything) for small graphs."""
    if len(graph.nodes) <= AUTO_MIN_NODES:
        return None
    longest = max(len(n.path) for n in graph.nodes)
    for depth in range(1, longest):
        if len(collapse(graph, depth).nodes) >= AUTO_MIN_BOXES:
            return depth
    return None
