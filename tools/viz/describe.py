"""A GraphModule at any pipeline stage as a ``VizGraph``: one ``VizNode`` per fx node.

Every stage is read from what the pipeline leaves on the graph, never from which stage it is:

    node.meta["yoloq.example"]   shape and dtype (capture's TensorSummary; ShapeProp's tensor_meta too)
    node.meta["yoloq.module"]    the module whose code made the node: where it sits for collapsing
    node.meta["yoloq.origin"]    the pass that created or last rewrote it
    node.meta["yoloq.quant"]     its QuantAnnotation: scale-sharing group, recipe roles, specs
    gm.meta["yoloq.head_outputs"] the raw head tensors (the float decoder runs after them)

The integer graph keeps none of the quantization metadata, so its facts come from its modules (see
``quant_info``), and its module names lost their dots (``model_2_cv1_conv``): for collapsing, the
underscores are read back as dots, and its views and cats are placed by the modules around them.
"""
from __future__ import annotations

from collections import Counter

import torch.fx as fx

from yoloq.passes.concrete_tracer import GuardCheck, TensorSummary
from yoloq.passes.graph_utils import ORIGIN
from yoloq.passes.integer_ops import IntConv2d, QuantizeInput
from yoloq.passes.lower_to_integer import BOUNDARY, CODES_OF
from yoloq.passes.plan_quantization import QUANT, QuantAnnotation
from yoloq.tools.viz.quant_info import QuantFacts, Sources, fake_quant_facts, integer_facts
from yoloq.tools.viz.view import VizGraph, VizNode

MODULE = "yoloq.module"
EXAMPLE = "yoloq.example"


def describe(gm: fx.GraphModule, report=None, oscillation=None, title: str = "") -> VizGraph:
    """``report``: a ``QuantReport`` (SQNR per quantizer); ``oscillation``: an ``OscillationTracker``."""
    src = Sources.of(report, oscillation)
    nodes = list(gm.graph.nodes)
    integer = is_integer_graph(gm)
    shared = _shared_groups(nodes)
    heads = head_names(gm)
    paths = module_paths(gm, nodes, integer)
    bits: dict[str, int | None] = {}
    out = []
    for node in nodes:
        if integer:
            flowing = next((bits[a.name] for a in node.all_input_nodes if bits.get(a.name) is not None), None)
            facts = integer_facts(gm, node, src, flowing)
        else:
            facts = fake_quant_facts(gm, node, src)
        bits[node.name] = facts.bits
        out.append(_viz_node(gm, node, facts, shared, node.name in heads, paths[node.name]))
    edges = dict.fromkeys((a.name, n.name, "") for n in nodes for a in n.all_input_nodes)
    return VizGraph(title or type(gm).__name__, tuple(out), tuple(edges), module_types=_module_types(nodes))


def _module_types(nodes: list[fx.Node]) -> dict[str, str]:
    """Qualified name -> class, from capture's ``yoloq.module`` marks ("model.2 (C3)"): what a
    collapsed box is called."""
    types = {}
    for node in nodes:
        owner = node.meta.get(MODULE)
        if isinstance(owner, str) and owner.endswith(")") and " (" in owner:
            name, _, cls = owner[:-1].rpartition(" (")
            types.setdefault(name, cls)
    return types


def is_integer_graph(gm: fx.GraphModule) -> bool:
    return any(isinstance(m, (IntConv2d, QuantizeInput)) for m in gm.modules())


def head_names(gm: fx.GraphModule) -> set[str]:
    """The captured head outputs, and what the output node returns (their quantizers, or the integer
    graph's dequantizers): both sides of the boundary to the decoder. A graph that capture did not
    split at a head (no ``yoloq.head_outputs``, no integer boundary) has none."""
    names = set(gm.meta.get("yoloq.head_outputs", ()))
    if names or any(BOUNDARY in n.meta for n in gm.graph.nodes):
        for node in gm.graph.nodes:
            if node.op == "output":
                names |= {a.name for a in node.all_input_nodes if a.op != "placeholder"}
    return names


def _shared_groups(nodes: list[fx.Node]) -> dict[int, int]:
    """Scale-sharing groups that more than one tensor-making node belongs to: group -> size.
    (A layer and the quantizer right after it always share; that is not worth an outline.)"""
    sizes = Counter(a.group for n in nodes if isinstance(a := n.meta.get(QUANT), QuantAnnotation)
                    and a.group is not None and a.kind not in ("quantizer", "none"))
    return {group: size for group, size in sizes.items() if size > 1}


def kind_of(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return {"placeholder": "input", "get_attr": "attribute"}.get(node.op, node.op)


def shape_of(node: fx.Node) -> str:
    example = node.meta.get(EXAMPLE)
    if isinstance(example, TensorSummary):
        return str(example)
    if isinstance(example, (tuple, list)) and example and all(isinstance(e, TensorSummary) for e in example):
        return "(" + ", ".join(map(str, example)) + ")"
    meta = node.meta.get("tensor_meta")
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return str(TensorSummary(tuple(meta.shape), meta.dtype))
    return ""


def _compact_shape(shape: str) -> str:
    """``float32[1, 16, 32, 32]`` -> ``16×32×32`` (the batch size says nothing about the layer)."""
    if "[" not in shape or shape.startswith("("):
        return ""
    dims = shape[shape.index("[") + 1:-1].split(", ")
    return "×".join(dims[1:] if len(dims) > 1 else dims)


def _owner(node: fx.Node) -> str:
    """Qualified name of the module whose code made the node; "" for the root."""
    owner = node.meta.get(MODULE)
    if not isinstance(owner, str) or owner.endswith("(root)"):
        return ""
    return owner.split(" (")[0]


def _own_path(gm: fx.GraphModule, node: fx.Node, integer: bool) -> tuple[str, ...] | None:
    """Where the node sits in the module tree, when its own marks say: a module call at its own
    name, anything else (a cat, a chunk, a quantizer, a guard) as a child of the module whose code
    made it. None when nothing says (see ``module_paths``)."""
    if node.op in ("placeholder", "output"):
        return (node.name,)
    owner = _owner(node)
    if MODULE in node.meta:
        if node.op == "call_module" and owner == str(node.target):
            return tuple(owner.split("."))
        return (tuple(owner.split(".")) if owner else ()) + (node.name,)
    if node.op != "call_module" or isinstance(gm.get_submodule(node.target), GuardCheck):
        return None
    target = str(node.target)
    if BOUNDARY in node.meta:
        return (target,)
    return tuple(target.split("_" if integer and "." not in target else "."))


def module_paths(gm: fx.GraphModule, nodes: list[fx.Node], integer: bool) -> dict[str, tuple[str, ...]]:
    """Every node's module path. A node without marks (the integer graph's views and cats, a plain
    fx trace's functions) goes into the deepest module that all the module calls around it share,
    looking through other unmarked nodes to the nearest module calls, inputs and users alike."""
    paths = {n.name: p for n in nodes if (p := _own_path(gm, n, integer)) is not None}
    calls = {n.name for n in nodes if n.op == "call_module" and n.name in paths}
    for node in nodes:
        if node.name in paths:
            continue
        owners, seen, frontier = [], {node.name}, [*node.all_input_nodes, *node.users]
        while frontier:
            near = frontier.pop()
            if near.name in seen or near.op in ("placeholder", "output"):
                continue
            seen.add(near.name)
            if near.name in calls:
                owners.append(paths[near.name][:-1])
            elif _own_path(gm, near, integer) is None:
                frontier += [*near.all_input_nodes, *near.users]
        paths[node.name] = _common_prefix(owners) + (node.name,)
    return paths


def _common_prefix(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    prefix = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        prefix.append(parts[0])
    return tuple(prefix)


def _viz_node(gm, node: fx.Node, facts: QuantFacts, shared: dict[int, int], head: bool,
              path: tuple[str, ...]) -> VizNode:
    kind = kind_of(gm, node)
    shape = shape_of(node)
    details = [("node", node.name)]
    if node.op == "call_module":
        details.append(("qualified name", str(node.target)))
        codes_of = str(node.meta.get(CODES_OF, ""))
        if ":" in codes_of:
            details.append(("lowered from", codes_of.partition(":")[0]))
    elif _owner(node):
        details.append(("in module", node.meta[MODULE]))
    details += [("op", f"{node.op} · {kind}"), ("shape", shape or "—")]
    details += list(facts.roles)
    annotation = node.meta.get(QUANT)
    group = annotation.group if isinstance(annotation, QuantAnnotation) and annotation.group in shared else None
    if group is not None:
        details.append(("scale group", f"g{group}: one scale shared by {shared[group]} tensors"))
    if isinstance(annotation, QuantAnnotation) and annotation.roles:
        details.append(("recipe roles", ", ".join(sorted(annotation.roles))))
    if head:
        details.append(("head output", "yes: the float decoder (outside this graph) reads it"))
    details.append(("created by", str(node.meta.get(ORIGIN, "—"))))
    label = str(node.target) if node.op == "call_module" else node.name
    return VizNode(
        id=node.name, label=label, kind=kind, path=path, bits=facts.bits,
        sublabel=" · ".join(s for s in (facts.badge, _compact_shape(shape)) if s), group=group, head=head,
        sqnr_db=facts.sqnr_db, details=tuple(details),
    )
