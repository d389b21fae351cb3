"""The public calls: a graph (any stage) to an HTML page, SVG or DOT; two stages to a diff page.

Each takes an ``fx.GraphModule`` or anything holding one as ``.graph_module`` (``Captured``,
``QuantizedModel``, ``LoweredModel``), or a ``VizGraph`` already described; a ``QuantizedModel``'s
own report is used unless another is given. ``collapse_depth``: None draws every node, an integer
collapses by module prefix at that depth (2 for ``model.2``-style YOLO names), "auto" picks a
depth for graphs over 40 nodes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.fx as fx

from yoloq.tools.viz.collapse import auto_depth, collapse
from yoloq.tools.viz.describe import describe
from yoloq.tools.viz.diff import GraphDiff, diff_view
from yoloq.tools.viz.dot import render_dot
from yoloq.tools.viz.html import page
from yoloq.tools.viz.layout import layout
from yoloq.tools.viz.svg import render_svg
from yoloq.tools.viz.view import VizGraph


def graph_module_of(model) -> fx.GraphModule:
    gm = model if isinstance(model, fx.GraphModule) else getattr(model, "graph_module", None)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"expected a torch.fx.GraphModule or an object with .graph_module (Captured, "
                        f"QuantizedModel, LoweredModel), got {type(model).__name__}")
    return gm


def view(model, report=None, oscillation=None, title: str = "") -> VizGraph:
    """The drawable graph of ``model``, every node expanded (a ``VizGraph`` is returned as it is)."""
    if isinstance(model, VizGraph):
        return model
    report = report if report is not None else getattr(model, "report", None)
    return describe(graph_module_of(model), report, oscillation, title or default_title(model))


def default_title(model) -> str:
    """``QuantizedModel (w4a4)``, ``LoweredModel``, or the graph module's class."""
    if isinstance(model, fx.GraphModule):
        return type(model).__name__
    recipe = getattr(getattr(model, "recipe", None), "name", None)
    return type(model).__name__ + (f" ({recipe})" if recipe else "")


def resolve_depth(graph: VizGraph, collapse_depth: int | str | None) -> int | None:
    if collapse_depth == "auto":
        return auto_depth(graph)
    if collapse_depth is not None and not isinstance(collapse_depth, int):
        raise ValueError(f"collapse_depth must be None, a positive integer or 'auto', got {collapse_depth!r}")
    return collapse_depth


def write(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def to_svg(model, report=None, oscillation=None, collapse_depth: int | str | None = None,
           engine: str = "auto", title: str = "") -> str:
    """A standalone SVG document (tooltips as ``<title>``; boxes do not expand: use the HTML page)."""
    graph = view(model, report, oscillation, title)
    shown = collapse(graph, resolve_depth(graph, collapse_depth))
    return render_svg(shown, layout(shown, engine))


def to_dot(model, report=None, oscillation=None, collapse_depth: int | str | None = None, title: str = "") -> str:
    graph = view(model, report, oscillation, title)
    return render_dot(collapse(graph, resolve_depth(graph, collapse_depth)))


def render_html(model, path: str | os.PathLike, report=None, oscillation=None,
                collapse_depth: int | str | None = None, engine: str = "auto", title: str = "") -> Path:
    """Write the interactive page to ``path``; returns the path."""
    graph = view(model, report, oscillation, title)
    return write(path, page(graph, resolve_depth(graph, collapse_depth), engine))


def render_diff(model_a, model_b, path: str | os.PathLike, report=None, oscillation=None,
                collapse_depth: int | str | None = None, engine: str = "auto",
                titles: tuple[str, str] = ("before", "after")) -> GraphDiff:
    """Write a page of ``model_b`` over ``model_a`` (added green, removed red, changed amber) and
    return the lists. ``report``/``oscillation`` describe ``model_b``."""
    report = report if report is not None else getattr(model_b, "report", None)
    graph, found = diff_view(graph_module_of(model_a), graph_module_of(model_b), report, oscillation, titles)
    write(path, page(graph, resolve_depth(graph, collapse_depth), engine, summary=found.summary()))
    return found
