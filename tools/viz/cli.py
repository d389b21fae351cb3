"""``yoloq viz``: draw one pipeline stage of a model, or what happened between two stages.

    yoloq viz --model yolov5n.pt --recipe w4a4 -o graph.html              # the quantized graph
    yoloq viz --model yolov5n.pt --stage integer --svg g.svg --dot g.dot  # the integer graph, 3 files
    yoloq viz --model yolov5n.pt --diff fused quantized -o diff.html      # what quantization added

Quantized stages calibrate on ``--data``'s train images, or on random images when no data is
given (the graph is the same; scales and SQNR then only illustrate). Each stage is built once, so
a diff of two quantized stages calibrates once.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

STAGES = ("captured", "fused", "quantized", "qat", "integer")
RANDOM_IMAGES = 2


def _depth(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    depth = int(text)
    if depth < 1:
        raise argparse.ArgumentTypeError(f"collapse depth must be at least 1, got {depth}")
    return depth


def add_viz_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="checkpoint (.pt), zoo name, ultralytics YAML or tiny model")
    parser.add_argument("--recipe", default="w8a8", help="preset name (w8a8, w4a4, ...) or recipe YAML")
    parser.add_argument("--stage", choices=STAGES, default="quantized", help="the stage to draw (default: quantized)")
    parser.add_argument("--diff", nargs=2, choices=STAGES, metavar=("STAGE_A", "STAGE_B"),
                        help="draw STAGE_B over STAGE_A instead: nodes added, removed and changed")
    parser.add_argument("--collapse-depth", type=_depth, default="auto",
                        help="collapse by module prefix at this depth (2: model.2), 'auto' (default: a depth for "
                             "graphs over 40 nodes) or 'none'")
    parser.add_argument("--data", help="data.yaml whose train images calibrate (default: random images)")
    parser.add_argument("--calib-images", type=int, default=8, help="number of calibration images")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=8, help="calibration batch size")
    parser.add_argument("--engine", choices=("auto", "dot", "layered"), default="auto",
                        help="layout: Graphviz dot (when installed), pure-Python layered, or auto")
    parser.add_argument("-o", "--output", default="graph.html", help="the HTML page to write (default: graph.html)")
    parser.add_argument("--svg", help="also write the first view as SVG here")
    parser.add_argument("--dot", help="also write the graph as DOT here")
    return parser


class Stages:
    """Each stage of one model, built on first use from one set of calibration batches."""

    def __init__(self, model, recipe: str, batches: list[torch.Tensor]):
        self.model, self.recipe, self.batches = model, recipe, batches
        self.built: dict[str, object] = {}

    def __getitem__(self, stage: str):
        if stage not in self.built:
            self.built[stage] = self._build(stage)
        return self.built[stage]

    def _build(self, stage: str):
        import yoloq
        from yoloq.pipeline import build_pipeline, run_pipeline

        example = self.batches[0][:1]
        if stage == "captured":
            return yoloq.capture(self.model, example).graph_module
        if stage == "fused":
            return run_pipeline(copy.deepcopy(self["captured"]), build_pipeline("fused"))[0]
        if stage == "quantized":
            return yoloq.quantize(self.model, self.recipe, calib=self.batches)
        if stage == "qat":
            return yoloq.prepare_qat(self.model, self.recipe, calib=self.batches)
        lowered = yoloq.lower(self["quantized"])
        from torch.fx.passes.shape_prop import ShapeProp  # the integer graph's shapes, for the details

        ShapeProp(lowered.graph_module).propagate(example)
        return lowered

    def report(self, stage: str):
        """The SQNR report that describes ``stage`` (the integer graph computes the quantized one's codes)."""
        return self["quantized"].report if stage == "integer" else getattr(self[stage], "report", None)


def _batches(args: argparse.Namespace) -> list[torch.Tensor]:
    from yoloq.quantize import calibration_batches

    if args.data:
        return calibration_batches(args.data, args.calib_images, args.imgsz, args.batch)
    print(f"yoloq viz: no --data: calibrating on {RANDOM_IMAGES} random images (scales and SQNR only illustrate)",
          file=sys.stderr)
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(RANDOM_IMAGES, 3, args.imgsz, args.imgsz, generator=generator)]


def main_viz(args: argparse.Namespace) -> int:
    from pathlib import Path

    from yoloq.sources import load_model
    from yoloq.tools.viz.diff import diff_view
    from yoloq.tools.viz.html import page
    from yoloq.tools.viz.render import graph_module_of, resolve_depth, to_dot, to_svg, view, write

    stages = Stages(load_model(args.model), args.recipe, _batches(args))
    name = Path(args.model).name
    if args.diff:
        a, b = args.diff
        graph, found = diff_view(graph_module_of(stages[a]), graph_module_of(stages[b]), stages.report(b),
                                 titles=(f"{name} · {a}", b))
        summary = found.summary()
    else:
        stage = stages[args.stage]
        quantized = args.stage in ("quantized", "qat", "integer")
        graph = view(stage, stages.report(args.stage),
                     title=f"{name} · {args.stage}" + (f" ({args.recipe})" if quantized else ""))
        summary = ""
    depth = resolve_depth(graph, args.collapse_depth)
    print(f"wrote {write(args.output, page(graph, depth, args.engine, summary))}: {len(graph.nodes)} nodes"
          + (f", collapsed at depth {depth}" if depth is not None else "") + (f"; {summary}" if summary else ""))
    if args.svg:
        print(f"wrote {write(args.svg, to_svg(graph, collapse_depth=depth, engine=args.engine))}")
    if args.dot:
        print(f"wrote {write(args.dot, to_dot(graph, collapse_depth=depth))}")
    return 0
