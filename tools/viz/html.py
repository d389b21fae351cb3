"""The self-contained HTML page: every view pre-drawn as SVG, details as JSON, no network.

A collapsed graph has one view per box: the graph with that box expanded, laid out on the Python
side like the first view and kept in an inert ``<template>`` until the box is clicked. Only the
view on screen is in the document, so ``g.node`` elements always count the nodes shown, and the
body's ``data-node-count`` says the same.
"""
from __future__ import annotations

import json
from html import escape

from yoloq.tools.viz.collapse import collapse
from yoloq.tools.viz.layout import Layout, layout
from yoloq.tools.viz.page_assets import CSS, JS
from yoloq.tools.viz.svg import render_svg
from yoloq.tools.viz.view import BOX_PREFIX, VizGraph


def views(graph: VizGraph, depth: int | None, engine: str) -> dict[str, tuple[VizGraph, Layout]]:
    """State key ("" first, then each box id) -> the graph shown and its layout."""
    first = collapse(graph, depth)
    shown = {"": first}
    shown.update({n.id: collapse(graph, depth, expand=n.id) for n in first.nodes if n.is_box})
    return {key: (g, layout(g, engine)) for key, g in shown.items()}


def _script_json(value) -> str:
    """JSON that cannot close the <script> element it sits in."""
    return json.dumps(value, ensure_ascii=False).replace("</", "<\\/")


def page(graph: VizGraph, depth: int | None, engine: str = "auto", summary: str = "") -> str:
    drawn = views(graph, depth, engine)
    first, first_layout = drawn[""]
    details, home = {}, {}
    for key, (shown, _) in drawn.items():
        for n in shown.nodes:
            details.setdefault(n.id, [list(row) for row in n.details])
            home.setdefault(n.id, key)
    data = {"details": details, "home": home, "states": [k for k in drawn if k], "boxPrefix": BOX_PREFIX}
    hint = "hover a node for a summary, click it for its details"
    if data["states"]:
        hint += ", click a ⊞ box to expand it (Esc collapses)"
    showing = f"{len(first.nodes)} shown, collapsed at depth {depth}" if depth is not None else "all shown"
    line = f"{len(graph.nodes)} nodes ({showing}) · layout by {first_layout.engine}"
    templates = "\n".join(f'<template data-state="{escape(key)}">{render_svg(g, at, standalone=False)}</template>'
                          for key, (g, at) in drawn.items() if key)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{escape(graph.title)}</title>
<style>{CSS}</style>
</head>
<body data-node-count="{len(first.nodes)}" data-graph-nodes="{len(graph.nodes)}" data-state="">
<header>
<h1>{escape(graph.title)}</h1>
<div class="summary">{escape(line)}{(" · " + escape(summary)) if summary else ""}</div>
<div><button id="collapse-button" type="button" hidden>◂ collapse <span></span></button>
<span class="hint">{hint}</span></div>
</header>
<main>
<div id="canvas">{render_svg(first, first_layout, standalone=False)}</div>
<aside id="details"><h2 id="details-title">Details</h2>
<table id="details-table"><tr><td>Click a node.</td></tr></table></aside>
</main>
{templates}
<script type="application/json" id="viz-data">{_script_json(data)}</script>
<script>{JS}</script>
</body>
</html>
"""
