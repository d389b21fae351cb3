"""Quantization-aware training of yolov5n.pt on COCO128: mAP before and after, one JSON line per row.

Every row starts from the same float checkpoint, calibrates on the same 32 images, and trains with
the same seed, data order and step budget, then is evaluated on all 128 images — COCO128 is both
the training and the evaluation set here (train = val), so the figures measure how much accuracy
QAT recovers from the quantization error, not generalisation.

Rows (the seed paper's ablation, "Reducing the side-effects of oscillations in training of
quantized YOLO networks", plus Nagel et al. 2022's dampening and freezing):
  lsq                     w4a4 preset (LSQ weights and activations, first/head layers 8-bit), BN kept
                          as its own op after each quantized conv (the seed paper's choice)
  lsq-bn-folded           the same with BN-folding simulation (``qat_batchnorm: fold_simulated``)
  dampening               + oscillation dampening loss (weight ``--dampening``, cosine-ramped)
  freezing                + iterative freezing (threshold annealed ``--freeze`` start -> end)
  ema                     + EMA of weights, BN statistics and scales (evaluated on the EMA copy)
  ema-qc                  + EMA, then QC (one epoch of per-channel γ, β, Adam 1e-4, all else frozen)
  ema-freeze-bnre-qc      + EMA and freezing, then BN re-estimation and QC
  w3a3-ema-freeze-bnre-qc the last row at W3A3

At CPU scale the run is hundreds of steps, not the paper's 300 epochs, so the EMA uses a decay
ramp of a fifth of the run (``--ema-decay`` 0.999 by default, τ = steps / 5) instead of α = 0.9999
over 2000 steps, which would leave the average at the starting weights; the same budget, seed and
data order hold for every row.

    python benchmarks/qat.py [--rows lsq,ema,...] [--epochs 10] [--imgsz 320] [--batch 8]
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


# row -> (recipe, QATConfig fields beyond the shared budget, correction after training)
ROWS = {
    "lsq": ("w4a4", {}, None),
    "lsq-bn-folded": (recipe_with("w4a4", qat_batchnorm="fold_simulated"), {}, None),
    "dampening": ("w4a4", {"dampening": "D"}, None),
    "freezing": ("w4a4", {"freeze": "F"}, None),
    "ema": ("w4a4", {"ema": True}, None),
    "ema-qc": ("w4a4", {"ema": True}, {"bn_batches": 0, "qc": True}),
    "ema-freeze-bnre-qc": ("w4a4", {"ema": True, "freeze": "F"}, {"bn_batches": 8, "qc": True}),
    "w3a3-ema-freeze-bnre-qc": ("w3a3", {"ema": True, "freeze": "F"}, {"bn_batches": 8, "qc": True}),
}


def row_config(extra: dict, args, steps: int) -> QATConfig:
    fields = {"epochs": args.epochs, "batch": args.batch, "imgsz": args.imgsz, "lr": args.lr,
              "scale_lr": args.scale_lr, "seed": args.seed, "max_steps": args.max_steps}
    if extra.get("ema"):
        fields.update(ema=True, ema_decay=args.ema_decay, ema_tau=max(steps / 5, 1.0))
    if "dampening" in extra:
        fields["dampening"] = args.dampening
    if "freeze" in extra:
        fields["freeze_from"], fields["freeze_to"] = args.freeze
    return QATConfig(**fields)


def run_row(name: str, args) -> dict:
    data = str(args.data)
    recipe, extra, correction = ROWS[name]
    start = time.perf_counter()
    qm = yoloq.prepare_qat(load_model(str(args.weights)), recipe, calib=data, num_images=args.calib,
                           imgsz=args.imgsz)
    before = None if args.skip_before else yoloq.evaluate(qm, data, imgsz=args.imgsz)
    steps = args.max_steps or args.epochs * -(-128 // args.batch)
    result = train_qat(qm, data, row_config(extra, args, steps), progress=args.progress)
    model, row = result.model, {}
    if correction is not None:
        after_qat = yoloq.evaluate(model, data, imgsz=args.imgsz)
        row.update(map50_95_qat=round(after_qat.map50_95, 4), map50_qat=round(after_qat.map50, 4))
        try:
            model = yoloq.correct(model, data, imgsz=args.imgsz, batch=args.batch, seed=args.seed,
                                  progress=args.progress, **correction)
        except ValueError as exc:  # a row that cannot correct reports why, keeping its QAT figures
            row["correct_error"] = str(exc)[:300]
    after = yoloq.evaluate(model, data, imgsz=args.imgsz)
    return {"benchmark": "qat", "row": name, "imgsz": args.imgsz, "epochs": args.epochs, "steps": result.steps,
            "batch": args.batch, "lr": args.lr, "scale_lr": args.scale_lr,
            **({} if before is None else {"map50_95_before": round(before.map50_95, 4),
                                          "map50_before": round(before.map50, 4)}), **row,
            "map50_95": round(after.map50_95, 4), "map50": round(after.map50, 4),
            "oscillating": round(result.oscillation["oscillating"], 5),
            "frozen": round(result.oscillation["frozen"], 5), "train_s": round(result.seconds, 1),
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
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--dampening", type=float, default=1.0, help="weight of the mean dampening term")
    parser.add_argument("--freeze", type=float, nargs=2, default=(0.04, 0.01), help="threshold start end")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--skip-before", action="store_true", help="do not evaluate the calibrated start")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {list(ROWS)}")
        print(json.dumps(run_row(name, args)), flush=True)


if __name__ == "__main__":
    main()
