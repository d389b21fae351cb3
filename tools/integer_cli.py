"""``yoloq lower`` and ``yoloq export``: quantize, then the integer graph's check or the ONNX file's.

    yoloq lower  --model M --recipe R --data D [-o lowered.pt] [--check N]
    yoloq export --model M --recipe R --data D -o model.onnx [--imgsz S]

Both calibrate on the data's train images as ``yoloq quantize`` does; ``lower`` then prints the
bit-exact check of the integer graph against the fake-quant graph's evaluation form, per tensor;
``export`` writes QDQ ONNX, runs it in ONNX Runtime and prints how far its head outputs are from
the integer graph's.
"""
from __future__ import annotations

import argparse


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint (.pt), zoo name, ultralytics YAML or tiny model")
    parser.add_argument("--recipe", default="w8a8", help="preset name (w8a8, w4a8, ...) or recipe YAML")
    parser.add_argument("--data", required=True, help="data.yaml whose train images calibrate and check")
    parser.add_argument("--calib-images", type=int, default=32, help="number of calibration images")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=8, help="calibration batch size")


def add_lower_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common(parser)
    parser.add_argument("-o", "--output", help="write the LoweredModel here (torch.save; a trusted pickle)")
    parser.add_argument("--check", type=int, default=4, help="calibration images the bit-exact check runs on")
    return parser


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common(parser)
    parser.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    parser.add_argument("--opset", type=int, default=21, help="ONNX opset (21: int16 and INT4 Q/DQ; 13-20: "
                                                               "16-bit tensors stay float, 4-bit codes in int8)")
    parser.add_argument("--pre-activation", choices=("table", "keep", "drop", "qlinear"), default="table",
                        help="a fused activation as the integer graph's table over its input codes "
                             "(exact), as int16 QDQ + float activation, as a float activation, or (8-bit "
                             "pre-activations) as the QLinear kernels ONNX Runtime fuses (fastest, near)")
    parser.add_argument("--check", type=int, default=2, help="calibration images ONNX Runtime is checked on")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="free input height and width (any multiple of the largest stride), not imgsz x imgsz")
    return parser


def _quantized(args: argparse.Namespace):
    from yoloq.quantize import calibration_batches, quantize
    from yoloq.sources import load_model

    batches = calibration_batches(args.data, args.calib_images, args.imgsz, args.batch)
    qm = quantize(load_model(args.model), args.recipe, calib=batches)
    return qm, batches


def format_check(check) -> str:
    """The per-tensor table of an ``IntegerCheck`` and its verdict."""
    width = max([len("tensor")] + [len(r.tensor) for r in check.rows])
    lines = [f"{'tensor':<{width}}  {'elements':>10}  {'differing':>9}  {'share':>8}  {'max steps':>9}"]
    lines += [f"{r.tensor:<{width}}  {r.elements:>10}  {r.differing:>9}  {r.share:>8.2%}  {r.max_steps:>9}"
              for r in check.rows]
    lines.append(f"\nhead outputs, max |Δ|: evaluation form vs fake quant {check.eval_form_distance:.3g}, "
                 f"integer graph vs fake quant {check.lowered_distance:.3g} (float64 rounding alone: "
                 f"{check.float64_distance:.3g})")
    lines.append(f"verdict: {check.verdict}")
    return "\n".join(lines)


def main_lower(args: argparse.Namespace) -> int:
    import torch

    from yoloq.passes.check_integer import check_integer
    from yoloq.passes.lower_to_integer import lower

    qm, batches = _quantized(args)
    lowered = lower(qm)
    check = check_integer(lowered, qm, [torch.cat(batches)[: max(args.check, 1)]])
    print(format_check(check))
    print(f"integer graph: {lowered.stats['conv']} integer convs, {lowered.stats['lut']} lookup tables, "
          f"int64 accumulators in {len(lowered.stats['int64_layers'])} layer(s)")
    if args.output:
        torch.save(lowered, args.output)
        print(f"saved {args.output}")
    return 0 if check.differing == 0 else 1


def main_export(args: argparse.Namespace) -> int:
    import torch

    from yoloq.passes.check_onnx import check_onnx, fused_convs
    from yoloq.passes.export_onnx import export_onnx
    from yoloq.passes.lower_to_integer import lower

    qm, batches = _quantized(args)
    report = export_onnx(qm, args.output, imgsz=args.imgsz, opset=args.opset, pre_activation=args.pre_activation,
                         dynamic_size=args.dynamic_size)
    counts = report.op_counts
    print(f"wrote {report.path}: opset {report.opset}, {counts.get('QuantizeLinear', 0)} QuantizeLinear, "
          f"{counts.get('DequantizeLinear', 0)} DequantizeLinear, {counts.get('Conv', 0)} Conv, "
          f"{counts.get('ConvInteger', 0)} ConvInteger; "
          f"INT4 weights in {report.int4_weights} layer(s); onnx.checker passed")
    if report.float_tensors:
        print(f"left float (no int16 QuantizeLinear before opset 21): {', '.join(report.float_tensors)}")
    fused, plain = fused_convs(report.path)
    integer = counts.get("ConvInteger", 0)
    print(f"ONNX Runtime fuses {fused} of {fused + plain + integer} convolutions into QLinearConv; "
          f"{integer} run as ConvInteger (wider than 8-bit outputs), {plain} in float")
    check = check_onnx(report.path, lower(qm), qm, torch.cat(batches)[: max(args.check, 1)])
    print(check.verdict)
    return 0
