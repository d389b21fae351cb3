"""DOT text of a ``VizGraph``, for Graphviz and the tools that read it (``dot -Tpdf graph.dot``).

Colours and marks follow the SVG: fill by bit width (or diff status), a dashed coloured border for
a shared scale, a double red border for a head output; the float decoder, which lives outside the
graph module, is one dashed note after the output node, so the boundary shows in any DOT viewer.
The legend is a cluster of sample nodes.
"""
from __future__ import annotations

from yoloq.tools.viz.colors import HEAD, STATUS, STATUS_FILL, bits_color, group_color
from yoloq.tools.viz.svg import legend_entries
from yoloq.tools.viz.view import VizGraph, VizNode

DECODER = "decoder (float, outside the graph)"


def dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attributes(node: VizNode, diff: bool) -> str:
    lines = [node.label, ("⊞ " if node.is_box else "") + node.kind] + ([node.sublabel] if node.sublabel else [])
    style, color, width = ["rounded", "filled"], "#555555", 1.0
    if diff and node.status:
        color, width = STATUS[node.status], 2.5
    elif node.group is not None:
        color, width = group_color(node.group), 2.5
        style.append("dashed")
    attrs = {"label": "\n".join(lines), "tooltip": node.tooltip(), "style": ",".join(style),
             "fillcolor": STATUS_FILL[node.status] if diff else bits_color(node.bits), "color": color,
             "penwidth": f"{width}"}
    if node.head:
        attrs.update(peripheries="2", color=HEAD)
    return ", ".join(f"{k}={dot_string(v)}" for k, v in attrs.items())


def render_dot(graph: VizGraph) -> str:
    out = [f"digraph {dot_string(graph.title)} {{",
           f'  graph [rankdir=TB, label={dot_string(graph.title)}, labelloc=t, fontname="DejaVu Sans Mono"];',
           '  node [shape=box, fontname="DejaVu Sans Mono", fontsize=10];',
           '  edge [color="#8a8a8a", arrowsize=0.7];']
    out += [f"  {dot_string(n.id)} [{_attributes(n, graph.diff)}];" for n in graph.nodes]
    for a, b, status in graph.edges:
        extra = f' [color="{STATUS[status]}", penwidth=2{", style=dashed" if status == "removed" else ""}]' \
            if status else ""
        out.append(f"  {dot_string(a)} -> {dot_string(b)}{extra};")
    outputs = [n.id for n in graph.nodes if n.kind == "output" and not n.is_box]
    if outputs and any(n.head for n in graph.nodes):
        out.append(f'  {dot_string(DECODER)} [shape=note, style=dashed, color="{HEAD}", fontcolor="{HEAD}"];')
        out += [f'  {dot_string(o)} -> {dot_string(DECODER)} [style=dashed, color="{HEAD}"];' for o in outputs]
    out.append('  subgraph cluster_legend { label="legend"; fontname="DejaVu Sans Mono"; fontsize=10;')
    for i, (fill, stroke, text) in enumerate(legend_entries(graph)):
        out.append(f'    "legend {i}" [label={dot_string(text)}, style="rounded,filled", fillcolor="{fill}", '
                   f'color="{stroke or "#555555"}"];')
    out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"
