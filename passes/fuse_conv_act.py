"""Fuse Conv2d (+ BatchNorm2d, when it could not be folded) + a pointwise activation into one layer.

    before:  x -> Conv2d -> [BatchNorm2d] -> act -> y          (act: SiLU, LeakyReLU, ReLU, ...)
    after:   x -> FusedConv2d(conv, [bn], act) -> y

``FusedConv2d`` *is* a Conv2d (same qualified name, same ``weight``/``bias`` keys), so recipes and
tools that address the conv keep working, and later passes see one layer whose activation is
``fused.act``. Which modules count as activations is decided generically, not from a list: a
module qualifies when it has no parameters and is *pointwise*, i.e. it keeps the shape and
commutes with any permutation of the elements (f(P x) = P f(x)), which holds for every
elementwise function and fails for softmax, pooling, resizing and normalisation. Each fused
layer gets its own copy of the activation (YOLO code often shares one SiLU module).
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from yoloq.passes.graph_utils import call_counts, drop_unused_module, mark, module_of, set_module, value_users
from yoloq.pipeline import PassResult

NAME = "fuse_conv_act"


class FusedConv2d(nn.Conv2d):
    """A convolution followed by an optional BatchNorm2d and a pointwise activation, as one layer."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module, bn: nn.BatchNorm2d | None = None):
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.bn = bn
        self.act = act

    @property
    def activation(self) -> str:
        return type(self.act).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        return self.act(self.bn(y) if self.bn is not None else y)


def is_pointwise(module: nn.Module) -> bool:
    """Parameter-free and permutation-equivariant on a probe tensor (see module docstring)."""
    if any(True for _ in module.parameters()) or isinstance(module, nn.Conv2d):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=gen) * 4
    perm = torch.randperm(x.numel(), generator=gen)
    try:
        with torch.no_grad():
            y = module(x)
            y_perm = module(x.flatten()[perm].view_as(x))
    except Exception:
        return False
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y_perm.shape != x.shape:
        return False
    # SIMD and scalar code paths may round differently; non-pointwise modules miss by far more
    return torch.allclose(y.flatten()[perm], y_perm.flatten(), rtol=1e-5, atol=1e-6)


def _single_user(node: fx.Node) -> fx.Node | None:
    users = value_users(node)
    return users[0] if len(users) == 1 else None


def find_unit(gm: fx.GraphModule, conv_node: fx.Node, counts, probe) -> tuple[list[fx.Node], str | None]:
    """The nodes [conv, (bn,) act] to fuse from ``conv_node``, or ([], reason) when it must not fire."""
    conv = module_of(gm, conv_node)
    if type(conv) is not nn.Conv2d:
        return [], None
    chain, nxt = [conv_node], _single_user(conv_node)
    if nxt is not None and isinstance(module_of(gm, nxt), nn.BatchNorm2d):
        chain, nxt = chain + [nxt], _single_user(nxt)
    if nxt is None or nxt.op != "call_module":
        return [], f"{conv_node.target}: not followed by a single activation module"
    if not probe(module_of(gm, nxt)):
        return [], f"{conv_node.target}: {type(module_of(gm, nxt)).__name__} is not pointwise"
    if any(counts[n.target] > 1 for n in chain):
        return [], f"{conv_node.target}: conv or BN module is called from more than one node"
    return chain + [nxt], None


def fuse_conv_act(gm: fx.GraphModule) -> PassResult:
    counts, cache, notes, fused = call_counts(gm), {}, [], {}

    def probe(m: nn.Module) -> bool:
        if id(m) not in cache:
            cache[id(m)] = is_pointwise(m)
        return cache[id(m)]

    erased: set[fx.Node] = set()
    for conv_node in list(gm.graph.nodes):
        if conv_node in erased:
            continue
        unit, reason = find_unit(gm, conv_node, counts, probe)
        if reason:
            notes.append(f"not fused {reason}")
        if not unit:
            continue
        bn = module_of(gm, unit[1]) if len(unit) == 3 else None
        act = copy.deepcopy(module_of(gm, unit[-1]))
        set_module(gm, conv_node.target, FusedConv2d(module_of(gm, conv_node), act, bn))
        for node in reversed(unit[1:]):
            node.replace_all_uses_with(conv_node)
            gm.graph.erase_node(node)
            erased.add(node)
            drop_unused_module(gm, node.target)
        mark(conv_node, NAME)
        fused[type(act).__name__] = fused.get(type(act).__name__, 0) + 1
    total = sum(fused.values())
    if total:
        gm.recompile()  # usable when called directly, outside the runner
    return PassResult(gm, total > 0, {"fused": total, "by_activation": fused}, notes)


def _ensures(gm: fx.GraphModule) -> str | None:
    counts = call_counts(gm)
    left = [n.target for n in gm.graph.nodes if find_unit(gm, n, counts, is_pointwise)[0]]
    return f"fusable conv+activation left: {left}" if left else None


fuse_conv_act.name = NAME
fuse_conv_act.ensures = _ensures
