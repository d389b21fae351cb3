"""The integer graph against the fake-quant graph's evaluation form, code for code, and their mAP.

For each row: quantize (calibration on the first ``--calib`` COCO128 train images), ``yoloq.lower``,
``yoloq.check_integer`` over ``--images`` COCO128 images (every tensor's codes compared), then
mAP50-95 on the same images of the integer graph, of the evaluation form (the fake-quant graph
with the integer graph's dyadic multipliers and rounding) and of the training-time float
fake-quant graph. The integer graph and the evaluation form must agree exactly (``differing`` 0,
equal mAP); ``eval_vs_float_map`` is how far the evaluation form's mAP is from the float
fake-quant's. yolov8n and yolo11n are built from their YAMLs with random weights (their mAP is 0;
the codes are what is checked). One JSON line per row.

    python benchmarks/integer_check.py [--rows yolov5n-w8a8,...] [--images 16] [--imgsz 640]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import yoloq
from yoloq.passes.check_integer import float_ops
from yoloq.quantize import calibration_batches
from yoloq.sources import load_model
from yoloq.tools.data import YoloDataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ROWS = {"yolov5n-w8a8": ("yolov5n.pt", "w8a8"), "yolov5n-w4a4": ("yolov5n.pt", "w4a4"),
        "yolov5n-w3a3": ("yolov5n.pt", "w3a3"), "yolov8n-w8a8": ("yolov8n.yaml", "w8a8"),
        "yolo11n-w8a8": ("yolo11n.yaml", "w8a8")}


def _images(data: str, imgsz: int, count: int) -> list[torch.Tensor]:
    """The first ``count`` validation images, letterboxed to squares, one per batch."""
    dataset = YoloDataset(data, "val", imgsz=imgsz, batch=1, rect=False, max_images=count)
    return [batch[0] for batch in dataset.batches()]


def run_row(name: str, args) -> dict:
    spec, recipe = ROWS[name]
    model = load_model(str(SHARED / "weights" / spec) if spec.endswith(".pt") else spec).eval()
    start = time.perf_counter()
    qm = yoloq.quantize(model, recipe, calib=calibration_batches(args.data, args.calib, args.imgsz))
    lowered = yoloq.lower(qm)
    images = _images(args.data, args.imgsz, args.images)
    check = yoloq.check_integer(lowered, qm, images)
    maps = {}
    for label, m in (("integer", lowered), ("eval_form", yoloq.eval_form(qm)), ("float_fake_quant", qm)):
        maps[label] = yoloq.evaluate(m, args.data, imgsz=args.imgsz, max_images=args.images, rect=False).map50_95
    return {"row": name, "differing": check.differing, "tensors": len(check.rows),
            "codes": sum(r.elements for r in check.rows), "float_ops": len(float_ops(lowered, images[0])),
            "int64_layers": len(lowered.stats.get("int64_layers", [])),
            **{f"map_{k}": round(v, 4) for k, v in maps.items()},
            "integer_equals_eval_form": maps["integer"] == maps["eval_form"],
            "eval_vs_float_map": round(maps["eval_form"] - maps["float_fake_quant"], 4),
            "verdict": check.verdict, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "coco128" / "data.yaml"))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--imgsz", type=int, default=640)
    args = parser.parse_args()
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"--rows: unknown row {name!r}; rows are {', '.join(ROWS)}")
        print(json.dumps(run_row(name, args)), flush=True)


if __name__ == "__main__":
    main()
