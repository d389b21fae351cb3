"""The main job on an embedded default: build, capture, fold, fuse, summarise, check equivalence.

Runs on yoloq's own tiny YOLO, and on ultralytics' YOLOv8n and YOLO11n-seg (built from their YAMLs,
random weights) when ultralytics is installed. Grows with the library: quantization, lowering and
export join here as they land.
"""
from __future__ import annotations

import importlib.util
import time

import torch

from yoloq.graph_table import format_table, summarise_graph
from yoloq.passes.capture import capture
from yoloq.pipeline import build_pipeline, run_pipeline
from yoloq.sources import load_model


def default_models() -> list[str]:
    extra = ["yolov8n.yaml", "yolo11n-seg.yaml"] if importlib.util.find_spec("ultralytics") else []
    return ["tiny-yolo", *extra]


def _max_diff(a, b) -> float:
    leaves = zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b))
    return max(((x - y).abs().max().item() for x, y in leaves if isinstance(x, torch.Tensor) and x.numel()), default=0.0)


def _close(a, b) -> bool:
    try:
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        return True
    except AssertionError:
        return False


def run_one(spec: str, size: int, second: int) -> tuple[str, ...]:
    model = load_model(spec).eval()
    x, x2 = torch.rand(1, 3, size, size), torch.rand(1, 3, second, second)
    start = time.perf_counter()
    captured = capture(model, x)
    before = summarise_graph(captured.graph_module)
    gm, records = run_pipeline(captured.graph_module, build_pipeline("fused"))
    seconds = time.perf_counter() - start
    captured.graph_module = gm
    after = summarise_graph(gm)
    with torch.no_grad():
        diff = max(_max_diff(captured(x), model(x)), _max_diff(captured(x2), model(x2)))
    passes = ", ".join(f"{r.name}: {r.stats.get('folded', r.stats.get('fused'))}" for r in records)
    return (
        spec, str(sum(before.values())), str(sum(after.values())),
        f"{before['BatchNorm2d']} -> {after['BatchNorm2d']}", str(after["FusedConv2d"]),
        str(len(captured.head_outputs)), str(len(captured.guards)), passes, f"{seconds:.2f}",
        f"{diff:.1e}", "ok" if _close(captured(x), model(x)) and _close(captured(x2), model(x2)) else "MISMATCH",
    )


def main(models: list[str] | None = None, size: int = 640, second: int = 320) -> int:
    rows = [run_one(spec, size, second) for spec in (models or default_models())]
    header = ("model", "nodes", "after", "BN", "fused", "heads", "guards", "passes", "s", "max|diff|", "check")
    print(f"capture -> fold_conv_bn -> fuse_conv_act; outputs compared with the eager model at {size} and {second}")
    print(format_table(header, rows))
    return 0 if all(r[-1] == "ok" for r in rows) else 1
