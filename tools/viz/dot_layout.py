"""Layout by Graphviz ``dot`` (when the binary is installed): positions and splines, drawn by us.

``dot`` is only asked where things go: nodes are empty fixed-size boxes of the size our renderer
needs, and ``-Tplain`` hands back centres and edge B-spline control points (inches, y up), which
become the same ``Layout`` the pure-Python layered layout returns.
"""
from __future__ import annotations

import shlex
import subprocess

from yoloq.tools.viz.layout import MARGIN, Layout, forward_edges
from yoloq.tools.viz.view import VizGraph

POINTS = 72.0  # dot's inches -> px
TIMEOUT_S = 120


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_source(graph: VizGraph, sizes: dict[str, tuple[float, float]]) -> str:
    lines = ["digraph G {", "  rankdir=TB; nodesep=0.22; ranksep=0.42; splines=spline;",
             '  node [shape=box, fixedsize=true, label=""];']
    lines += [f"  {quote(n.id)} [width={sizes[n.id][0] / POINTS:.3f}, height={sizes[n.id][1] / POINTS:.3f}];"
              for n in graph.nodes]
    lines += [f"  {quote(a)} -> {quote(b)};" for a, b, _ in forward_edges(graph)]
    lines.append("}")
    return "\n".join(lines)


def dot_layout(graph: VizGraph, sizes: dict[str, tuple[float, float]]) -> Layout:
    try:
        done = subprocess.run(["dot", "-Tplain"], input=_dot_source(graph, sizes), capture_output=True,
                              text=True, timeout=TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise RuntimeError("layout engine 'dot' needs Graphviz: apt-get install graphviz "
                           "(or use engine='layered')") from None
    if done.returncode:
        raise RuntimeError(f"dot failed ({done.returncode}): {done.stderr.strip()[:500]}")
    boxes, splines, height = {}, {}, 0.0
    flipped = {(a, b): f for a, b, f in forward_edges(graph)}
    for line in done.stdout.splitlines():
        words = shlex.split(line)
        if words[:1] == ["graph"]:
            height = float(words[3]) * POINTS
        elif words[:1] == ["node"]:
            boxes[words[1]] = (float(words[2]) * POINTS, height - float(words[3]) * POINTS, *sizes[words[1]])
        elif words[:1] == ["edge"]:
            count = int(words[3])
            points = [(float(words[4 + 2 * k]) * POINTS, height - float(words[5 + 2 * k]) * POINTS)
                      for k in range(count)]
            key = (words[1], words[2])
            if flipped.get(key):
                key, points = (key[1], key[0]), points[::-1]
            splines[key] = points
    boxes = {k: (x + MARGIN, y + MARGIN, w, h) for k, (x, y, w, h) in boxes.items()}
    splines = {k: _path(points) for k, points in splines.items()}
    width = max((x + w / 2 for x, _, w, _ in boxes.values()), default=0.0) + MARGIN
    return Layout(boxes, splines, width, height + 2 * MARGIN, "dot")


def _path(points: list[tuple[float, float]]) -> str:
    """SVG path data of dot's 3k + 1 B-spline control points (a start point, k cubic segments)."""
    moved = [(x + MARGIN, y + MARGIN) for x, y in points]
    d = f"M{moved[0][0]:.1f},{moved[0][1]:.1f}"
    for k in range(1, len(moved) - 2, 3):
        (x1, y1), (x2, y2), (x3, y3) = moved[k:k + 3]
        d += f" C{x1:.1f},{y1:.1f} {x2:.1f},{y2:.1f} {x3:.1f},{y3:.1f}"
    return d
