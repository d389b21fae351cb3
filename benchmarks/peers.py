"""Post-training quantization of the same model on the same calibration images by peer tools.

Each peer returns an ``nn.Module`` that ``yoloq.tools.evaluate`` runs like the float model, so
``benchmarks/ptq.py`` can put peers and yoloq in one table. Every peer quantizes the same part of
the detector that yoloq does, the network up to and including the raw head convolutions (input,
weights and every activation in 8 bits); the box decoder (sigmoid, grids, anchors, concat)
stays in float, as in yoloq, because it packs pixel boxes (0..640) and scores (0..1) into one
tensor that no single 8-bit scale can hold.

``onnxruntime_static``  TorchScript ONNX export (opset 17, dynamic batch, height and width),
    ``quant_pre_process``, ``quantize_static`` (QDQ, per channel, uint8 activations, int8
    weights, MinMax or Percentile calibration), run by an ``InferenceSession`` on the CPU.
    ``nodes_to_exclude`` names the decoder's nodes: those that are not a Conv and feed no Conv.
``torch_ao_fx``  ``prepare_fx`` / ``convert_fx`` with the "x86" QConfigMapping. By default on the
    yoloq-captured network (``captured.decoder`` runs the float decoder after it); ``graph="eager"``
    prepares the whole eager model, which traces, but torch.ao then also quantizes the decoder.

    python benchmarks/peers.py [--data D] [--weights W] [--imgsz 640] [--calib 32] [--skip-eager]

prints one JSON line: mAP50-95 / mAP50 on the data's val split for fp32 and each peer, seconds.
yolov5n, COCO128, 640, 32 calibration images, 2 shared CPU cores (10 min, peak RSS 9.5 GB: the
Percentile calibrator keeps every intermediate tensor of all 32 images before binning them):
fp32 0.353 / 0.555, onnxruntime MinMax 0.333 / 0.537, Percentile 0.341 / 0.538, torch.ao on the
captured network 0.317 / 0.513 (x86 qconfig: 7-bit activations, reduce_range), torch.ao on the
eager model 0.000 / 0.000 (its int8 decoder puts scores and pixel boxes on one scale).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from yoloq.models.checkpoint import load
from yoloq.passes.capture import capture
from yoloq.passes.check_onnx import onnx_session
from yoloq.passes.concrete_tracer import GuardCheck
from yoloq.tools.data import YoloDataset
from yoloq.tools.evaluate import evaluate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class _Prediction(nn.Module):
    """The eval output's first element (B x N x no), the only output the ONNX graph keeps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.model(x)
        return output[0] if isinstance(output, (tuple, list)) else output


def export_onnx(model: nn.Module, path: Path, imgsz: int) -> None:
    """TorchScript export (``dynamo=False``: the dynamo exporter needs onnxscript). YOLOv5's
    Detect builds its grids from ``p.shape``; traced with dynamic axes those stay shape ops, so
    the graph runs at any letterboxed H x W (evaluation feeds e.g. 1 x 3 x 480 x 640)."""
    wrapper = _Prediction(model).eval()  # export restores the wrapper's flag, so it must be eval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and trace warnings
        torch.onnx.export(wrapper, (torch.zeros(1, 3, imgsz, imgsz),), str(path), dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["pred"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "pred": {0: "batch", 1: "anchors"}})


def decoder_nodes(onnx_model) -> list[str]:
    """Names of the nodes that are not a Conv and feed no Conv: the float box decoder."""
    producer = {out: node for node in onnx_model.graph.node for out in node.output}
    network, stack = set(), [n for n in onnx_model.graph.node if n.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if node.name not in network:
            network.add(node.name)
            stack += [producer[i] for i in node.input if i in producer]
    return [n.name for n in onnx_model.graph.node if n.name not in network]


class _CalibrationReader(CalibrationDataReader):
    """One calibration image per ``get_next``, then None."""

    def __init__(self, images: list[torch.Tensor], input_name: str):
        self._feeds = iter([{input_name: image.numpy().astype(np.float32)} for image in images])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


class OnnxRuntimeModule(nn.Module):
    """forward(x: B x 3 x H x W float) -> the session's prediction as a torch tensor.

    Holds the TemporaryDirectory with the ONNX files, so they live exactly as long as the module.
    """

    def __init__(self, path: Path, workdir: tempfile.TemporaryDirectory | None = None, spinning: bool = True):
        super().__init__()
        self.session = onnx_session(path, torch.get_num_threads(), spinning=spinning)
        self.input_name = self.session.get_inputs()[0].name
        self.workdir = workdir

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def onnxruntime_static(model: nn.Module, calib: list[torch.Tensor], imgsz: int, method: str,
                       dir: str | Path | None = None, preprocess: bool = True) -> nn.Module:
    """onnxruntime ``quantize_static`` of ``model``; ``method`` is "minmax" or "percentile"
    (onnxruntime's default 99.999th percentile, 2048 bins). Files go to ``dir``, or to a
    temporary directory that the returned module keeps alive."""
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"method must be one of {sorted(methods)}, got {method!r}")
    workdir = None if dir is not None else tempfile.TemporaryDirectory(prefix="yoloq-peers-")
    root = Path(dir if dir is not None else workdir.name)
    float_path, prepared_path, quant_path = (root / f"{n}.onnx" for n in ("float", "pre", method))
    export_onnx(model, float_path, imgsz)
    if preprocess:  # ONNX shape inference + onnxruntime's basic optimizations (455 -> 335 nodes,
        # same mAP). Symbolic shape inference fails on the decoder's shape-built grids and then
        # dumps sym_shape_infer_temp.onnx into the working directory, so it is skipped.
        quant_pre_process(str(float_path), str(prepared_path), skip_symbolic_shape=True)
    else:
        prepared_path = float_path
    prepared = onnx.load(str(prepared_path))
    with contextlib.redirect_stdout(sys.stderr):  # the calibrators print progress to stdout
        quantize_static(
            str(prepared_path), str(quant_path),
            _CalibrationReader(calib, prepared.graph.input[0].name),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=methods[method],
            nodes_to_exclude=decoder_nodes(prepared))
    return OnnxRuntimeModule(quant_path, workdir).eval()


class _QuantizedNetwork(nn.Module):
    """forward(x) = decoder(converted(x)): the int8 network, then the float decoder."""

    def __init__(self, converted: nn.Module, decoder: nn.Module):
        super().__init__()
        self.converted = converted
        self.decoder = decoder

    def forward(self, x: torch.Tensor):
        return self.decoder(self.converted(x))


def _count_quantized_convs(module: nn.Module) -> tuple[int, int]:
    """(quantized Conv2d modules, all Conv2d modules) of a converted graph; the fused intrinsic
    quantized convs (ConvReLU2d, ...) subclass the quantized Conv2d."""
    from torch.ao.nn import quantized as nnq

    quantized = sum(isinstance(m, nnq.Conv2d) for m in module.modules())
    floats = sum(type(m) is nn.Conv2d for m in module.modules())
    return quantized, quantized + floats


def _ptq_fx(module: nn.Module, calib: list[torch.Tensor], example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    # A GuardCheck only re-checks a shape decision and returns None: keep it opaque to the tracer.
    custom = PrepareCustomConfig().set_non_traceable_module_classes([GuardCheck])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation and reduce_range warnings
        prepared = prepare_fx(module.eval(), get_default_qconfig_mapping("x86"), (example,),
                              prepare_custom_config=custom)
        with torch.no_grad():
            for image in calib:
                prepared(image)
        return convert_fx(prepared).eval()


def torch_ao_fx(model: nn.Module, calib: list[torch.Tensor], example: torch.Tensor,
                graph: str = "captured") -> tuple[nn.Module | None, str]:
    """torch.ao FX post-training quantization (x86 engine, HistogramObserver activations,
    per-channel weights) of ``graph``: "captured" (the yoloq-captured network, float decoder
    after it) or "eager" (the whole model, decoder included). Returns (module, reason): the
    reason says which graph was quantized and "N of M Conv2d quantized"; the module is None and
    the reason holds the errors when no graph could be prepared. "captured" falls back to
    "eager" when capture or prepare fails."""
    if graph not in ("captured", "eager"):
        raise ValueError(f"graph must be 'captured' or 'eager', got {graph!r}")
    errors = []
    if graph == "captured":
        try:
            captured = capture(model, example)
            converted = _ptq_fx(captured.graph_module, calib, example)
            done, total = _count_quantized_convs(converted)
            return (_QuantizedNetwork(converted, captured.decoder).eval(),
                    f"captured network: {done} of {total} Conv2d quantized")
        except Exception as exc:  # reported, then the eager model is tried
            errors.append(f"captured network: {type(exc).__name__}: {exc}")
    try:
        converted = _ptq_fx(copy.deepcopy(model), calib, example)
        done, total = _count_quantized_convs(converted)
        return converted, "; ".join(errors + [f"eager model: {done} of {total} Conv2d quantized"])
    except Exception as exc:  # the point is to report why the peer cannot quantize the model
        errors.append(f"eager model: {type(exc).__name__}: {exc}")
        return None, "; ".join(errors)


def _metrics(module: nn.Module, data: str, imgsz: int) -> dict:
    start = time.perf_counter()
    metrics = evaluate(module, data, imgsz=imgsz)
    return {"map50_95": round(metrics.map50_95, 4), "map50": round(metrics.map50, 4),
            "eval_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "coco128" / "data.yaml"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "yolov5n.pt"))
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--calib", type=int, default=32, help="first N train images calibrate")
    parser.add_argument("--skip-eager", action="store_true", help="no torch.ao eager-model entry")
    args = parser.parse_args()
    model = load(args.weights)
    calib = [images for images, _, _ in YoloDataset(args.data, "train", imgsz=args.imgsz, batch=1,
                                                     rect=False, max_images=args.calib).batches()]
    figures = {"model": Path(args.weights).name, "data": Path(args.data).parent.name,
               "imgsz": args.imgsz, "calib_images": len(calib), "threads": torch.get_num_threads()}
    figures["fp32"] = _metrics(model, args.data, args.imgsz)
    for method in ("minmax", "percentile"):
        start = time.perf_counter()
        module = onnxruntime_static(model, calib, args.imgsz, method)
        entry = {"quantize_s": round(time.perf_counter() - start, 1)}
        figures[f"onnxruntime_{method}"] = {**_metrics(module, args.data, args.imgsz), **entry}
    for graph in ("captured",) if args.skip_eager else ("captured", "eager"):
        start = time.perf_counter()
        module, reason = torch_ao_fx(model, calib, calib[0], graph=graph)
        key = "torch_ao_fx" if graph == "captured" else "torch_ao_fx_eager"
        if module is None:
            figures[key] = {"error": reason}
            continue
        entry = {"quantize_s": round(time.perf_counter() - start, 1), "reason": reason}
        figures[key] = {**_metrics(module, args.data, args.imgsz), **entry}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
