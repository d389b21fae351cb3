"""The ``yoloq`` command line: one verb per stage of the pipeline that exists so far."""
from __future__ import annotations

import argparse
import sys

import torch

from yoloq.passes.concrete_tracer import CaptureError, GuardError
from yoloq.pipeline import PassError
from yoloq.tools.qat_hook import TrainingDiverged


def _graph(args: argparse.Namespace) -> int:
    from yoloq.graph_table import format_graph
    from yoloq.passes.capture import capture
    from yoloq.pipeline import build_pipeline, run_pipeline
    from yoloq.sources import load_model

    model = load_model(args.model)
    captured = capture(model, torch.rand(1, 3, args.imgsz, args.imgsz))
    gm, records = run_pipeline(captured.graph_module, build_pipeline(args.stage))
    print(format_graph(gm))
    print(f"\n{len(gm.graph.nodes)} nodes; head outputs: {', '.join(captured.head_outputs)}")
    if captured.aux_outputs:
        print(f"aux outputs for the decoder: {', '.join(captured.aux_outputs)}")
    for r in records:
        print(f"{r.name}: {r.stats} in {r.seconds * 1000:.1f} ms")
    if args.guards:
        for g in captured.guards:
            print("guard:", g.describe())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from yoloq.demo import main

    return main(args.model or None, args.imgsz, data=args.data)


def _eval(args: argparse.Namespace) -> int:
    from yoloq.tools.evaluate import main_eval

    return main_eval(args)


def _quantize(args: argparse.Namespace) -> int:
    from yoloq.quantize import quantize
    from yoloq.sources import load_model
    from yoloq.storage import save

    model = load_model(args.model)
    qm = quantize(model, args.recipe, calib=args.data, num_images=args.calib_images, imgsz=args.imgsz,
                  batch=args.batch)
    print(qm.report.format())
    if args.output:
        size = save(qm, args.output)
        print(f"\nsaved {args.output}: {size.file_bytes} bytes, {size.ratio:.2f}x smaller than the FP32 state_dict")
    if args.eval:
        from yoloq.tools.evaluate import evaluate, format_metrics

        print(format_metrics(evaluate(qm, args.data, imgsz=args.imgsz)))
    return 0


def _qat(args: argparse.Namespace) -> int:
    from yoloq.tools.qat import main_qat

    return main_qat(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yoloq", description="Quantize YOLO detectors with a torch.fx pass pipeline.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    graph = verbs.add_parser("graph", help="print the captured graph: node, op, target, output shape, creating pass")
    graph.add_argument("model", help="a tiny model (tiny-yolo), a zoo name, an ultralytics YAML, or a checkpoint")
    graph.add_argument("--stage", default="fused", help="captured, folded or fused (default: fused)")
    graph.add_argument("--imgsz", type=int, default=640)
    graph.add_argument("--guards", action="store_true", help="also list the decisions taken from example values")
    graph.set_defaults(run=_graph)
    demo = verbs.add_parser("demo", help="run the pipeline on the embedded default models and check it")
    demo.add_argument("--model", action="append", help="model to use instead of the defaults (repeatable)")
    demo.add_argument("--imgsz", type=int, default=640)
    demo.add_argument("--data", help="data.yaml to calibrate on (e.g. with --model a checkpoint)")
    demo.set_defaults(run=_demo)
    from yoloq.tools.evaluate import add_eval_arguments

    quant = verbs.add_parser("quantize", help="post-training quantization: calibrate, report, save")
    quant.add_argument("--model", required=True, help="checkpoint (.pt), zoo name or ultralytics YAML")
    quant.add_argument("--recipe", default="w8a8", help="preset name (w8a8, w4a8, w4a4, w3a3, ...) or recipe YAML")
    quant.add_argument("--data", required=True, help="data.yaml whose train images calibrate (and --eval evaluates)")
    quant.add_argument("--calib-images", type=int, default=32, help="number of calibration images")
    quant.add_argument("--imgsz", type=int, default=640)
    quant.add_argument("--batch", type=int, default=8, help="calibration batch size")
    quant.add_argument("-o", "--output", help="write the quantized model here (packed integer weights)")
    quant.add_argument("--eval", action="store_true", help="also evaluate the quantized model on the data's val split")
    quant.set_defaults(run=_quantize)
    evaluate = verbs.add_parser("eval", help="COCO mAP of a model on a YOLO-format dataset (pycocotools)")
    add_eval_arguments(evaluate).set_defaults(run=_eval)
    qat = verbs.add_parser("qat", help="quantization-aware training (LSQ, BN kept), resumable, torchrun-ready")
    from yoloq.tools.qat import add_qat_arguments

    add_qat_arguments(qat)
    qat.set_defaults(run=_qat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, TypeError, PassError, CaptureError, GuardError, TrainingDiverged) as exc:
        print(f"yoloq {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
