"""Capture + fold + fuse wall time for a yolov8n- and a yolov8x-sized model, as one JSON line.

Baselines measured in the same run: one eager forward pass of the same model on the same input
(capture executes the model once, so the ratio shows the tracing overhead), and
torch.fx.symbolic_trace, which fails on every ultralytics YOLO (its error is reported) and is
timed on a model it can trace (a Conv-BN-act stack) against capture of that same model.
Targets (issue 2): <= 1 s for yolov8n, <= 5 s for yolov8x on the 2-core CPU.
"""
from __future__ import annotations

import json
import statistics
import time
import warnings

import torch
import torch.fx as fx

from yoloq.models.tiny import conv_bn_act
from yoloq.passes.capture import capture
from yoloq.pipeline import build_pipeline, run_pipeline


def median_seconds(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def capture_fold_fuse(model, x):
    captured = capture(model, x)
    nodes = len(captured.graph_module.graph.nodes)
    gm, _ = run_pipeline(captured.graph_module, build_pipeline("fused"))
    return nodes, gm


def symbolic_trace_error(model) -> str | None:
    try:
        fx.symbolic_trace(model)
        return None
    except Exception as exc:  # the point is to report why it fails
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"


def measure_yolo(yaml_name: str, imgsz: int, repeat: int) -> dict:
    from ultralytics import YOLO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = YOLO(yaml_name).model.eval()
    x = torch.rand(1, 3, imgsz, imgsz)
    nodes, gm = capture_fold_fuse(model, x)
    with torch.no_grad():
        eager = median_seconds(lambda: model(x), repeat)
    seconds = median_seconds(lambda: capture_fold_fuse(model, x), repeat)
    return {
        "model": yaml_name, "imgsz": imgsz, "capture_fold_fuse_s": round(seconds, 3),
        "eager_forward_s": round(eager, 3), "ratio_to_forward": round(seconds / eager, 2),
        "nodes_captured": nodes, "nodes_fused": len(gm.graph.nodes),
        "symbolic_trace": symbolic_trace_error(model) or "ok",
    }


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    small = conv_bn_act()
    x = torch.rand(1, 3, 64, 64)
    fx_s = median_seconds(lambda: fx.symbolic_trace(small), 20)
    ours_s = median_seconds(lambda: capture(small, x), 20)
    result = {
        "benchmark": "capture",
        "yolov8n": measure_yolo("yolov8n.yaml", 640, 5),
        "yolov8x": measure_yolo("yolov8x.yaml", 640, 3),
        "conv_bn_act_stack": {
            "symbolic_trace_s": round(fx_s, 5), "capture_s": round(ours_s, 5), "ratio": round(ours_s / fx_s, 2),
        },
        "targets": {"yolov8n_s": 1.0, "yolov8x_s": 5.0},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
