"""The main job on an embedded default: build, capture, fold, fuse, check equivalence, quantize.

Runs on yoloq's own tiny YOLO, and on ultralytics' YOLOv8n and YOLO11n-seg (built from their YAMLs,
random weights) when ultralytics is installed; then quantizes the first model at W8A8 and W4A4,
calibrated on random images (or on ``data``'s images when given), and reports SQNR and the packed
file size. Grows with the library: lowering and export join here as they land.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time

import torch

from yoloq.graph_table import format_table, summarise_graph
from yoloq.passes.capture import capture
from yoloq.pipeline import build_pipeline, run_pipeline
from yoloq.quantize import quantize
from yoloq.storage import save
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


def quantize_one(spec: str, recipe: str, size: int, data: str | None) -> tuple[str, ...]:
    model = load_model(spec).eval()
    calib = data if data else [torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    start = time.perf_counter()
    qm = quantize(model, recipe, calib=calib, num_images=16, imgsz=size)
    seconds = time.perf_counter() - start
    heads = [r.sqnr_db for r in qm.report.by_role("activation") if "head" in r.role]
    weights = sorted(r.sqnr_db for r in qm.report.by_role("weight"))
    with tempfile.TemporaryDirectory() as tmp:
        saved = save(qm, os.path.join(tmp, "model.yq"))
    return (spec, recipe, str(len(qm.report.rows)), f"{weights[0]:.1f} / {weights[len(weights) // 2]:.1f}",
            f"{min(heads):.1f}", f"{saved.file_bytes / 1e3:.0f} kB", f"{saved.ratio:.1f}x", f"{seconds:.2f}")


def main(models: list[str] | None = None, size: int = 640, second: int = 320, data: str | None = None) -> int:
    models = models or default_models()
    rows = [run_one(spec, size, second) for spec in models]
    header = ("model", "nodes", "after", "BN", "fused", "heads", "guards", "passes", "s", "max|diff|", "check")
    print(f"capture -> fold_conv_bn -> fuse_conv_act; outputs compared with the eager model at {size} and {second}")
    print(format_table(header, rows))
    qsize = size if data else min(size, 320)
    qrows = [quantize_one(models[0], recipe, qsize, data) for recipe in ("w8a8", "w4a4")]
    print(f"\nyoloq.quantize at {qsize} (calibration: {data or 'random images'}); SQNR against float in dB")
    qheader = ("model", "recipe", "quantizers", "weight SQNR min / median", "head output SQNR min", "saved", "vs FP32", "s")
    print(format_table(qheader, qrows))
    return 0 if all(r[-1] == "ok" for r in rows) else 1
