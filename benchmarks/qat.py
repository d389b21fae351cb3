"""Quantization-aware training of yolov5n.pt on COCO128: mAP before and after, one JSON line per row.

Every row starts from the same float checkpoint, calibrates on the same 32 images, and trains with
the same seed, data order and step budget, then is evaluated on all 128 images — COCO128 is both
the training and the evaluation set here (train = val), so the figures measure how much accuracy
QAT recovers from the quantization error, not generalisation.

Rows:
  lsq             the w4a4 preset (LSQ weights and activations, first/head layers 8-bit), BN kept
                  as its own op after each quantized conv (the seed paper's choice)
  lsq-bn-folded   the same with BN-folding simulation (``qat_batchnorm: fold_simulated``)

    python benchmarks/qat.py [--rows lsq,lsq-bn-folded] [--epochs 10] [--imgsz 320] [--batch 8]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import yoloq
from yoloq.recipe import Recipe
from yoloq.sources import load_model
from yoloq.tools.qat import QATConfig, train_qat

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def recipe_with(preset: str, **fields) -> Recipe:
    return Recipe.from_dict({**Recipe.preset(preset).to_dict(), **fields})


ROWS = {
    "lsq": lambda: recipe_with("w4a4"),
    "lsq-bn-folded": lambda: recipe_with("w4a4", qat_batchnorm="fold_simulated"),
}


def run_row(name: str, args) -> dict:
    data = str(args.data)
    model = load_model(str(args.weights))
    start = time.perf_counter()
    qm = yoloq.prepare_qat(model, ROWS[name](), calib=data, num_images=args.calib, imgsz=args.imgsz)
    before = yoloq.evaluate(qm, data, imgsz=args.imgsz)
    config = QATConfig(epochs=args.epochs, batch=args.batch, imgsz=args.imgsz, lr=args.lr, scale_lr=args.scale_lr,
                       seed=args.seed, max_steps=args.max_steps)
    result = train_qat(qm, data, config, progress=args.progress)
    after = yoloq.evaluate(result.model, data, imgsz=args.imgsz)
    return {"benchmark": "qat", "row": name, "imgsz": args.imgsz, "epochs": args.epochs, "steps": result.steps,
            "batch": args.batch, "lr": args.lr, "scale_lr": args.scale_lr,
            "map50_95_before": round(before.map50_95, 4), "map50_before": round(before.map50, 4),
            "map50_95": round(after.map50_95, 4), "map50": round(after.map50, 4),
            "oscillating": round(result.oscillation["oscillating"], 5), "train_s": round(result.seconds, 1),
            "total_s": round(time.perf_counter() - start, 1), "train_equals_val": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--weights", default=SHARED / "weights" / "yolov5n.pt")
    parser.add_argument("--data", default=SHARED / "coco128" / "data.yaml")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=QATConfig.lr)
    parser.add_argument("--scale-lr", type=float, default=QATConfig.scale_lr)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {list(ROWS)}")
        print(json.dumps(run_row(name, args)), flush=True)


if __name__ == "__main__":
    main()
