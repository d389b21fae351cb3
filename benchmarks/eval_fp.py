"""Full-precision yolov5n on COCO128: mAP and throughput at 640 and 320, as one JSON line.

Settings are YOLOv5 val's (conf 0.001, IoU 0.6, rectangular, batch 1 by default). images/s is
over the whole ``evaluate`` call: decoding, letterbox, forward, NMS and pycocotools scoring. The
official YOLOv5 code gives 0.352 / 0.552 (mAP50-95 / mAP50) at 640, batch 1.

    python benchmarks/eval_fp.py [--data D] [--weights W] [--batch B]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from yoloq.models.checkpoint import load
from yoloq.tools.data import YoloDataset
from yoloq.tools.evaluate import evaluate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "coco128" / "data.yaml"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "yolov5n.pt"))
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    model = load(args.weights)
    images = len(YoloDataset(args.data, "val"))
    figures = {"model": Path(args.weights).name, "data": Path(args.data).parent.name,
               "images": images, "batch": args.batch, "device": "cpu",
               "threads": torch.get_num_threads()}
    evaluate(model, args.data, imgsz=320, batch=args.batch, max_images=4)  # warm-up, GT cache
    for imgsz in (640, 320):
        start = time.perf_counter()
        metrics = evaluate(model, args.data, imgsz=imgsz, batch=args.batch)
        seconds = time.perf_counter() - start
        figures[f"map50_95@{imgsz}"] = round(metrics.map50_95, 4)
        figures[f"map50@{imgsz}"] = round(metrics.map50, 4)
        figures[f"images_per_s@{imgsz}"] = round(images / seconds, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
