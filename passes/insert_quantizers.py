"""Insert fake-quant modules where the plan says (mechanism only: it reads ``QuantAnnotation``s).

    before:  x -> FusedConv2d(conv, act) -> y -> cat -> ...            (annotated by plan_quantization)
    after:   x -> QuantizedLayer(conv, act) -> activation_quantizers.g7 -> y -> cat -> ...
             QuantizedLayer:  y = act(Qp(conv(x, Qw(W)) + b))

    Qw: the weight quantizer (per the annotation's weight spec, channel axis = output channels)
    Qp: the pre-activation quantizer of a fused layer (the LUT input of the integer graph)
    g7: one activation quantizer per scale-sharing group, called after every root of the group

A ``QuantizedLayer`` keeps the layer's qualified name, so recipes, reports and the visualizer
still address ``model.2.cv1.conv``; the original module is its ``layer`` child.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from yoloq.passes.graph_utils import mark, module_of, set_module
from yoloq.passes.plan_quantization import QUANT, QuantAnnotation
from yoloq.pipeline import PassResult
from yoloq.quantizers.fake_quantize import FakeQuantize

NAME = "insert_quantizers"
CONTAINER = "activation_quantizers"
QUANTIZES = "yoloq.quantizes"  # node.meta key on a quantizer node: the name of the node it follows


class QuantizedLayer(nn.Module):
    """A conv / transposed conv / linear layer (fused BN and activation included) whose weight,
    and whose pre-activation when it has a fused activation, pass through fake quantizers."""

    def __init__(self, layer: nn.Module, weight_quant: FakeQuantize | None, pre_act_quant: FakeQuantize | None):
        super().__init__()
        self.layer = layer
        self.weight_quant = weight_quant
        self.pre_act_quant = pre_act_quant

    def linear_part(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        w = layer.weight if self.weight_quant is None else self.weight_quant(layer.weight)
        if isinstance(layer, nn.ConvTranspose2d):
            return F.conv_transpose2d(x, w, layer.bias, layer.stride, layer.padding, layer.output_padding,
                                      layer.groups, layer.dilation)
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(x, w, layer.bias)
        return F.linear(x, w, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_part(x)
        bn, act = getattr(self.layer, "bn", None), getattr(self.layer, "act", None)
        if bn is not None:
            y = bn(y)
        if act is None:
            return y
        if self.pre_act_quant is not None:
            y = self.pre_act_quant(y)
        return act(y)


def weight_channel_axis(layer: nn.Module) -> int:
    """Output channels of the weight: dim 1 of a transposed conv's (in, out, kh, kw), else dim 0."""
    return 1 if isinstance(layer, nn.ConvTranspose2d) else 0


def _activation_axis(annotation: QuantAnnotation) -> int | None:
    return None if annotation.output.granularity == "per_tensor" else 1


def _quantize_layer(gm: fx.GraphModule, node: fx.Node, a: QuantAnnotation) -> None:
    layer = module_of(gm, node)
    weight = FakeQuantize(a.weight, weight_channel_axis(layer)) if a.weight is not None else None
    pre = FakeQuantize(a.pre_activation) if a.pre_activation is not None else None
    set_module(gm, node.target, QuantizedLayer(layer, weight, pre))
    mark(node, NAME)


def _insert_after(gm: fx.GraphModule, root: fx.Node, target: str, anchor: fx.Node) -> fx.Node:
    with gm.graph.inserting_after(anchor):
        q = gm.graph.call_module(target, (root,))
    root.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
    q.meta.update({"yoloq.example": root.meta.get("yoloq.example"), QUANTIZES: root.name,
                   "yoloq.module": root.meta.get("yoloq.module"),
                   QUANT: QuantAnnotation("quantizer", group=root.meta[QUANT].group, output=root.meta[QUANT].output)})
    mark(q, NAME)
    return q


def insert_quantizers(gm: fx.GraphModule) -> PassResult:
    nodes = list(gm.graph.nodes)
    last_placeholder = [n for n in nodes if n.op == "placeholder"][-1]
    if not hasattr(gm, CONTAINER):
        gm.add_module(CONTAINER, nn.ModuleDict())
    container = getattr(gm, CONTAINER)
    layers = inserted = 0
    for node in nodes:
        a = node.meta[QUANT]
        if a.kind == "layer" and not a.skip:
            _quantize_layer(gm, node, a)
            layers += 1
        if not a.is_root:
            continue
        key = f"g{a.group}"
        if key not in container:
            container[key] = FakeQuantize(a.output, _activation_axis(a))
        anchor = last_placeholder if node.op == "placeholder" else node
        _insert_after(gm, node, f"{CONTAINER}.{key}", anchor)
        inserted += 1
    gm.recompile()
    return PassResult(gm, layers + inserted > 0,
                      {"quantized_layers": layers, "activation_quantizers": len(container), "calls": inserted})


def _requires(gm: fx.GraphModule) -> str | None:
    missing = [n.name for n in gm.graph.nodes if not isinstance(n.meta.get(QUANT), QuantAnnotation)]
    if missing:
        return f"run plan_quantization first: nodes without a QuantAnnotation: {missing[:5]}"
    done = [n.target for n in gm.graph.nodes if isinstance(module_of(gm, n), (QuantizedLayer, FakeQuantize))]
    return f"quantizers already inserted: {done[:3]}" if done else None


def _ensures(gm: fx.GraphModule) -> str | None:
    quantized = {n.meta.get(QUANTIZES) for n in gm.graph.nodes}
    missing = [n.name for n in gm.graph.nodes
               if n.meta[QUANT].kind != "quantizer" and n.meta[QUANT].is_root and n.name not in quantized]
    return f"roots without a quantizer: {missing[:5]}" if missing else None


insert_quantizers.name = NAME
insert_quantizers.requires = _requires
insert_quantizers.ensures = _ensures
