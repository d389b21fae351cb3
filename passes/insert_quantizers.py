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

QC (QAT correction, ``passes/correct.py``) adds a per-output-channel affine on the quantized conv's
output, before BN: ``h̃ = γ ⊙ h + β`` with ``h = conv(x, Qw(W)) + b`` (``conv(x, Qw(W·k))/k + b`` when
folding is simulated). ``fold_qc_`` folds it away with the codes kept. Since Qw(W) = s·u(q) and levels
scale with s, per channel c (t_c = γ_c, or |γ_c| when the sign moves into the BN):

    scale  s_c → |t_c|·s_c   (the quantizer becomes per-channel)      latent W_c → t_c·W_c
    bias   b_c → (γ_c·b_c + β_c) / m_c                                with m_c = γ_c / t_c = ±1

γ_c < 0 needs a sign somewhere. With an affine BN kept after the layer (not fold-simulated), it goes
there: BN weight and running mean are multiplied by m_c = −1, exact in training and evaluation, and
every code stays. Otherwise the channel's codes are mirrored (q − z → −(q − z), ℓ_q → −ℓ_q), exact
only where the grid holds every mirror (not the code qmin of a signed grid); ``fold_qc_`` checks
that before changing anything and raises ``QCFoldError`` naming the channels where it does not.
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
from yoloq.quantizers.rescale import rescaled_per_channel
from yoloq.quantizers.uniform import per_axis

NAME = "insert_quantizers"
CONTAINER = "activation_quantizers"
QUANTIZES = "yoloq.quantizes"  # node.meta key on a quantizer node: the name of the node it follows
QC_EXACT_STEPS = 1e-5  # a folded value within this share of a step (plus float rounding) is on the grid


class QCFoldError(ValueError):
    """QC cannot fold exactly (γ = 0 or not finite, or codes of a γ < 0 channel with no mirror)."""


class QuantizedLayer(nn.Module):
    """A conv / transposed conv / linear layer (fused BN and activation included) whose weight,
    and whose pre-activation when it has a fused activation, pass through fake quantizers."""

    def __init__(self, layer: nn.Module, weight_quant: FakeQuantize | None, pre_act_quant: FakeQuantize | None):
        super().__init__()
        self.layer = layer
        self.weight_quant = weight_quant
        self.pre_act_quant = pre_act_quant
        self.fold_bn = False  # simulate BN folding (module docstring); only with a BN and no weight transpose
        self.register_parameter("qc_scale", None)  # QC's γ and β (module docstring), added by add_qc_
        self.register_parameter("qc_shift", None)
        # Per output channel, subtracted from the bias while the weight is quantized, so the float
        # network stays as it was (passes/bias_correction.py); the integer graph adds b - correction.
        self.register_buffer("bias_correction", None)

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
        self.fold_qc_()  # QC sits between the conv and the BN being folded
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
        correction = self._buffers.get("bias_correction")  # .get: layers pickled before it existed
        if bias and correction is not None and self.weight_quant is not None and self.weight_quant.quantizing:
            b = -correction if b is None else b - correction
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
            y = bn(self._apply_qc(y))
        else:
            y = self._apply_qc(self.linear_part(x))
            if bn is not None:
                y = bn(y)
        if act is None:
            return y
        if self.pre_act_quant is not None:
            y = self.pre_act_quant(y)
        return act(y)


    # ----------------------------------------------------------------------------- QC
    @property
    def has_qc(self) -> bool:
        return self._parameters.get("qc_scale") is not None  # .get: layers pickled before QC existed

    def add_qc_(self) -> QuantizedLayer:
        """Add QC with γ = 1, β = 0 (outputs unchanged); a layer that has QC keeps its own."""
        if self.weight_quant is None:
            raise ValueError("QC folds into the weight quantizer's scale; this layer has no weight quantizer")
        if not self.has_qc:
            weight = self.layer.weight
            channels = weight.shape[weight_channel_axis(self.layer)]
            self.qc_scale = nn.Parameter(torch.ones(channels, dtype=weight.dtype, device=weight.device))
            self.qc_shift = nn.Parameter(torch.zeros(channels, dtype=weight.dtype, device=weight.device))
        return self

    def remove_qc_(self) -> QuantizedLayer:
        """Drop QC without folding it (what it learned is lost)."""
        self.qc_scale = self.qc_shift = None
        return self

    def _apply_qc(self, y: torch.Tensor) -> torch.Tensor:
        gamma, beta = self._parameters.get("qc_scale"), self._parameters.get("qc_shift")
        if gamma is None:
            return y
        if isinstance(self.layer, (nn.Conv2d, nn.ConvTranspose2d)):  # channels on dim 1; linear: the last
            shape = (1, -1) + (1,) * (y.dim() - 2)
            gamma, beta = gamma.view(shape), beta.view(shape)
        return y * gamma + beta

    @torch.no_grad()
    def fold_qc_(self) -> dict[str, int]:
        """Fold QC into the weight quantizer's scale, the latent weight and the bias, then drop it
        (module docstring). Eval outputs stay the same up to float rounding, and so do the codes but
        in mirrored channels. Returns channel counts ``sign_into_bn`` and ``mirrored``, and
        ``per_channel`` = 1 when the quantizer had to become per-channel. Raises ``QCFoldError``
        before changing anything when the fold would not be exact."""
        if not self.has_qc:
            return {}
        layer, quant, bn = self.layer, self.weight_quant, self.bn
        gamma, beta = self.qc_scale.detach(), self.qc_shift.detach()
        broken = ~torch.isfinite(gamma) | ~torch.isfinite(beta) | (gamma == 0)
        if broken.any():
            raise QCFoldError(f"γ is 0, or γ or β is not finite, in channel(s) {_channels(broken)}")
        negative = gamma < 0
        sign_into_bn = bn is not None and bn.affine and not self.fold_bn
        moved = 1.0 - 2.0 * (negative & sign_into_bn).to(gamma.dtype)  # m: the sign the BN takes
        ndim, axis = layer.weight.dim(), weight_channel_axis(layer)
        current = quant.dequantize(quant.codes(self.effective_weight()))
        # A channel whose weights all quantize to 0 outputs 0 whatever its scale: γ goes to the bias
        # only (its scale may already sit at the floor, where γ·s could not be represented).
        dead = ~current.movedim(axis, 0).flatten(1).ne(0).any(1)
        factor = torch.where(dead, moved, gamma * moved)
        t = per_axis(factor, ndim, axis)
        target = t * current  # what the folded quantizer must give
        folded = rescaled_per_channel(quant, factor, ndim, axis)
        codes = folded.codes(target)
        # Float-rounding slack: a step fraction, or 1e-6 of the layer's largest weight (a channel whose
        # γ·s would fall below the scale floor keeps the floor; its weights are ~1e-7 of the largest).
        slack = QC_EXACT_STEPS * folded.scale + 1e-6 * target.abs().max()
        off = (folded.dequantize(codes) - target).abs() > slack
        if off.any():
            rows = off.movedim(axis, 0).flatten(1).any(1)
            why = ("γ < 0 and their codes have no mirror on the grid (e.g. qmin of a signed grid), with no "
                   "affine BN after the layer to take the sign") if bool(negative[rows].all()) else \
                "|γ| times the weight scale falls below the smallest scale"
            raise QCFoldError(f"channel(s) {_channels(rows)} cannot fold exactly: {why}")
        k = self.bn_factor().view(-1, *([1] * (ndim - 1))) if self.fold_bn else 1.0
        latent = t * layer.weight
        wrong = folded.codes(latent * k) != codes  # a float tie moved, or a clipped weight was mirrored
        latent = torch.where(wrong, target / k, latent)
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(gamma)
        bias_grad = layer.bias.requires_grad if layer.bias is not None else True
        layer.weight = nn.Parameter(latent, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter((gamma * bias + beta) * moved, requires_grad=bias_grad)
        correction = self._buffers.get("bias_correction")  # subtracted from the bias, so it scales alike
        if correction is not None:
            self.bias_correction = correction * gamma * moved
        if sign_into_bn:
            bn.weight.mul_(moved)
            if bn.running_mean is not None:
                bn.running_mean.mul_(moved)
        self.weight_quant = folded
        self.remove_qc_()
        return {"sign_into_bn": int((moved < 0).sum()), "mirrored": int((negative & (moved > 0)).sum()),
                "per_channel": int(quant.spec.granularity != "per_channel")}


def _channels(mask: torch.Tensor, shown: int = 8) -> str:
    index = mask.nonzero().flatten().tolist()
    return f"{index[:shown]}{' ...' if len(index) > shown else ''} of {mask.numel()}"


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
