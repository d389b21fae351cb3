"""``yoloq.save`` / ``yoloq.load_quantized``: a quantized model on disk with packed integer weights.

Every quantized layer's weight is stored as its integer codes, packed densely (two 4-bit codes per
byte, eight 3-bit codes in three bytes; ``quantizers.packing``), beside the quantizers' scales,
zero points and levels; the graph, the decoder and everything else (biases, unfolded BNs) are
stored as they are, and the whole payload is LZMA-compressed. Loading dequantizes the codes back
into the layers; since fake quantization is idempotent on its own grid, the loaded model computes
exactly what the saved one did.

The file is a pickle of yoloq's own objects (graph modules and the model's layer classes), so, as
with any pickle, load only files you trust: ``yoloq.models.load`` is the safe reader for official
checkpoints.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import lzma
import math
import os

import torch
from torch import nn

from yoloq.passes.insert_quantizers import QuantizedLayer
from yoloq.quantizers.packing import pack_codes, unpack_codes

FORMAT = "yoloq-quantized/1"


@dataclasses.dataclass(frozen=True)
class SavedSize:
    file_bytes: int
    fp32_bytes: int  # torch.save of the same network's float state_dict (weights in fp32)
    packed_layers: int

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.file_bytes


def _bytes_of(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def float_state_bytes(qm: nn.Module) -> int:
    """Size of the float network's state_dict: quantized layers' weights in fp32, no quantizers."""
    state = {k: v for k, v in qm.state_dict().items() if "_quant." not in k and "activation_quantizers." not in k}
    return _bytes_of(state)


def _quantized_layers(module: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QuantizedLayer) and m.weight_quant is not None]


def _pack_layer(layer: QuantizedLayer) -> dict:
    q = layer.weight_quant
    with torch.no_grad():
        codes = q.codes(layer.layer.weight)
    signed = bool(codes.min() < 0)
    return {"packed": pack_codes(codes.flatten(), q.spec.bits, signed), "bits": q.spec.bits, "signed": signed,
            "shape": tuple(layer.layer.weight.shape)}


def save(qm: nn.Module, path: str | os.PathLike) -> SavedSize:
    """Write ``qm`` (a QuantizedModel after calibration or QAT) to ``path``; returns the sizes.
    The file holds CPU tensors wherever ``qm`` lives (a model trained on a GPU loads anywhere)."""
    skeleton = copy.deepcopy(qm).cpu()
    packed = {}
    for name, layer in _quantized_layers(skeleton):
        layer.fold_simulated_bn_()  # the weight the quantizer saw becomes the stored one
        packed[name] = _pack_layer(layer)
        layer.layer.weight = nn.Parameter(torch.empty(0), requires_grad=layer.layer.weight.requires_grad)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "model": skeleton, "packed": packed}, buffer)
    data = lzma.compress(buffer.getvalue(), preset=6)
    with open(path, "wb") as f:
        f.write(data)
    return SavedSize(len(data), float_state_bytes(qm), len(packed))


XZ_MAGIC = b"\xfd7zXZ\x00"  # the payload is one LZMA (xz) stream


def is_saved_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts as ``save`` writes them (an xz stream)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(len(XZ_MAGIC)) == XZ_MAGIC


def load_quantized(path: str | os.PathLike) -> nn.Module:
    """The model ``save`` wrote, with its weights dequantized from the packed codes."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = lzma.decompress(f.read())
        payload = torch.load(io.BytesIO(raw), weights_only=False, map_location="cpu")
    except (lzma.LZMAError, EOFError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a yoloq quantized model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    model = payload["model"]
    layers = dict(_quantized_layers(model))
    for name, entry in payload["packed"].items():
        layer = layers[name]
        numel = math.prod(entry["shape"])
        codes = unpack_codes(entry["packed"], entry["bits"], entry["signed"], numel).view(entry["shape"])
        weight = layer.weight_quant.dequantize(codes)
        layer.layer.weight = nn.Parameter(weight, requires_grad=layer.layer.weight.requires_grad)
    return model.eval()
