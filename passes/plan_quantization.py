"""Plan quantization: a recipe becomes one frozen ``QuantAnnotation`` per node (policy only).

    before:  x -> conv_a -> cat(conv_a, up(conv_b)) -> maxpool -> conv_c -> add(conv_c, x) -> ...
    after:   the same graph; every node carries node.meta["yoloq.quant"] = QuantAnnotation(
                 kind   layer | compute | input | passthrough | none,
                 weight / pre_activation specs for layers, the output group and its spec, roles)

Integer arithmetic needs some tensors at one scale: a Concat's inputs and output (policy "shared"),
MaxPool and nearest Upsample (they move codes, never make new values), views, chunks and slices.
Those *pass-through* nodes join their inputs' scale-sharing group; the groups are the connected
components of that relation (networkx). Every other node that makes a float tensor (a layer, an
Add, a Mul, a softmax) *roots* a group: a quantizer is inserted after each root, and all roots of a
group share one quantizer module, so one scale covers them all. A residual Add is a root of its
own group: its inputs keep their scales and the integer graph requantizes them to the output's.

Roles the recipe can address: ``first`` (layers reading the network input), ``head`` (layers whose
output is a network output), ``concat_input`` (roots of a group that contains a Concat).
A group's spec is the widest (most bits) of its roots' resolved activation specs.
"""
from __future__ import annotations

import dataclasses
import operator
import warnings
from collections import Counter

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from yoloq.passes.concrete_tracer import TensorSummary
from yoloq.passes.graph_utils import image_dependent, module_of
from yoloq.pipeline import PassResult
from yoloq.quantizers.spec import QuantSpec
from yoloq.recipe import Recipe

NAME = "plan_quantization"
QUANT = "yoloq.quant"  # node.meta key of the QuantAnnotation

LAYER_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
PASSTHROUGH_MODULES = (nn.MaxPool2d, nn.Identity, nn.Flatten, nn.Dropout)
PASSTHROUGH_FUNCTIONS = {
    operator.getitem, torch.chunk, torch.split, torch.flatten, torch.reshape, torch.permute,
    torch.transpose, torch.squeeze, torch.unsqueeze,
}
PASSTHROUGH_METHODS = {
    "chunk", "split", "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
    "unsqueeze", "__getitem__",
}
CONCATS = {torch.cat, torch.concat}


@dataclasses.dataclass(frozen=True)
class QuantAnnotation:
    kind: str  # "input", "layer", "compute", "passthrough" or "none" (not a float tensor)
    roles: frozenset[str] = frozenset()
    weight: QuantSpec | None = None
    pre_activation: QuantSpec | None = None  # only for a layer with a fused activation
    group: int | None = None  # scale-sharing group of the output
    output: QuantSpec | None = None  # the group's spec; None leaves the output in float
    skip: bool = False  # the recipe keeps this layer in float

    @property
    def is_root(self) -> bool:
        """Its output is new values, so a quantizer follows it."""
        return self.kind in ("input", "layer", "compute") and self.output is not None


def _is_float_tensor(node: fx.Node) -> bool:
    example = node.meta.get("yoloq.example")
    return isinstance(example, TensorSummary) and example.dtype.is_floating_point


def _makes_tensors(node: fx.Node) -> bool:
    """A float tensor, or a tuple/list of them (chunk, split)."""
    example = node.meta.get("yoloq.example")
    if isinstance(example, (tuple, list)):
        return bool(example) and all(isinstance(e, TensorSummary) and e.dtype.is_floating_point for e in example)
    return _is_float_tensor(node)


def _is_passthrough(gm: fx.GraphModule, node: fx.Node, policy: str) -> bool:
    if node.op == "call_module":
        module = module_of(gm, node)
        if isinstance(module, nn.Upsample):
            return module.mode == "nearest"
        return isinstance(module, PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in PASSTHROUGH_FUNCTIONS or (node.target in CONCATS and policy == "shared")
    return node.op == "call_method" and node.target in PASSTHROUGH_METHODS


def classify(gm: fx.GraphModule, node: fx.Node, policy: str) -> str:
    if not _makes_tensors(node) or node.op in ("output", "get_attr"):
        return "none"
    if node.op == "placeholder":
        return "input"
    if node.op == "call_module" and isinstance(module_of(gm, node), LAYER_TYPES):
        return "layer"
    if _is_passthrough(gm, node, policy):
        return "passthrough"
    return "compute" if _is_float_tensor(node) else "none"


def shape_constants(nodes: list[fx.Node], kinds: dict[fx.Node, str]) -> set[fx.Node]:
    """Float tensors whose values do not depend on the image's values, only on its shape
    (``image_dependent``): constants for a given input size, which stay float (an 8-bit grid of
    anchor points would move every box)."""
    depends = image_dependent(nodes)
    return {n for n in nodes if kinds[n] != "none" and n not in depends}


def _tensor_inputs(node: fx.Node, kinds: dict[fx.Node, str]) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if kinds.get(a, "none") != "none"]


def scale_groups(nodes: list[fx.Node], kinds: dict[fx.Node, str]) -> dict[fx.Node, int]:
    """Group id per tensor node: pass-through nodes are joined to their tensor inputs."""
    graph = nx.Graph()
    graph.add_nodes_from(n for n in nodes if kinds[n] != "none")
    for n in nodes:
        if kinds[n] == "passthrough":
            graph.add_edges_from((n, a) for a in _tensor_inputs(n, kinds))
    order = {n: i for i, n in enumerate(nodes)}
    components = sorted((sorted(c, key=order.__getitem__) for c in nx.connected_components(graph)),
                        key=lambda c: order[c[0]])
    return {n: gid for gid, component in enumerate(components) for n in component}


def _roles(nodes, kinds, groups, output_node: fx.Node) -> dict[fx.Node, set[str]]:
    roles: dict[fx.Node, set[str]] = {n: set() for n in nodes}
    input_groups = {groups[n] for n in nodes if kinds[n] == "input"}
    output_groups = {groups[a] for a in output_node.all_input_nodes if a in groups}
    concat_groups = {groups[n] for n in nodes if n.op == "call_function" and n.target in CONCATS and n in groups}
    # A layer is a head layer when no other layer follows it (as split_head finds the boundary);
    # what it feeds to the outputs (YOLOv7's implicit multiply) is head output too.
    reaches_layer: dict[fx.Node, bool] = {}
    for n in reversed(nodes):
        reaches_layer[n] = any(kinds.get(u) == "layer" or reaches_layer.get(u, False) for u in n.users)
    for n in nodes:
        if kinds[n] == "layer" and any(groups.get(a) in input_groups for a in _tensor_inputs(n, kinds)):
            roles[n].add("first")
        if (kinds[n] == "layer" and not reaches_layer[n]) or (kinds[n] == "compute" and groups[n] in output_groups):
            roles[n].add("head")
        if kinds[n] in ("layer", "compute") and groups[n] in concat_groups:
            roles[n].add("concat_input")
    return roles


def _has_fused_activation(module: nn.Module) -> bool:
    return getattr(module, "act", None) is not None


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _check_groups(node: fx.Node, spec: QuantSpec | None, channels: int) -> None:
    if spec is not None and spec.granularity == "per_group" and channels % spec.group_size:
        raise ValueError(f"layer {node.target}: group_size {spec.group_size} does not divide its "
                         f"{channels} output channels")


def _widest(specs: list[QuantSpec | None]) -> QuantSpec | None:
    specs = [s for s in specs if s is not None]
    return max(specs, key=lambda s: s.bits) if specs else None


@dataclasses.dataclass(frozen=True)
class PlanQuantization:
    """Annotate every node from ``recipe``; warns naming each override that matches nothing."""

    recipe: Recipe
    name: str = NAME

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        nodes = list(gm.graph.nodes)
        (output_node,) = [n for n in nodes if n.op == "output"]
        policy = self.recipe.concat_policy
        kinds = {n: classify(gm, n, policy) for n in nodes}
        kinds.update({n: "none" for n in shape_constants(nodes, kinds)})
        groups = scale_groups(nodes, kinds)
        roles = _roles(nodes, kinds, groups, output_node)
        resolved = {n: self.recipe.resolve(str(n.target), frozenset(roles[n]))
                    for n in nodes if kinds[n] in ("layer", "compute")}
        root_specs: dict[int, list[QuantSpec | None]] = {}
        for n in nodes:
            if kinds[n] == "input":
                root_specs.setdefault(groups[n], []).append(self.recipe.input)
            elif n in resolved and not resolved[n].skip:
                root_specs.setdefault(groups[n], []).append(resolved[n].activation)
        group_spec = {g: _widest(specs) for g, specs in root_specs.items()}
        for n in nodes:
            n.meta[QUANT] = self._annotation(gm, n, kinds[n], roles[n], groups.get(n), group_spec, resolved.get(n))
        counts = Counter(kinds.values())
        stats = {"layers": counts["layer"], "compute": counts["compute"], "passthrough": counts["passthrough"],
                 "groups": len(group_spec), "float_layers": sum(n.meta[QUANT].skip for n in nodes)}
        names = [str(n.target) for n in nodes if kinds[n] in ("layer", "compute")]
        present = set().union(*roles.values()) if roles else set()
        notes = [f"override matches nothing: {u}" for u in self.recipe.unmatched(names, present)]
        for note in notes:
            warnings.warn(note, stacklevel=2)
        return PassResult(gm, True, stats, notes)

    @staticmethod
    def _annotation(gm, node, kind, roles, group, group_spec, specs) -> QuantAnnotation:
        output = group_spec.get(group) if group is not None else None
        if kind != "layer":
            return QuantAnnotation(kind, frozenset(roles), group=group, output=output)
        if specs.skip:
            return QuantAnnotation(kind, frozenset(roles), group=group, output=None, skip=True)
        layer = module_of(gm, node)
        _check_groups(node, specs.weight, _out_channels(layer))
        pre = specs.pre_activation if _has_fused_activation(layer) else None
        return QuantAnnotation(kind, frozenset(roles), specs.weight, pre, group, output)

    @staticmethod
    def ensures(gm: fx.GraphModule) -> str | None:
        missing = [n.name for n in gm.graph.nodes if not isinstance(n.meta.get(QUANT), QuantAnnotation)]
        return f"nodes without a QuantAnnotation: {missing[:5]}" if missing else None


def plan_quantization(recipe: Recipe) -> PlanQuantization:
    return PlanQuantization(recipe)
