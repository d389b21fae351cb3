"""Split a traced detector at its raw head outputs: network graph before, float decoder after.

    x -> backbone -> neck -> head convs -> [boundary] -> view/sigmoid/DFL/anchors/... -> outputs
    becomes
    network(x) -> (head_0, ..., head_k, aux...)      decoder(head_0, ..., aux...) -> outputs

The boundary is found as a graph property, with no knowledge of any YOLO version: a node is a
*layer* when it consumes a trainable parameter (a conv, a linear, an implicit-knowledge multiply);
the boundary is every layer from which no other layer can be reached, taken after its own
activation when one follows (a pointwise module that is its only user, e.g. Proto's last SiLU). Fixed decode-only layers
(DFL's arange convolution, ``requires_grad=False``) are therefore not layers, and land in the
decoder. The network graph also keeps the guards on its own values and the in-place updates of
its own tensors. Values the decoder needs besides the head tensors (feature maps it passes
through, the input when it reads its size) become extra *aux* outputs, listed separately.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from yoloq.passes.graph_utils import resolve_attr

# Modules whose parameters are decode constants even when the model has no trainable parameter
# at all (e.g. a checkpoint loaded with requires_grad disabled everywhere).
FIXED_DECODE_MODULES = ("DFL",)


@dataclasses.dataclass(frozen=True)
class Split:
    network: fx.GraphModule
    decoder: fx.GraphModule
    head_outputs: tuple[str, ...]
    aux_outputs: tuple[str, ...]


def trainable_parameters(root: nn.Module) -> set[int]:
    params = {id(p) for p in root.parameters() if p.requires_grad}
    if params:
        return params
    fixed = {
        id(p)
        for m in root.modules()
        if type(m).__name__ in FIXED_DECODE_MODULES
        for p in m.parameters()
    }
    return {id(p) for p in root.parameters()} - fixed


def _is_layer(node: fx.Node, root: nn.Module, trainable: set[int]) -> bool:
    if node.op == "call_module":
        return any(id(p) in trainable for p in root.get_submodule(node.target).parameters())
    if node.op in ("call_function", "call_method"):
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                value = resolve_attr(root, arg.target)
                if isinstance(value, nn.Parameter) and id(value) in trainable:
                    return True
    return False


def _closure(nodes: Iterable[fx.Node], step) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def _ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    return _closure(nodes, lambda n: n.all_input_nodes)


def _descendants(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    return _closure(nodes, lambda n: n.users)


def _is_mutation(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        return getattr(node.target, "__name__", "") == "setitem" or bool(schema and schema.is_mutable)
    return False


def find_boundary(gm: fx.GraphModule, root: nn.Module, boundary: Iterable[str] | None = None) -> list[fx.Node]:
    """The raw head nodes: named ones if ``boundary`` is given, else the last layers (see module doc)."""
    nodes = list(gm.graph.nodes)
    if boundary is not None:
        wanted = list(boundary)
        found = [n for n in nodes if n.op == "call_module" and n.target in wanted]
        missing = sorted(set(wanted) - {n.target for n in found})
        if missing:
            known = sorted({n.target for n in nodes if n.op == "call_module"})
            raise ValueError(f"boundary modules {missing} are not call_module nodes; known: {known[:20]}...")
        return found
    trainable = trainable_parameters(root)
    live = _ancestors([n for n in nodes if n.op == "output"])
    layer = {n for n in nodes if _is_layer(n, root, trainable)}
    reaches_layer: dict[fx.Node, bool] = {}
    for n in reversed(nodes):
        reaches_layer[n] = any(u in layer or reaches_layer.get(u, False) for u in n.users)
    found = [_through_activation(n, root) for n in nodes if n in layer and n in live and not reaches_layer[n]]
    if not found:  # no layers at all: the whole graph is the network, the decoder only restructures
        (out,) = [n for n in nodes if n.op == "output"]
        found = sorted(set(out.all_input_nodes), key=nodes.index)
    return found


def _through_activation(node: fx.Node, root: nn.Module) -> fx.Node:
    """A last layer's own activation (its single pointwise user module) belongs to the network."""
    from yoloq.passes.fuse_conv_act import is_pointwise

    while len(node.users) == 1:
        (user,) = node.users
        if user.op != "call_module" or not is_pointwise(root.get_submodule(user.target)):
            break
        node = user
    return node


def split_at_boundary(gm: fx.GraphModule, root: nn.Module, head: list[fx.Node]) -> Split:
    nodes = list(gm.graph.nodes)
    (output,) = [n for n in nodes if n.op == "output"]
    after_head = _descendants(head) - set(head)
    ancestors_of_head = _ancestors(head)
    impure = [n for n in nodes if n.op == "call_module" and getattr(root.get_submodule(n.target), "_is_impure", False)]
    mutations = [n for n in nodes if _is_mutation(n)]
    # Guards on network values, and in-place updates of network tensors, stay in the network.
    front = _ancestors(
        head
        + [n for n in impure if n not in after_head]
        + [n for n in mutations if n not in after_head and n.args and n.args[0] in ancestors_of_head]
    )
    keep = _ancestors([output, *impure, *mutations])  # dead pure nodes are dropped
    decoder_nodes = [n for n in nodes if n not in front and n in keep and n.op != "output"]
    needed = {a for n in decoder_nodes + [output] for a in n.all_input_nodes if a in front and a.op != "get_attr"}
    aux = [n for n in nodes if n in needed and n not in head]
    outs = list(head) + aux

    network = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in front:
            env[n] = network.node_copy(n, env.__getitem__)
    network.output(tuple(env[n] for n in outs))

    decoder = fx.Graph()
    denv: dict[fx.Node, fx.Node] = {}
    for n in outs:
        denv[n] = decoder.placeholder(n.name)
        denv[n].meta = dict(n.meta)
    for n in nodes:
        if n.op == "get_attr" and n in front and any(u in decoder_nodes or u is output for u in n.users):
            denv[n] = decoder.node_copy(n, denv.__getitem__)
    for n in decoder_nodes + [output]:
        denv[n] = decoder.node_copy(n, denv.__getitem__)
    return Split(
        network=fx.GraphModule(root, network, class_name="CapturedNetwork"),
        decoder=fx.GraphModule(root, decoder, class_name="CapturedDecoder"),
        head_outputs=tuple(n.name for n in head),
        aux_outputs=tuple(n.name for n in aux),
    )
