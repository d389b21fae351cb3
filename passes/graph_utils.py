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


def value_users(node: fx.Node) -> list[fx.Node]:
    """Users that depend on the values of ``node`` (a rewrite that keeps its shape may ignore the rest)."""
    return [u for u in node.users if not reads_metadata_only(u)]


def mark(node: fx.Node, pass_name: str) -> None:
    node.meta[ORIGIN] = pass_name
