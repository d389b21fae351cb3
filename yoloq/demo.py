"""The main job on an embedded default: build, capture, fold, fuse, check equivalence, quantize,
lower, check, export, run in ONNX Runtime, draw.

Runs on yoloq's own tiny YOLO, and on ultralytics' YOLOv8n and YOLO11n-seg (built from their YAMLs,
random weights) when ultralytics is installed; then takes the first model through the whole chain
at W8A8 and W4A4, calibrated on random images (or on ``data``'s images when given): quantize
(SQNR, packed file size), lower to the integer graph and check it code for code against the
fake-quant graph, export QDQ ONNX and compare ONNX Runtime's heads with the integer graph's, and
write the quantized graph as an HTML page (and its SQNR / bit-width charts) to ``out``. With
``data``, it also scores FP32 and both integer graphs on the first ``eval_images`` validation
images.
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

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
    passes = ", ".join(f"{r.name}: {r.stats.get('folded', r.stats.get('fused'))}" for r in records if r.modified)
    return (
        spec, str(sum(before.values())), str(sum(after.values())),
        f"{before['BatchNorm2d']} -> {after['BatchNorm2d']}", str(after["FusedConv2d"]),
        str(len(captured.head_outputs)), str(len(captured.guards)), passes, f"{seconds:.2f}",
        f"{diff:.1e}", "ok" if _close(captured(x), model(x)) and _close(captured(x2), model(x2)) else "MISMATCH",
    )


def _calibration(data: str | None, size: int) -> list[torch.Tensor] | str:
    if data:
        return data
    return [torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def chain_one(spec: str, recipe: str, size: int, data: str | None, out: Path, eval_images: int) -> tuple[str, ...]:
    """quantize -> save -> lower -> check_integer -> export_onnx -> check_onnx -> viz, one row."""
    from yoloq.passes.check_integer import check_integer
    from yoloq.passes.check_onnx import check_onnx
    from yoloq.passes.export_onnx import export_onnx
    from yoloq.passes.lower_to_integer import lower
    from yoloq.quantize import calibration_batches
    from yoloq.tools.viz import plot_report, render_html

    model = load_model(spec).eval()
    start = time.perf_counter()
    batches = calibration_batches(_calibration(data, size), num_images=16, imgsz=size)
    qm = quantize(model, recipe, calib=batches)
    heads = [r.sqnr_db for r in qm.report.by_role("activation") if "head" in r.role]
    stem = out / f"{Path(spec).stem}-{recipe}"
    saved = save(qm, f"{stem}.yq")
    lowered = lower(qm)
    check = check_integer(lowered, qm, batches[0][:2])
    export_onnx(qm, f"{stem}.onnx", imgsz=size)
    ort = check_onnx(f"{stem}.onnx", lowered, qm, [batches[0][:1]])
    render_html(qm, f"{stem}.html", collapse_depth="auto", title=f"{spec} {recipe}")
    plot_report(qm.report, out / f"{Path(spec).stem}-{recipe}-charts")
    score = "-"
    if data and eval_images:
        from yoloq.tools.evaluate import evaluate

        score = f"{evaluate(lowered, data, imgsz=size, max_images=eval_images).map50_95:.3f}"
    return (spec, recipe, f"{min(heads):.1f}", f"{saved.file_bytes / 1e3:.0f} kB", f"{saved.ratio:.1f}x",
            f"{check.differing}", f"{ort.integer_distance:.2g} ({ort.differing:.1%})", score,
            f"{time.perf_counter() - start:.1f}")


def main(models: list[str] | None = None, size: int = 640, second: int = 320, data: str | None = None,
         out: str = "yoloq-demo", eval_images: int = 16) -> int:
    models = models or default_models()
    rows = [run_one(spec, size, second) for spec in models]
    header = ("model", "nodes", "after", "BN", "fused", "heads", "guards", "passes", "s", "max|diff|", "check")
    print(f"capture -> fold_conv_bn -> fuse_conv_act; outputs compared with the eager model at {size} and {second}")
    print(format_table(header, rows))
    qsize = size if data else min(size, 320)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    qrows = [chain_one(models[0], recipe, qsize, data, folder, eval_images) for recipe in ("w8a8", "w4a4")]
    print(f"\nquantize -> lower -> check_integer -> export_onnx -> ONNX Runtime, at {qsize} "
          f"(calibration: {data or 'random images'})")
    qheader = ("model", "recipe", "head SQNR dB", "saved", "vs FP32", "integer vs fake-quant: differing codes",
               "ORT vs integer heads: max|diff| (share)", f"integer mAP50-95 ({eval_images} images)", "s")
    print(format_table(qheader, qrows))
    if data and eval_images:
        from yoloq.tools.evaluate import evaluate

        fp32 = evaluate(load_model(models[0]).eval(), data, imgsz=qsize, max_images=eval_images).map50_95
        print(f"FP32 mAP50-95 on the same {eval_images} images: {fp32:.3f}")
    print(f"\nwritten to {folder}/: packed models (.yq), ONNX files, graph pages (.html: open in a browser), "
          "SQNR and bit-width charts")
    captured_ok = all(r[-1] == "ok" for r in rows)
    exact = all(r[5] == "0" for r in qrows)
    return 0 if captured_ok and exact else 1
