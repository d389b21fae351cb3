"""Small helpers shared by the passes: module lookup and replacement, provenance marks."""
from __future__ import annotations

from collections import Counter

import torch.fx as fx
from torch import nn

ORIGIN = "yoloq.origin"  # node.meta key: the pass that created or last rewrote the node


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def call_counts(gm: fx.GraphModule) -> Counter:
    """How many call_module nodes use each module target (a module called twice is shared)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def resolve_attr(root: nn.Module, target: str):
    """The module, parameter or buffer a dotted ``get_attr`` / ``call_module`` target names."""
    obj = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def set_module(gm: fx.GraphModule, qualname: str, module: nn.Module) -> None:
    parent_name, _, leaf = qualname.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, leaf, module)


def drop_unused_module(gm: fx.GraphModule, qualname: str) -> None:
    if qualname not in {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}:
        gm.delete_submodule(qualname)


_METADATA_ATTRS = ("shape", "dtype", "device", "ndim")
_METADATA_METHODS = ("size", "dim")


def reads_metadata_only(node: fx.Node) -> bool:
    """A node that looks at its input's shape/dtype/device but never at its values."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


# call_method -> the position of an argument read only for its dtype (not its values)
DTYPE_ONLY = {"type_as": 1}


def value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values (not only their dtype) reach ``node``'s value."""
    skip = DTYPE_ONLY.get(node.target) if node.op == "call_method" else None
    if skip is None or skip >= len(node.args):
        return node.all_input_nodes
    return [a for a in node.all_input_nodes if a is not node.args[skip]]


def image_dependent(nodes) -> set[fx.Node]:
    """Nodes whose values depend on the input's values. Shape and dtype reads cut the dependence,
    so the anchor grids a YOLOv8 / YOLO11 head builds from ``arange(...).type_as(feature)`` and
    feature-map sizes (float constants for an input size, handed to the decoder) are not in it."""
    depends: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or (not reads_metadata_only(n) and any(a in depends for a in value_inputs(n))):
            depends.add(n)
    return depends


def value_users(node: fx.Node) -> list[fx.Node]:
    """Users that depend on the values of ``node`` (a rewrite that keeps its shape may ignore the rest)."""
    return [u for u in node.users if not reads_metadata_only(u)]


def mark(node: fx.Node, pass_name: str) -> None:
    node.meta[ORIGIN] = pass_name
