"""Post-training quantization of yolov5n.pt on COCO128: accuracy and memory, one JSON line per row.

Rows: FP32; W8A8 (per-channel); W4A8 and W4A4 with the weight grids the "Quantizing YOLOv7"
study compares (uniform per-tensor, per-channel, per-group of 8 channels, power-of-two, APoT, a
k-means codebook), first and head layers at 8-bit weights as in the presets; then the peers in the
same run: ONNX Runtime ``quantize_static`` (QDQ, per-channel, MinMax and Percentile) and torch.ao
FX PTQ (see ``benchmarks/peers.py``). Calibration: the first 32 images of COCO128's train list at
640; evaluation: all 128 images at 640 (batch 1, rectangular), so train = val here. ``memory_ratio``
is the FP32 state_dict's size over ``yoloq.save``'s file (packed codes, LZMA).

    python benchmarks/ptq.py [--rows w8a8,w4a4-apot,...] [--no-peers] [--calib 32] [--imgsz 640]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


import yoloq
from yoloq.quantize import calibration_batches
from yoloq.recipe import Recipe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHT_GRIDS = {
    "uniform-per-tensor": {"granularity": "per_tensor"},
    "uniform-per-channel": {"granularity": "per_channel"},
    "uniform-per-group8": {"granularity": "per_group", "group_size": 8},
    "pot": {"granularity": "per_channel", "scheme": "pot"},
    "apot": {"granularity": "per_channel", "scheme": "apot"},
    "codebook": {"granularity": "per_channel", "scheme": "codebook"},
}


def recipes() -> dict[str, Recipe]:
    """Row name -> recipe: the w4a8 / w4a4 presets (first and head layers at 8 bits) with each
    weight grid in turn, rounded to nearest (the grids compared alike), then the uniform
    per-channel grid with GPTQ's rounding (``passes/gptq.py``; the w4a8 preset's own choice). LSQ
    flags in the presets change nothing here: PTQ does not train."""
    rows = {"w8a8-per-channel": Recipe.preset("w8a8")}
    for base in ("w4a8", "w4a4"):
        preset = Recipe.preset(base).to_dict()
        for grid, fields in WEIGHT_GRIDS.items():
            weight = {"bits": 4, "signed": True, "symmetric": True, "observer": "mse", **fields}
            rows[f"{base}-{grid}"] = Recipe.from_dict({**preset, "name": f"{base}-{grid}", "weight": weight,
                                                       "weight_rounding": "nearest"})
        per_channel = rows[f"{base}-uniform-per-channel"].to_dict()
        rows[f"{base}-uniform-per-channel-gptq"] = Recipe.from_dict(
            {**per_channel, "name": f"{base}-uniform-per-channel-gptq", "weight_rounding": "gptq"})
    return rows


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def evaluate_row(name: str, model, data: Path, imgsz: int, started: float, **extra) -> None:
    metrics = yoloq.evaluate(model, data, imgsz=imgsz)
    emit({"row": name, "map50_95": round(metrics.map50_95, 4), "map50": round(metrics.map50, 4), **extra,
          "seconds": round(time.perf_counter() - started, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(SHARED / "weights" / "yolov5n.pt"))
    parser.add_argument("--data", default=str(SHARED / "coco128" / "data.yaml"))
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    data = Path(args.data)
    model = yoloq.models.load(args.weights)
    calib = calibration_batches(data, num_images=args.calib, imgsz=args.imgsz, batch=8)
    wanted = set(filter(None, args.rows.split(",")))
    start = time.perf_counter()
    evaluate_row("fp32", model, data, args.imgsz, start, memory_ratio=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in recipes().items():
            if wanted and name not in wanted:
                continue
            start = time.perf_counter()
            qm = yoloq.quantize(model, recipe, calib=calib)
            size = yoloq.save(qm, Path(tmp) / f"{name}.yq")
            evaluate_row(name, qm, data, args.imgsz, start, memory_ratio=round(size.ratio, 2),
                         file_bytes=size.file_bytes)
    if not args.no_peers:
        run_peers(model, calib, data, args.imgsz)


def run_peers(model, calib, data: Path, imgsz: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import peers

    images = [image[None] for batch in calib for image in batch]
    for method in ("minmax", "percentile"):
        start = time.perf_counter()
        evaluate_row(f"onnxruntime-qdq-{method}", peers.onnxruntime_static(model, images, imgsz, method),
                     data, imgsz, start)
    start = time.perf_counter()
    converted, *why = peers.torch_ao_fx(model, images, images[0])
    if converted is None:
        emit({"row": "torch-ao-fx", "error": " ".join(map(str, why))})
    else:
        evaluate_row("torch-ao-fx", converted, data, imgsz, start, note=" ".join(map(str, why)))


if __name__ == "__main__":
    main()
