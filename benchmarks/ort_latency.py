"""ONNX Runtime latency and accuracy of yoloq's QDQ export against FP32 and ORT's own static INT8.

Model yolov5n.pt at 640, batch 1, ORT CPU sessions with 2 intra-op threads, timed on 640 x 640;
calibration on the first 32 COCO128 train images, mAP on all 128 as YOLOv5's val scores them:
rectangular letterboxes at 640 (every file is exported with a free height and width;
``--square`` scores 640 x 640 letterboxes instead; train = val here).

Rows (one JSON line each; ``ratio_fp32`` and ``ratio_ort`` divide the row's median by the FP32
row's and by ORT's own INT8 row's, all timed in the same rounds):
  fp32              the float model exported by the TorchScript exporter (opset 17)
  ort-static        ``quantize_static`` of that file (QDQ, per-channel int8 weights, uint8
                    activations, MinMax; decoder excluded, as benchmarks/peers.py explains)
  yoloq-w8a8        the w8a8 preset: 16-bit pre-activations feed the activation tables, which ORT
                    cannot fuse (QLinearConv outputs 8 bits), so its convs are ConvInteger (exact
                    int32 accumulators) and the tables Gather
  yoloq-w8a8-u8pre-table  w8a8 with 8-bit unsigned pre-activations: every network conv is
                    DQ -> Conv -> Q(uint8), which ORT fuses into QLinearConv, then the integer
                    graph's table as Gather (exact, but ORT's Gather is ~10x slower than its own
                    lookup kernels)
  yoloq-w8a8-u8pre  the same model exported with ``pre_activation="qlinear"``: SiLU as
                    QLinearSigmoid + QLinearMul, the kernels ORT's own INT8 uses
  yoloq-w4a8-u8pre  4-bit weights (INT4 initializers, opset 21) with the same 8-bit activations:
                    what 4 bits buy (file size) and cost (ORT has no INT4 QLinearConv)
``vs_integer_graph_*``: ORT's head outputs against the integer graph's on one image (max and mean
|difference|, share of differing values). With ``--calib-sets N`` the two W8A8 rows (the preset's
exact export and the fast one) are also quantized, exported and scored from N disjoint 32-image
calibration sets (train images 0-31, 32-63, ...): ``map50_95_sets`` lists them and
``map50_95_mean`` is their mean. A 128-image mAP moves by a few tenths of a point under
perturbations far below a quantization step, so one calibration set cannot resolve a 0.3-point
target; the mean over four averages out the calibration draw (to about a tenth), not the sampling
of the 128 images themselves, which the intervals below measure.
``vs_fp32_points`` / ``vs_fp32_interval``: the row's mAP50-95 minus FP32's in points, with its 95%
paired bootstrap interval over the 128 images (``yoloq.map_difference``, 1000 resamples): how much
of a difference this evaluation set can tell from none; ``vs_ort_*`` the same against ORT's INT8.
``yoloq-w8a8-u8pre-fixed`` (timed only) is the fast row's model exported at a fixed 640 x 640: what
a free input size costs ORT. Plus, for the record, the integer GraphModule (``yoloq.lower``) and
the fake-quant graph in torch.

Timing: every variant is warmed up (``--warmup`` runs), then ``--runs`` rounds each run every
variant once in turn (so a slow spell of the VM hits all alike) and the median is reported. ORT's
worker threads do not spin between runs (``--spinning`` turns it back on): with several sessions
run in turn, a spinning session takes the cores of the next one, which had made ORT's own INT8 look
1.7x slower than alone (45 ms instead of 27 ms).

    python benchmarks/ort_latency.py [--runs 30] [--warmup 10] [--no-map] [--square] [--percentile] [--calib-sets 4]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (benchmarks/peers.py: the float export and ORT's quantize_static)

import yoloq  # noqa: E402
from yoloq.passes.check_onnx import OnnxModel, check_onnx, fused_convs, optimized_ops  # noqa: E402
from yoloq.quantize import calibration_batches  # noqa: E402
from yoloq.recipe import load_recipe  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclasses.dataclass
class Variant:
    name: str
    run: object  # callable(x) -> anything
    module: torch.nn.Module | None = None  # scored by yoloq.evaluate; None: timed only
    extra: dict = dataclasses.field(default_factory=dict)


def _exports() -> dict[str, tuple[object, str]]:
    """Row name -> (recipe, ``export_onnx``'s pre_activation mode)."""
    w8a8, w4a8 = load_recipe("w8a8"), load_recipe("w4a8")
    w8a8_u8 = load_recipe("w8a8-ort")  # w8a8 with 8-bit unsigned pre-activations
    w4a8_u8 = dataclasses.replace(w4a8, name="w4a8-u8pre", pre_activation=w8a8_u8.pre_activation)
    return {"yoloq-w8a8": (w8a8, "table"),
            "yoloq-w8a8-u8pre-table": (w8a8_u8, "table"),
            "yoloq-w8a8-u8pre": (w8a8_u8, "qlinear"),
            "yoloq-w4a8-u8pre": (w4a8_u8, "qlinear")}


def _onnx_variant(name: str, path: Path, module: torch.nn.Module, **extra) -> Variant:
    counts = optimized_ops(path)
    (fused, convs), integer = fused_convs(path, counts), counts["ConvInteger"]
    return Variant(name, module, module, {"fused_convs": f"{fused}/{fused + convs + integer}",
                                          "integer_convs": integer,
                                          "file_kb": round(path.stat().st_size / 1e3), **extra})


def calibration_sets(args) -> list[list[torch.Tensor]]:
    """``--calib-sets`` disjoint sets of ``--calib`` train images each (images 0-31, 32-63, ...), as
    batches of 8, from one read of the images."""
    images = torch.cat(calibration_batches(args.data, num_images=args.calib * args.calib_sets,
                                           imgsz=args.imgsz, batch=8))
    return [list(chunk.split(8)) for chunk in images.split(args.calib)]


def build(args, model: torch.nn.Module, calib: list[torch.Tensor], workdir: Path) -> tuple[list[Variant], torch.Tensor]:
    x = calib[0][:1].contiguous()
    variants = []

    peers.export_onnx(model, workdir / "fp32.onnx", args.imgsz)
    path = workdir / "fp32.onnx"
    variants.append(_onnx_variant("fp32", path, peers.OnnxRuntimeModule(path, spinning=args.spinning).eval()))

    singles = [image[None] for batch in calib for image in batch]
    for method in ("minmax", "percentile") if args.percentile else ("minmax",):
        ort_dir = workdir / f"ort-{method}"
        ort_dir.mkdir()
        peers.onnxruntime_static(model, singles, args.imgsz, method, dir=ort_dir)
        path = ort_dir / f"{method}.onnx"
        name = "ort-static" if method == "minmax" else "ort-static-percentile"
        variants.append(_onnx_variant(name, path, peers.OnnxRuntimeModule(path, spinning=args.spinning).eval()))

    quantized, lowered = {}, {}  # by recipe name: one quantization and one lowering per recipe
    for name, (recipe, mode) in _exports().items():
        if recipe.name not in quantized:
            quantized[recipe.name] = yoloq.quantize(model, recipe, calib=calib)
            lowered[recipe.name] = yoloq.lower(quantized[recipe.name]).eval()
        qm = quantized[recipe.name]
        path = workdir / f"{name}.onnx"
        report = yoloq.export_onnx(qm, path, imgsz=args.imgsz, pre_activation=mode, dynamic_size=True)
        module = OnnxModel(path, args.threads, spinning=args.spinning).eval()
        check = check_onnx(path, lowered[recipe.name], qm, [x])
        variants.append(_onnx_variant(name, path, module, export=mode, int4_weights=report.int4_weights,
                                      vs_integer_graph_max=round(check.integer_distance, 4),
                                      vs_integer_graph_mean=float(f"{check.mean_distance:.3g}"),
                                      vs_integer_graph_differing=round(check.differing, 4)))
        if name == FAST_ROW:
            fixed = workdir / f"{name}-fixed.onnx"
            yoloq.export_onnx(qm, fixed, imgsz=args.imgsz, pre_activation=mode)
            fixed_module = OnnxModel(fixed, args.threads, spinning=args.spinning).eval()
            variants.append(Variant(f"{name}-fixed", fixed_module, extra={"export": mode, "dynamic_size": False}))
    variants.append(Variant("torch-integer-graph-w8a8", lowered["w8a8"].graph_module))
    variants.append(Variant("torch-fake-quant-w8a8", quantized["w8a8"].graph_module.eval()))
    return variants, x


BASELINES = {"vs_fp32": "fp32", "vs_ort": "ort-static"}  # row key prefix -> the row every later one is compared with
FAST_ROW = "yoloq-w8a8-u8pre"  # the fast W8A8 export, also timed at a fixed size
SETS_ROWS = ("yoloq-w8a8", FAST_ROW)  # the rows --calib-sets scores from several calibration sets


def map_from_calibration_set(args, model: torch.nn.Module, row: str, calib: list[torch.Tensor], k: int,
                             workdir: Path) -> float:
    """mAP50-95 of export ``row`` (one of ``SETS_ROWS``) of ``model`` quantized from ``calib``, the
    k-th calibration set."""
    recipe, mode = _exports()[row]
    qm = yoloq.quantize(model, recipe, calib=calib)
    path = workdir / f"{row}-set{k}.onnx"
    yoloq.export_onnx(qm, path, imgsz=args.imgsz, pre_activation=mode, dynamic_size=True)
    return round(score(args, OnnxModel(path, args.threads).eval()).map50_95, 4)


def score(args, module: torch.nn.Module):
    """COCO metrics of ``module``: rectangular letterboxes as YOLOv5's val, or squares with ``--square``."""
    return yoloq.evaluate(module, args.data, imgsz=args.imgsz, rect=not args.square)


def time_variants(variants: list[Variant], x: torch.Tensor, runs: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    with torch.no_grad():
        for v in variants:
            for _ in range(warmup):
                v.run(x)
        for _ in range(runs):
            for v in variants:
                start = time.perf_counter()
                v.run(x)
                times[v.name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(SHARED / "weights" / "yolov5n.pt"))
    parser.add_argument("--data", default=str(SHARED / "coco128" / "data.yaml"))
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-map", action="store_true", help="latency only")
    parser.add_argument("--spinning", action=argparse.BooleanOptionalAction, default=False,
                        help="let ORT's worker threads spin between runs (default off: the sessions "
                             "run in turn, and a spinning one steals the next one's cores)")
    parser.add_argument("--calib-sets", type=int, default=1,
                        help="score the W8A8 exports (exact and fast) from this many disjoint calibration sets (mean)")
    parser.add_argument("--square", action="store_true",
                        help="score on 640 x 640 letterboxes instead of YOLOv5 val's rectangles")
    parser.add_argument("--percentile", action="store_true",
                        help="also ORT's Percentile calibration (slow: ~10 GB, minutes)")
    args = parser.parse_args()
    if args.calib < 1 or args.calib_sets < 1:
        parser.error(f"--calib and --calib-sets must be >= 1, got {args.calib} and {args.calib_sets}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="yoloq-ort-latency-") as tmp:
        model = yoloq.models.load(args.weights).eval()
        sets = calibration_sets(args)
        variants, x = build(args, model, sets[0], Path(tmp))
        ms = time_variants(variants, x, args.runs, args.warmup)
        baselines = {}  # the BASELINES rows' metrics, which later rows are compared with
        for v in variants:
            row = {"row": v.name, "median_ms": round(ms[v.name], 2),
                   "ratio_fp32": round(ms[v.name] / ms["fp32"], 3),
                   "ratio_ort": round(ms[v.name] / ms["ort-static"], 3), **v.extra}
            if v.module is not None and not args.no_map:
                metrics = score(args, v.module)
                row.update(map50_95=round(metrics.map50_95, 4), map50=round(metrics.map50, 4))
                for key, name in BASELINES.items():
                    if name in baselines:
                        diff = yoloq.map_difference(baselines[name], metrics)
                        row[f"{key}_points"] = round(diff.delta, 2)
                        row[f"{key}_interval"] = [round(diff.low, 2), round(diff.high, 2)]
                if v.name in BASELINES.values():
                    baselines[v.name] = metrics
                if v.name in SETS_ROWS and args.calib_sets > 1:
                    scores = [row["map50_95"]] + [map_from_calibration_set(args, model, v.name, sets[k], k, Path(tmp))
                                                  for k in range(1, args.calib_sets)]
                    row.update(map50_95_sets=scores, map50_95_mean=round(statistics.mean(scores), 4))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
