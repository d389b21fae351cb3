"""ONNX Runtime on an exported file, against the integer graph (``export_onnx``'s check).

    check_onnx(path, lowered, qm, inputs) -> OnnxCheck     heads and boxes, max and mean |Δ|
    fused_convs(path) -> (QLinearConv, float Conv)         what ORT's optimizer fused
    OnnxModel(path)                                        the file as a detector for yoloq.evaluate

Why the heads are not always equal: where ORT fuses DQ -> Conv -> Q into QLinearConv it accumulates
in integers and matches our codes (0 steps measured on tiny-yolo). Where a Conv cannot fuse (its
output is a 16-bit pre-activation or head) ORT accumulates in float32 and rounds half to even,
where we accumulate exactly and round half up; a code at a tie moves one step and is carried on.
``reference_distance`` (the fake-quant graph against the integer graph) is the same effect in our
own float graph, for scale.
"""
from __future__ import annotations

import collections
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from yoloq.passes.eval_form import tensor_grids
from yoloq.passes.integer_ops import Grid


def onnx_session(path, threads: int = 1, optimized_path=None, spinning: bool = True):
    """An ONNX Runtime CPU session of ``path`` (``optimized_path``: where ORT writes the graph it runs).
    ``spinning=False`` lets the worker threads sleep after a run instead of spinning for the next
    one: slower for a lone session, but sessions timed in turn then do not steal each other's cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # ORT warns when it serializes an NCHWc-optimized graph
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel(nn.Module):
    """An exported file as a detector: forward(x) = ONNX Runtime's ``boxes`` output as a tensor, so
    ``yoloq.evaluate(OnnxModel(path), data, imgsz=...)`` scores it: on rectangular letterboxes when
    the file was exported with ``dynamic_size``, else with ``rect=False`` (its H x W are fixed)."""

    def __init__(self, path, threads: int = 1, spinning: bool = True):
        super().__init__()
        self.session = onnx_session(path, threads, spinning=spinning)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {"images": x.detach().to("cpu", torch.float32).contiguous().numpy()}
        return torch.from_numpy(self.session.run(["boxes"], feed)[0])


@dataclasses.dataclass(frozen=True)
class OnnxCheck:
    """ONNX Runtime's outputs against the integer graph's (dequantized heads, decoded boxes), max |Δ|
    over the given inputs. ``head_steps``: that distance in steps of the head's grid (0: ORT gave our
    codes); ``differing``: the share of head elements that differ. For scale, ``reference_distance``
    is how far the fake-quant graph itself is from the integer graph: a code that moves at a rounding
    tie is carried through the network, in either graph."""

    integer_distance: float
    mean_distance: float
    head_steps: float
    differing: float
    boxes_distance: float
    boxes_shape: tuple[int, ...]
    reference_distance: float

    @property
    def verdict(self) -> str:
        return (f"ONNX Runtime vs integer graph: heads max |Δ| {self.integer_distance:.3g} "
                f"({self.head_steps:g} step(s); mean {self.mean_distance:.3g}, {self.differing:.2%} of values differ), "
                f"boxes {self.boxes_distance:.3g}; fake-quant graph vs integer graph: {self.reference_distance:.3g}; "
                f"boxes {list(self.boxes_shape)}")


@torch.no_grad()
def check_onnx(path, lowered, qm, inputs, session=None) -> OnnxCheck:
    """Run ``path`` in ONNX Runtime on ``inputs`` (a batch or a list of batches) and compare it with
    ``lowered`` (``yoloq.lower(qm)``); ``qm``'s fake-quant graph gives the reference distance."""
    session = session or onnx_session(path)
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    steps = [g.scale for g in _head_grids(qm)]
    worst = worst_steps = boxes = reference = total = count = differing = 0.0
    was_training = qm.graph_module.training
    qm.graph_module.eval()
    try:
        for x in batches:
            outs = [torch.from_numpy(o) for o in session.run(None, {"images": x.numpy().astype(np.float32)})]
            heads = lowered.graph_module(x)
            decoded = lowered.decoder(heads)
            decoded = decoded[0] if isinstance(decoded, (tuple, list)) else decoded
            fake = pytree.tree_leaves(qm.graph_module(x))
            for ort_head, int_head, fq_head, step in zip(outs, pytree.tree_leaves(heads), fake, steps):
                diff = (ort_head - int_head).abs()
                worst, worst_steps = max(worst, float(diff.max())), max(worst_steps, round(float(diff.max()) / step, 3))
                total, count = total + float(diff.sum()), count + diff.numel()
                differing += float((diff > step / 2).sum())
                reference = max(reference, float((fq_head - int_head).abs().max()))
            boxes = max(boxes, float((outs[-1] - decoded).abs().max()))
    finally:
        qm.graph_module.train(was_training)
    return OnnxCheck(worst, total / max(count, 1), worst_steps, differing / max(count, 1), boxes,
                     tuple(outs[-1].shape), reference)


def _head_grids(qm) -> list[Grid]:
    gm = qm.graph_module
    grids = tensor_grids(gm)
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    return [grids[n] for n in pytree.tree_leaves(output.args[0]) if isinstance(n, fx.Node)]


def optimized_ops(path) -> collections.Counter:
    """Op types in the graph ONNX Runtime runs for ``path`` after its optimizations."""
    with tempfile.TemporaryDirectory(prefix="yoloq-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        onnx_session(path, optimized_path=optimized)
        return collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)


def fused_convs(path, counts: collections.Counter | None = None) -> tuple[int, int]:
    """(QLinearConv, Conv + FusedConv) in the graph ONNX Runtime runs for ``path`` (or in its
    ``optimized_ops`` counts): how many convolutions it fused into integer kernels."""
    counts = optimized_ops(path) if counts is None else counts
    return counts["QLinearConv"], counts["Conv"] + counts["FusedConv"]
