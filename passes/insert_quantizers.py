"""Insert fake-quant modules where the plan says (mechanism only: it reads ``QuantAnnotation``s).

    before:  x -> FusedConv2d(conv, act) -> y -> cat -> ...            (annotated by plan_quantization)
    after:   x -> QuantizedLayer(conv, act) -> activation_quantizers.g7 -> y -> cat -> ...
             QuantizedLayer:  y = act(Qp(conv(x, Qw(W)) + b))

    Qw: the weight quantizer (per the annotation's weight spec, channel axis = output channels)
    Qp: the pre-activation quantizer of a fused layer (the LUT input of the integer graph)
    g7: one activation quantizer per scale-sharing group, called after every root of the group

A ``QuantizedLayer`` keeps the layer's qualified name, so recipes, reports and the visualizer
still address ``model.2.cv1.conv``; the original module is its ``layer`` child.

A BatchNorm left in the layer (QAT keeps it, see ``build_pipeline(qat=True)``) runs after the
quantized conv. With ``fold_bn=True`` the layer instead simulates folding (Krishnamoorthi 2018,
§3.2.2, as torch.ao's "approximate" ConvBn): with k = γ / sqrt(running var + ε) per channel,

    y = BN(conv(x, Qw(W · k)) / k + b)

BN uses batch statistics in training and running ones in evaluation, where this equals the folded
conv ``conv(x, Qw(W·k)) + k·(b − μ) + β`` exactly: the quantizer sees the weight that will ship.
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
        self.fold_bn = False  # simulate BN folding (module docstring); only with a BN and no weight transpose

    @property
    def bn(self) -> nn.BatchNorm2d | None:
        return getattr(self.layer, "bn", None)

    def bn_factor(self) -> torch.Tensor:
        """k = γ / sqrt(running var + ε) per output channel (γ = 1 without affine)."""
        bn = self.bn
        k = torch.rsqrt(bn.running_var + bn.eps)
        return k * bn.weight if bn.affine else k

    def effective_weight(self) -> torch.Tensor:
        """The float weight the weight quantizer sees: W, or W·k when folding is simulated."""
        weight = self.layer.weight
        if not self.fold_bn:
            return weight
        return weight * self.bn_factor().view(-1, *([1] * (weight.dim() - 1)))

    @torch.no_grad()
    def fold_simulated_bn_(self) -> QuantizedLayer:
        """Make a simulated fold real (the evaluation form): weight W·k, bias k·(b − μ) + β, no BN.
        Outputs in eval mode stay the same up to float rounding; the quantizer sees the same weight."""
        if not self.fold_bn:
            return self
        bn, layer = self.bn, self.layer
        k = self.bn_factor()
        bias = layer.bias if layer.bias is not None else torch.zeros_like(k)
        layer.weight = nn.Parameter(self.effective_weight().detach(), requires_grad=layer.weight.requires_grad)
        shift = bn.bias if bn.affine else torch.zeros_like(k)
        layer.bias = nn.Parameter((k * (bias - bn.running_mean) + shift).detach())
        layer.bn, self.fold_bn = None, False
        return self

    def linear_part(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        layer = self.layer
        w = self.effective_weight()
        w = w if self.weight_quant is None else self.weight_quant(w)
        b = layer.bias if bias else None
        if isinstance(layer, nn.ConvTranspose2d):
            return F.conv_transpose2d(x, w, b, layer.stride, layer.padding, layer.output_padding,
                                      layer.groups, layer.dilation)
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(x, w, b)
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, act = self.bn, getattr(self.layer, "act", None)
        if self.fold_bn:
            y = self.linear_part(x, bias=False) / self.bn_factor().view(1, -1, 1, 1)
            if self.layer.bias is not None:
                y = y + self.layer.bias.view(1, -1, 1, 1)
            y = bn(y)
        else:
            y = self.linear_part(x)
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
