"""Choose how each quantized layer's BatchNorm trains during QAT (the recipe's ``qat_batchnorm``).

QAT keeps BN as its own op after the quantized conv (``build_pipeline(qat=True)`` skips
``fold_conv_bn``). With ``qat_batchnorm: fold_simulated`` this pass switches every quantized layer
that carries a BN to simulated folding (``QuantizedLayer`` docstring): the weight quantizer then
sees, and is calibrated on, the BN-folded weight. With ``separate`` it changes nothing.
"""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from yoloq.passes.insert_quantizers import QuantizedLayer
from yoloq.pipeline import PassResult

NAME = "qat_batchnorm"


@dataclasses.dataclass(frozen=True)
class QatBatchnorm:
    mode: str
    name: str = NAME

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        layers = [m for m in gm.modules() if isinstance(m, QuantizedLayer) and m.bn is not None]
        folding = self.mode == "fold_simulated"
        for layer in layers:
            layer.fold_bn = folding and layer.weight_quant is not None and not layer.layer.weight.dim() < 2
        changed = sum(layer.fold_bn for layer in layers)
        return PassResult(gm, changed > 0, {"mode": self.mode, "layers_with_bn": len(layers), "fold_simulated": changed})

    @staticmethod
    def requires(gm: fx.GraphModule) -> str | None:
        if any(isinstance(m, QuantizedLayer) for m in gm.modules()):
            return None
        return "no QuantizedLayer modules: run insert_quantizers first"


def qat_batchnorm(mode: str) -> QatBatchnorm:
    return QatBatchnorm(mode)
