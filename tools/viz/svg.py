"""SVG of a laid-out ``VizGraph``: the one renderer, for the .svg file and inside the HTML page.

Every node is a ``<g class="node">`` carrying its id (``data-id``), bit width and scale group, with
a ``<title>`` (the tooltip any SVG viewer shows on hover). Fill is the bit width (or, in a diff,
what happened to the node); a dashed coloured outline marks a scale-sharing group, a red frame a
head output, and a dashed line across the page the head boundary: the float decoder runs on what
crosses it. A collapsed box is drawn as a stack.
"""
from __future__ import annotations

from html import escape

from yoloq.tools.viz.colors import FLOAT, HEAD, STATUS, STATUS_FILL, bits_color, group_color
from yoloq.tools.viz.layout import Layout
from yoloq.tools.viz.view import BOX_PREFIX, VizGraph, VizNode

TITLE_H, LEGEND_H = 26.0, 30.0
STYLE = """
.yoloq-graph text { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; fill: #222; }
.yoloq-graph .label { font-size: 12px; font-weight: bold; }
.yoloq-graph .kind, .yoloq-graph .sub, .yoloq-graph .legend text { font-size: 11px; }
.yoloq-graph .kind { fill: #555; }
.yoloq-graph .title { font-size: 15px; font-weight: bold; }
.yoloq-graph .edge { fill: none; stroke: #8a8a8a; stroke-width: 1.2; }
.yoloq-graph .edge.added { stroke: #1a9850; stroke-width: 2; }
.yoloq-graph .edge.removed { stroke: #d73027; stroke-width: 2; stroke-dasharray: 5 3; }
.yoloq-graph .node.removed .label { text-decoration: line-through; }
.yoloq-graph .boundary { stroke: #b2182b; stroke-width: 1.5; stroke-dasharray: 8 4; }
.yoloq-graph .boundary-text { font-size: 11px; fill: #b2182b; }
"""


def render_svg(graph: VizGraph, layout: Layout, standalone: bool = True) -> str:
    """``standalone``: a file of its own (with the SVG namespace); inside HTML the namespace is implied."""
    top = TITLE_H + LEGEND_H
    entries = legend_entries(graph)
    width, height = max(layout.width, _legend_width(entries) + 40.0), layout.height + top
    namespace = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    parts = [f'<svg{namespace} class="yoloq-graph" width="{width:.0f}" '
             f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" data-node-count="{len(graph.nodes)}" '
             f'data-engine="{layout.engine}">',
             f"<style>{STYLE}</style>",
             '<defs><marker id="arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" '
             'markerUnits="userSpaceOnUse" orient="auto-start-reverse">'
             '<path d="M0,0 L8,4 L0,8 z" fill="#8a8a8a"/></marker></defs>',
             f'<text class="title" x="20" y="18">{escape(graph.title)}</text>',
             _legend(entries),
             f'<g class="graph" transform="translate(0,{top:.0f})">',
             _halos(graph, layout),
             '<g class="edge-layer">']
    statuses = {(a, b): status for a, b, status in graph.edges}
    for (a, b), d in layout.edges.items():
        status = statuses.get((a, b), "")
        parts.append(f'<path class="edge {status}" d="{d}" data-from="{escape(a)}" data-to="{escape(b)}" '
                     'marker-end="url(#arrow)"/>')
    parts.append("</g>")
    parts.append(_boundary(graph, layout))
    parts.append('<g class="node-layer">')
    parts += [_node(n, layout.boxes[n.id], graph.diff, _opened(graph, n)) for n in graph.nodes]
    parts.append("</g></g></svg>")
    return "\n".join(parts)


def _opened(graph: VizGraph, node: VizNode) -> bool:
    """A member of the box this view shows expanded."""
    prefix = tuple(graph.expanded[len(BOX_PREFIX):].split(".")) if graph.expanded else None
    return prefix is not None and node.path[:len(prefix)] == prefix


def _halos(graph: VizGraph, layout: Layout) -> str:
    """A light band behind the expanded box's members, under the edges so arrow tips stay visible."""
    rects = [f'<rect x="{x - w / 2 - 7:.1f}" y="{y - h / 2 - 7:.1f}" width="{w + 14:.1f}" height="{h + 14:.1f}" '
             f'rx="10"/>' for n in graph.nodes if _opened(graph, n) for x, y, w, h in [layout.boxes[n.id]]]
    return f'<g class="halos" fill="#dbe9f8">{"".join(rects)}</g>' if rects else ""


def _node(node: VizNode, box, diff: bool, opened: bool) -> str:
    x, y, w, h = box
    classes = ["node"] + [c for c, on in (("box", node.is_box), ("head", node.head), ("opened", opened)) if on] \
        + ([node.status] if node.status else [])
    fill = STATUS_FILL[node.status] if diff else bits_color(node.bits)
    stroke, dash, stroke_w = "#555", "", 1.0
    if diff and node.status:
        stroke, stroke_w = STATUS[node.status], 2.5
    elif node.group is not None:
        stroke, dash, stroke_w = group_color(node.group), ' stroke-dasharray="6 3"', 2.5
    group = f' data-group="{node.group}"' if node.group is not None else ""
    out = [f'<g class="{" ".join(classes)}" id="node-{escape(node.id)}" data-id="{escape(node.id)}" '
           f'data-bits="{node.bits if node.bits is not None else "float"}"{group} '
           f'transform="translate({x - w / 2:.1f},{y - h / 2:.1f})">',
           f"<title>{escape(node.tooltip())}</title>"]
    if node.head:
        out.append(f'<rect x="-4" y="-4" width="{w + 8:.1f}" height="{h + 8:.1f}" rx="8" fill="none" '
                   f'stroke="{HEAD}" stroke-width="2.5"/>')
    if node.is_box:
        out.append(f'<rect x="4" y="4" width="{w:.1f}" height="{h:.1f}" rx="6" fill="{fill}" stroke="#555"/>')
    out.append(f'<rect width="{w:.1f}" height="{h:.1f}" rx="6" fill="{fill}" stroke="{stroke}" '
               f'stroke-width="{stroke_w}"{dash}/>')
    lines = [("label", node.label), ("kind", ("⊞ " if node.is_box else "") + node.kind)]
    if node.sublabel:
        lines.append(("sub", node.sublabel))
    out += [f'<text class="{cls}" x="9" y="{15 + 14 * i}">{escape(text)}</text>' for i, (cls, text) in enumerate(lines)]
    out.append("</g>")
    return "".join(out)


def _boundary(graph: VizGraph, layout: Layout) -> str:
    """A dashed line below the lowest head output and above the output node."""
    heads = [layout.boxes[n.id] for n in graph.nodes if n.head]
    outputs = [layout.boxes[n.id] for n in graph.nodes if n.kind == "output" and not n.is_box]
    if not heads:
        return ""
    below = max(y + h / 2 for _, y, _, h in heads)
    above = min((y - h / 2 for _, y, _, h in outputs if y - h / 2 > below), default=below + 24)
    line_y = (below + above) / 2
    return (f'<g class="head-boundary"><line class="boundary" x1="0" x2="{layout.width:.0f}" y1="{line_y:.1f}" '
            f'y2="{line_y:.1f}"/><text class="boundary-text" x="8" y="{line_y - 4:.1f}">head boundary: '
            "the float decoder (outside this graph) runs on the head outputs</text></g>")


def legend_entries(graph: VizGraph) -> list[tuple[str, str, str]]:
    """(fill, stroke, text) per legend entry; a stroke of "" draws a plain swatch."""
    if graph.diff:
        return [(STATUS_FILL[s], STATUS.get(s, "#555555"), s or "kept") for s in ("added", "removed", "changed", "")]
    entries = [(bits_color(b), "", f"{b} bits" if b is not None else "float") for b in graph.bit_widths]
    if any(n.group is not None for n in graph.nodes):
        entries.append(("#ffffff", group_color(0), "shared scale (dashed, one colour per group)"))
    if any(n.head for n in graph.nodes):
        entries.append(("#ffffff", HEAD, "head output"))
    if any(n.is_box for n in graph.nodes):
        entries.append((FLOAT, "#555555", "⊞ collapsed module (click)"))
    return entries


def _legend_step(text: str) -> float:
    return 34 + len(text) * 6.7


def _legend_width(entries) -> float:
    return sum(_legend_step(text) for _, _, text in entries)


def _legend(entries) -> str:
    out, x = [f'<g class="legend" transform="translate(20,{TITLE_H + 6:.0f})">'], 0.0
    for fill, stroke, text in entries:
        border = f'stroke="{stroke}" stroke-width="2"' if stroke else 'stroke="#555" stroke-width="0.5"'
        out.append(f'<rect x="{x:.0f}" y="0" width="16" height="14" rx="3" fill="{fill}" {border}/>'
                   f'<text x="{x + 21:.0f}" y="11">{escape(text)}</text>')
        x += _legend_step(text)
    out.append("</g>")
    return "".join(out)
