"""Fold every eval-mode BatchNorm2d into the convolution that feeds it.

    before:  x -> Conv2d(W, b) -> BatchNorm2d(γ, β, μ, σ², ε) -> y
    after:   x -> Conv2d(W', b') -> y

    with s = γ / sqrt(σ² + ε) per output channel:
        W'[o] = W[o] · s[o]
        b'[o] = (b[o] - μ[o]) · s[o] + β[o]        (b = 0 when the conv had no bias)

It fires only where the rewrite is exact: the conv's only user is the BN, neither module is
called from another node, the BN is in eval mode and tracks running statistics, and the
channel counts agree. Every BN it leaves records why in ``notes``. The arithmetic runs in
float64 so the folded layer matches the pair to float32 rounding.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from yoloq.passes.graph_utils import call_counts, drop_unused_module, mark, module_of, set_module, value_users
from yoloq.pipeline import PassResult

NAME = "fold_conv_bn"


def why_not_foldable(gm: fx.GraphModule, bn_node: fx.Node, counts) -> str | None:
    """None when ``bn_node`` can be folded into its producer, else the reason it cannot."""
    bn = module_of(gm, bn_node)
    producer = bn_node.args[0] if bn_node.args else None
    if not isinstance(producer, fx.Node) or not isinstance(module_of(gm, producer), nn.Conv2d):
        return "input is not a Conv2d"
    conv = module_of(gm, producer)
    if len(value_users(producer)) != 1:
        return f"conv {producer.target} has {len(value_users(producer))} users"
    if counts[producer.target] > 1 or counts[bn_node.target] > 1:
        return "conv or BN module is called from more than one node"
    if bn.training:
        return "BN is in training mode (batch statistics)"
    if not bn.track_running_stats or bn.running_mean is None:
        return "BN does not track running statistics"
    if bn.num_features != conv.out_channels:
        return f"BN has {bn.num_features} features, conv {conv.out_channels} output channels"
    return None


def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight.double() if bn.affine else torch.ones(bn.num_features, dtype=torch.float64)
    shift = bn.bias.double() if bn.affine else torch.zeros(bn.num_features, dtype=torch.float64)
    scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    out = copy.deepcopy(conv)
    dtype = conv.weight.dtype
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    out.weight = nn.Parameter(weight.to(dtype), requires_grad=conv.weight.requires_grad)
    out.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + shift).to(dtype))
    return out


def fold_conv_bn(gm: fx.GraphModule) -> PassResult:
    counts = call_counts(gm)
    folded, notes = 0, []
    for bn_node in list(gm.graph.nodes):
        if bn_node.graph is not gm.graph or not isinstance(module_of(gm, bn_node), nn.BatchNorm2d):
            continue
        if reason := why_not_foldable(gm, bn_node, counts):
            notes.append(f"kept {bn_node.target}: {reason}")
            continue
        conv_node = bn_node.args[0]
        with torch.no_grad():
            set_module(gm, conv_node.target, folded_conv(module_of(gm, conv_node), module_of(gm, bn_node)))
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
        drop_unused_module(gm, bn_node.target)
        mark(conv_node, NAME)
        folded += 1
    if folded:
        gm.recompile()  # usable when called directly, outside the runner
    return PassResult(gm, folded > 0, {"folded": folded, "kept": len(notes)}, notes)


def _ensures(gm: fx.GraphModule) -> str | None:
    counts = call_counts(gm)
    bns = [n for n in gm.graph.nodes if isinstance(module_of(gm, n), nn.BatchNorm2d)]
    foldable = [n.target for n in bns if why_not_foldable(gm, n, counts) is None]
    return f"foldable BNs left: {foldable}" if foldable else None


fold_conv_bn.name = NAME
fold_conv_bn.ensures = _ensures
