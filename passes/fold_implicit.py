"""Fold per-channel constants added before or multiplied after a convolution into it: YOLOv7's /
YOLOR's implicit knowledge (``ImplicitA``, ``ImplicitM`` around each IDetect head conv).

    before:  x -> add(x, a) -> Conv2d(W, b) -> mul(·, m) -> y        a, m: parameters [1, C, 1, 1]
    after:   x -> Conv2d(W', b') -> y

    add before:  b' = b + Σ_{i,kh,kw} W[o, i, kh, kw] · a[i]   (exact only without padding: a padded
                 border would see 0, not a, so a conv with padding is left alone)
    mul after:   W'[o] = W[o] · m[o],  b'[o] = b[o] · m[o]

Without it the integer graph would meet a float constant in the middle of the network (an Add whose
second input is no quantized tensor). It fires only where the rewrite is exact: the constant has one
value per channel, the add's only user / the conv's only user is the other side, the conv is not
called from another node and has no padding (for the add). Arithmetic in float64. Head outputs that
were the ``mul`` become the conv (``yoloq.head_outputs`` is renamed to match).
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch import nn

from yoloq.passes.graph_utils import call_counts, mark, module_of, resolve_attr, set_module, value_users
from yoloq.pipeline import PassResult

NAME = "fold_implicit"
ADDS = (operator.add, torch.add)
MULS = (operator.mul, torch.mul)


def _channel_constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = resolve_attr(gm, str(node.target))
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or value.shape[0] != 1 or value.shape[2:] != (1, 1):
        return None
    return value.detach()


def _split(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """(the tensor operand, the per-channel constant) of a binary add/mul, or None."""
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if (c := _channel_constant(gm, b)) is not None and isinstance(a, fx.Node):
        return a, c
    if (c := _channel_constant(gm, a)) is not None and isinstance(b, fx.Node):
        return b, c
    return None


def _single_conv(gm: fx.GraphModule, node, counts) -> nn.Conv2d | None:
    conv = module_of(gm, node) if isinstance(node, fx.Node) else None
    if not isinstance(conv, nn.Conv2d) or counts[node.target] > 1:
        return None
    return conv


def _fold_add(gm: fx.GraphModule, node: fx.Node, x: fx.Node, a: torch.Tensor, counts) -> bool:
    users = value_users(node)
    if len(users) != 1 or len(node.users) != 1:
        return False
    conv_node = users[0]
    conv = _single_conv(gm, conv_node, counts)
    if conv is None or any(conv.padding) or conv.groups != 1 or a.shape[1] != conv.in_channels:
        return False
    folded = copy.deepcopy(conv)
    w = conv.weight.detach().double()
    shift = (w.sum((2, 3)) @ a.double().flatten()).to(conv.weight.dtype)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=shift.dtype)
    folded.bias = nn.Parameter(bias + shift)
    set_module(gm, conv_node.target, folded)
    node.replace_all_uses_with(x)
    mark(conv_node, NAME)
    return True


def _fold_mul(gm: fx.GraphModule, node: fx.Node, conv_node: fx.Node, m: torch.Tensor, counts) -> bool:
    conv = _single_conv(gm, conv_node, counts)
    if conv is None or len(conv_node.users) != 1 or m.shape[1] != conv.out_channels:
        return False
    folded = copy.deepcopy(conv)
    scale = m.double().flatten()
    folded.weight = nn.Parameter((conv.weight.detach().double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    if conv.bias is not None:
        folded.bias = nn.Parameter((conv.bias.detach().double() * scale).to(conv.bias.dtype))
    set_module(gm, conv_node.target, folded)
    node.replace_all_uses_with(conv_node)
    mark(conv_node, NAME)
    return True


def fold_implicit(gm: fx.GraphModule) -> PassResult:
    counts = call_counts(gm)
    renamed: dict[str, str] = {}
    folded = 0
    for node in list(gm.graph.nodes):
        found = _split(gm, node)
        if found is None:
            continue
        operand, constant = found
        if node.target in ADDS and _fold_add(gm, node, operand, constant, counts):
            folded += 1
        elif node.target in MULS and _fold_mul(gm, node, operand, constant, counts):
            renamed[node.name] = operand.name
            folded += 1
        else:
            continue
        constant_node = next(a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr")
        gm.graph.erase_node(node)
        if not constant_node.users:
            gm.graph.erase_node(constant_node)
    if renamed and "yoloq.head_outputs" in gm.meta:
        gm.meta["yoloq.head_outputs"] = tuple(renamed.get(n, n) for n in gm.meta["yoloq.head_outputs"])
    if folded:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, bool(folded), {"folded": folded})


fold_implicit.name = NAME
