"""What a pass did: the nodes one pipeline stage added, removed and changed, drawn on one page.

Nodes are matched by name and target (fx names are unique per graph, and a pass that rewrites a
node in place keeps both): in ``b`` only is *added*, in ``a`` only *removed*; in both but with
another module class or another creating pass (``yoloq.origin``) is *changed*. Edges likewise.

    captured -> folded       removed: every BatchNorm node; changed: the convs they folded into
    fused -> quantized       added: the activation quantizers; changed: layers now QuantizedLayer

The merged drawing keeps ``b``'s order and puts each removed node right after the node that came
before it in ``a``, so it lands where it used to be.
"""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from yoloq.passes.graph_utils import ORIGIN
from yoloq.tools.viz.describe import describe, kind_of
from yoloq.tools.viz.view import VizGraph, VizNode


@dataclasses.dataclass(frozen=True)
class GraphDiff:
    added: tuple[str, ...]  # node names of b that a lacks
    removed: tuple[str, ...]  # node names of a that b lacks
    changed: tuple[str, ...]  # in both, another module class or creating pass
    kept: tuple[str, ...]

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.removed)} removed, {len(self.changed)} changed, "
                f"{len(self.kept)} kept")


def _key(node: fx.Node) -> tuple[str, str]:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return node.name, f"{node.op}:{target}"


def _change(gm_a, a: fx.Node, gm_b, b: fx.Node) -> str:
    """"" when the node is the same, else what differs."""
    what = []
    if (ka := kind_of(gm_a, a)) != (kb := kind_of(gm_b, b)):
        what.append(f"{ka} → {kb}")
    if (oa := a.meta.get(ORIGIN)) != (ob := b.meta.get(ORIGIN)):
        what.append(f"created by {oa} → {ob}")
    return "; ".join(what)


def diff_graphs(gm_a: fx.GraphModule, gm_b: fx.GraphModule) -> GraphDiff:
    nodes_a = {_key(n): n for n in gm_a.graph.nodes}
    nodes_b = {_key(n): n for n in gm_b.graph.nodes}
    changed = [k for k in nodes_b if k in nodes_a and _change(gm_a, nodes_a[k], gm_b, nodes_b[k])]
    return GraphDiff(
        added=tuple(k[0] for k in nodes_b if k not in nodes_a),
        removed=tuple(k[0] for k in nodes_a if k not in nodes_b),
        changed=tuple(k[0] for k in changed),
        kept=tuple(k[0] for k in nodes_b if k in nodes_a and k not in set(changed)),
    )


def diff_view(gm_a: fx.GraphModule, gm_b: fx.GraphModule, report=None, oscillation=None,
              titles: tuple[str, str] = ("before", "after")) -> tuple[VizGraph, GraphDiff]:
    """The merged graph (statuses on nodes and edges) and the lists. ``report`` and ``oscillation``
    describe ``b``, the later stage."""
    view_a, view_b = describe(gm_a), describe(gm_b, report, oscillation)
    fx_a = {_key(n): n for n in gm_a.graph.nodes}
    fx_b = {_key(n): n for n in gm_b.graph.nodes}
    key_a = {n.name: k for k, n in fx_a.items()}
    key_b = {n.name: k for k, n in fx_b.items()}
    # merged ids: b's names, and a's names for removed nodes (renamed if b reuses the name)
    ident = {k: name for name, k in key_b.items()}
    ident.update({k: name if name not in key_b else f"{name} (before)"
                  for name, k in key_a.items() if k not in fx_b})

    removed_after: dict[tuple[str, str] | None, list[VizNode]] = {}
    anchor = None
    for n in view_a.nodes:
        if key_a[n.id] in fx_b:
            anchor = key_a[n.id]
        else:
            removed = dataclasses.replace(n, id=ident[key_a[n.id]], status="removed", group=None)
            removed_after.setdefault(anchor, []).append(removed)
    merged = list(removed_after.get(None, []))
    for n in view_b.nodes:
        key = key_b[n.id]
        if key not in fx_a:
            merged.append(dataclasses.replace(n, status="added"))
        elif what := _change(gm_a, fx_a[key], gm_b, fx_b[key]):
            merged.append(dataclasses.replace(n, status="changed", details=n.details + (("diff", what),)))
        else:
            merged.append(n)
        merged += removed_after.get(key, [])

    edges_a = [(ident[key_a[a]], ident[key_a[b]]) for a, b, _ in view_a.edges]
    edges_b = [(ident[key_b[a]], ident[key_b[b]]) for a, b, _ in view_b.edges]
    in_a, in_b = set(edges_a), set(edges_b)
    edges = [(a, b, "" if (a, b) in in_a else "added") for a, b in edges_b]
    edges += [(a, b, "removed") for a, b in edges_a if (a, b) not in in_b]
    types = {**view_a.module_types, **view_b.module_types}
    graph = VizGraph(f"{titles[0]} → {titles[1]}", tuple(merged), tuple(dict.fromkeys(edges)), module_types=types,
                     diff=True)
    return graph, diff_graphs(gm_a, gm_b)
