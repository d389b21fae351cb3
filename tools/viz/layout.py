"""Top-to-bottom layout of a ``VizGraph``: Graphviz ``dot`` when installed, else a layered layout.

The layered layout is the classic Sugiyama scheme, small enough to read:

1. layers — longest path from the inputs (``networkx.topological_generations``): a node sits one
   layer below its lowest input;
2. long edges — an edge spanning k layers gets k − 1 dummy nodes, so it is routed between nodes
   rather than through them;
3. order — barycenter sweeps, down then up: a node moves to the mean position of its neighbours in
   the layer before; the order with the fewest crossings seen is kept;
4. x — each node is pulled to the mean x of its neighbours, then overlaps are removed with the
   order kept (an isotonic regression, pool-adjacent-violators), alternating down and up.

Edges are cubic curves with vertical tangents through their dummies. Node order in the input is
the fx order, which is topological; an edge that points backwards (possible once boxes merge
nodes) is laid out reversed and drawn the right way round.
"""
from __future__ import annotations

import dataclasses
import shutil
from collections import defaultdict

import networkx as nx

from yoloq.tools.viz.view import VizGraph, VizNode

LABEL_CHAR = 7.3  # px per character of the 12 px monospace label
TEXT_CHAR = 6.7  # px per character of the 11 px lines
RANK_GAP, NODE_GAP, MARGIN = 34.0, 16.0, 20.0
SWEEPS = 12


@dataclasses.dataclass(frozen=True)
class Layout:
    boxes: dict[str, tuple[float, float, float, float]]  # id -> centre x, centre y, width, height
    edges: dict[tuple[str, str], str]  # (source, target) -> SVG path data
    width: float
    height: float
    engine: str


def node_size(node: VizNode) -> tuple[float, float]:
    width = max(len(node.label) * LABEL_CHAR, max(len(node.kind), len(node.sublabel)) * TEXT_CHAR) + 18
    return max(width, 56.0), 50.0 if node.sublabel else 36.0


def layout(graph: VizGraph, engine: str = "auto") -> Layout:
    """``engine``: "dot" (Graphviz, must be installed), "layered" (pure Python) or "auto"."""
    if engine not in ("auto", "dot", "layered"):
        raise ValueError(f"layout engine {engine!r} is not one of 'auto', 'dot', 'layered'")
    if engine == "dot" or (engine == "auto" and shutil.which("dot")):
        from yoloq.tools.viz.dot_layout import dot_layout

        return dot_layout(graph, {n.id: node_size(n) for n in graph.nodes})
    return layered_layout(graph)


def forward_edges(graph: VizGraph) -> list[tuple[str, str, bool]]:
    """(upper, lower, reversed) per distinct edge, upper before lower in node order."""
    index = {n.id: i for i, n in enumerate(graph.nodes)}
    seen, out = set(), []
    for a, b, _ in graph.edges:
        up, down = (a, b) if index[a] < index[b] else (b, a)
        if a != b and (up, down) not in seen:
            seen.add((up, down))
            out.append((up, down, up != a))
    return out


def layered_layout(graph: VizGraph) -> Layout:
    sizes = {n.id: node_size(n) for n in graph.nodes}
    edges = forward_edges(graph)
    dag = nx.DiGraph()
    dag.add_nodes_from(sizes)
    dag.add_edges_from((a, b) for a, b, _ in edges)
    layer = {v: i for i, generation in enumerate(nx.topological_generations(dag)) for v in generation}
    layers: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for node in graph.nodes:
        layers[layer[node.id]].append(node.id)
    up, down, chains = defaultdict(list), defaultdict(list), {}
    for a, b, _ in edges:
        chain = [a] + [f"\0{a}\0{b}\0{k}" for k in range(layer[a] + 1, layer[b])] + [b]
        for k, dummy in enumerate(chain[1:-1], start=layer[a] + 1):
            layers[k].append(dummy)
            sizes[dummy] = (8.0, 0.0)
        for p, q in zip(chain, chain[1:]):
            down[p].append(q)
            up[q].append(p)
        chains[(a, b)] = chain
    layers = _order(layers, up, down)
    x = _x_positions(layers, sizes, up, down)
    y, top = {}, MARGIN
    for row in layers:
        height = max((sizes[v][1] for v in row), default=0.0) or 12.0
        for v in row:
            y[v] = top + height / 2
        top += height + RANK_GAP
    shift = MARGIN - min((x[v] - sizes[v][0] / 2 for v in x), default=0.0)
    boxes = {n.id: (x[n.id] + shift, y[n.id], *sizes[n.id]) for n in graph.nodes}
    paths = {}
    for a, b, flipped in edges:
        points = [(x[v] + shift, y[v]) for v in chains[(a, b)]]
        points[0] = (points[0][0], points[0][1] + sizes[a][1] / 2)
        points[-1] = (points[-1][0], points[-1][1] - sizes[b][1] / 2)
        paths[(b, a) if flipped else (a, b)] = curve(points[::-1] if flipped else points)
    width = max((bx + w / 2 for bx, _, w, _ in boxes.values()), default=0.0) + MARGIN
    return Layout(boxes, paths, width, top - RANK_GAP + MARGIN, "layered")


def curve(points: list[tuple[float, float]]) -> str:
    d = f"M{points[0][0]:.1f},{points[0][1]:.1f}"
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        mid = (y0 + y1) / 2
        d += f" C{x0:.1f},{mid:.1f} {x1:.1f},{mid:.1f} {x1:.1f},{y1:.1f}"
    return d


def _crossings(layers, down) -> int:
    total = 0
    for upper, lower in zip(layers, layers[1:]):
        position = {v: i for i, v in enumerate(lower)}
        pairs = [(i, position[w]) for i, v in enumerate(upper) for w in down[v] if w in position]
        total += sum(1 for k, (a, b) in enumerate(pairs) for c, d in pairs[k + 1:] if (a - c) * (b - d) < 0)
    return total


def _order(layers, up, down):
    best, best_count = [list(r) for r in layers], _crossings(layers, down)
    current = [list(r) for r in layers]
    for sweep in range(SWEEPS):
        rows = range(1, len(current)) if sweep % 2 == 0 else range(len(current) - 2, -1, -1)
        neighbours, step = (up, -1) if sweep % 2 == 0 else (down, 1)
        for r in rows:
            position = {v: i for i, v in enumerate(current[r + step])}
            keyed = []
            for i, v in enumerate(current[r]):
                near = [position[w] for w in neighbours[v] if w in position]
                keyed.append((sum(near) / len(near) if near else i, i, v))
            current[r] = [v for _, _, v in sorted(keyed)]
        count = _crossings(current, down)
        if count < best_count:
            best, best_count = [list(r) for r in current], count
    return best


def _x_positions(layers, sizes, up, down) -> dict[str, float]:
    x = {}
    for row in layers:
        left = 0.0
        for v in row:
            x[v] = left + sizes[v][0] / 2
            left += sizes[v][0] + NODE_GAP
    for sweep in range(8):
        neighbours, rows = (up, layers) if sweep % 2 == 0 else (down, layers[::-1])
        for row in rows:
            wanted = [sum(x[w] for w in neighbours[v]) / len(neighbours[v]) if neighbours[v] else x[v] for v in row]
            for v, value in zip(row, _no_overlap(row, wanted, sizes)):
                x[v] = value
    return x


def _no_overlap(row, wanted, sizes) -> list[float]:
    """Closest positions to ``wanted`` (least squares) that keep ``row``'s order and gaps: with
    offsets o_i = Σ (half widths + gap) up to i, y_i = x_i − o_i must not decrease (PAV)."""
    offsets, total = [], 0.0
    for i, v in enumerate(row):
        if i:
            total += (sizes[row[i - 1]][0] + sizes[v][0]) / 2 + NODE_GAP
        offsets.append(total)
    blocks: list[list[float]] = []  # [mean, count]
    for target, offset in zip(wanted, offsets):
        blocks.append([target - offset, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * count) / (blocks[-1][1] + count),
                          blocks[-1][1] + count]
    values = [mean for mean, count in blocks for _ in range(int(count))]
    return [v + o for v, o in zip(values, offsets)]
