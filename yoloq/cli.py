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

    return main(args.model or None, args.imgsz, data=args.data, out=args.out, eval_images=args.eval_images)


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
    if args.plots:
        from yoloq.tools.viz.plots import plot_report

        print("\n" + "\n".join(f"wrote {path}" for path in plot_report(qm.report, args.plots)))
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


def _load_trained(path: str):
    """A model written by ``yoloq.save`` (an xz stream), or the model of a QAT checkpoint (last.pt)."""
    from yoloq.storage import is_saved_model, load_quantized
    from yoloq.tools.qat import load_checkpoint

    return load_quantized(path) if is_saved_model(path) else load_checkpoint(path)["model"]


def _correct(args: argparse.Namespace) -> int:
    from yoloq.passes.correct import correct
    from yoloq.storage import save
    from yoloq.tools.evaluate import evaluate

    model = _load_trained(args.model)
    if args.eval:
        before = evaluate(model, args.data, imgsz=args.imgsz)
        print(f"before correction: mAP50-95 {before.map50_95:.4f}  mAP50 {before.map50:.4f}")
    corrected = correct(model, args.data, bn_batches=args.bn_batches, qc=not args.no_qc, epochs=args.epochs,
                        lr=args.lr, imgsz=args.imgsz, batch=args.batch, max_steps=args.max_steps, seed=args.seed,
                        workers=args.workers)
    for record in corrected.records[len(getattr(model, "records", ())):]:
        print(f"{record.name}: {record.stats} in {record.seconds:.1f} s")
    size = save(corrected, args.output)
    print(f"saved {args.output}: {size.file_bytes} bytes, {size.ratio:.2f}x smaller than the FP32 state_dict")
    if args.eval:
        after = evaluate(corrected, args.data, imgsz=args.imgsz)
        print(f"after correction:  mAP50-95 {after.map50_95:.4f}  mAP50 {after.map50:.4f}")
    return 0


def _add_correct_arguments(parser: argparse.ArgumentParser) -> None:
    from yoloq.passes.correct import BN_BATCHES
    from yoloq.tools.qat import QATConfig

    defaults = QATConfig()
    parser.add_argument("--model", required=True, help="a trained model: a file of yoloq.save (runs/qat/model.yoloq) "
                                                        "or a QAT checkpoint (last.pt: its model as trained, without "
                                                        "the EMA copy that model.yoloq holds)")
    parser.add_argument("--data", required=True, help="data.yaml whose train split corrects (and --eval evaluates)")
    parser.add_argument("--bn-batches", type=int, default=BN_BATCHES, help="batches for BN re-estimation; 0 skips it")
    parser.add_argument("--no-qc", action="store_true", help="BN re-estimation only, no QC")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of QC training")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of QC's γ and β (Adam)")
    parser.add_argument("--imgsz", type=int, default=defaults.imgsz)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--max-steps", type=int, default=None, help="stop QC training after this many steps")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="data decoding threads")
    parser.add_argument("-o", "--output", required=True, help="write the corrected model here (yoloq.save format)")
    parser.add_argument("--eval", action="store_true", help="evaluate mAP before and after correction")


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
    demo.add_argument("--out", default="yoloq-demo", help="folder for the .yq, .onnx, .html and chart files")
    demo.add_argument("--eval-images", type=int, default=16, help="with --data: validation images to score")
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
    quant.add_argument("--plots", metavar="DIR", help="write per-layer SQNR and bit-width charts (PNG) into DIR")
    quant.set_defaults(run=_quantize)
    evaluate = verbs.add_parser("eval", help="COCO mAP of a model on a YOLO-format dataset (pycocotools)")
    add_eval_arguments(evaluate).set_defaults(run=_eval)
    qat = verbs.add_parser("qat", help="quantization-aware training (LSQ, BN kept), resumable, torchrun-ready")
    from yoloq.tools.qat import add_qat_arguments

    add_qat_arguments(qat)
    qat.set_defaults(run=_qat)
    fix = verbs.add_parser("correct", help="after QAT: BN re-estimation and QC (per-channel γ, β), folded")
    _add_correct_arguments(fix)
    fix.set_defaults(run=_correct)
    from yoloq.tools.integer_cli import add_export_arguments, add_lower_arguments, main_export, main_lower

    lower = verbs.add_parser("lower", help="quantize, lower to the integer graph, print its bit-exact check")
    add_lower_arguments(lower).set_defaults(run=main_lower)
    export = verbs.add_parser("export", help="quantize, write QDQ ONNX, run it in ONNX Runtime against the integer graph")
    add_export_arguments(export).set_defaults(run=main_export)
    from yoloq.tools.viz.cli import add_viz_arguments, main_viz

    viz = verbs.add_parser("viz", help="draw a pipeline stage (or two stages' diff) as an HTML page, SVG or DOT")
    add_viz_arguments(viz).set_defaults(run=main_viz)
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
