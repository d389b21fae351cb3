"""``evaluate``: COCO mAP of a detector on a YOLO-format dataset, and the ``yoloq eval`` verb.

The loop is YOLOv5 ``val.py``'s: letterboxed (rectangular by default) batches, the model in eval
mode, multi-label class-aware NMS at conf 0.001 / IoU 0.6 with at most 300 boxes per image, boxes
mapped back to original pixels, then ``CocoEvaluator``. Any ``nn.Module`` works whose eval output
is a prediction tensor in either YOLO layout, or a tuple/list whose first element is one (as
YOLOv5's ``(pred, raw)``).

Segmentation models give prototypes too, as ``((pred, protos), raw)`` (YOLOv8/11-seg) or
``(pred, protos, raw)`` (YOLOv5-seg), with nm = ``protos.shape[1]`` mask coefficients at the end of
every prediction row. NMS carries the coefficients along, and when the dataset's labels are
polygons each kept detection's mask (``mask_eval``) is scored too: the result then has mask mAPs.
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from tqdm import tqdm

from yoloq.tools.bootstrap import map_difference
from yoloq.tools.coco_eval import CocoEvaluator, Metrics
from yoloq.tools.data import YoloDataset, labels_are_polygons
from yoloq.tools.mask_eval import mask_encodings
from yoloq.tools.nms import non_max_suppression


def _is_protos(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4


def _prediction(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prediction tensor of an eval output, and the prototypes of a segmentation model."""
    protos = None
    if isinstance(output, (tuple, list)):
        first = output[0]
        if isinstance(first, (tuple, list)) and len(first) == 2 and _is_protos(first[1]):
            first, protos = first  # ((pred, protos), raw)
        elif len(output) > 2 and _is_protos(output[1]):
            protos = output[1]  # (pred, protos, raw)
        output = first
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}; expected a prediction "
                        "tensor or a tuple/list whose first element is one")
    return output, protos


def _model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    dtype = parameter.dtype if parameter.dtype.is_floating_point else torch.float32
    return parameter.device, dtype


def evaluate(model: nn.Module, data_yaml: str | os.PathLike, imgsz: int = 640, batch: int = 1,
             conf: float = 0.001, iou: float = 0.6, max_images: int | None = None,
             cache_dir: str | os.PathLike | None = None, *, rect: bool = True) -> Metrics:
    """mAP50-95, mAP50, P, R and per-class AP of ``model`` on the data.yaml's val split, and the
    mask mAPs of a segmentation model on polygon labels.

    ``max_images`` keeps the first N images in filename order (a quick look, not a benchmark);
    ``cache_dir`` holds the converted COCO ground truth (default: see ``default_cache_dir``).
    The model's training flag is restored afterwards.
    """
    if imgsz % 32 or imgsz <= 0:
        raise ValueError(f"imgsz must be a positive multiple of 32, got {imgsz}")
    dataset = YoloDataset(data_yaml, "val", imgsz=imgsz, batch=batch, rect=rect,
                          max_images=max_images, segments=labels_are_polygons(data_yaml))
    evaluator = CocoEvaluator(dataset, cache_dir)
    device, dtype = _model_placement(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, records, boxes_maps in tqdm(dataset.batches(), total=dataset.num_batches(),
                                                    desc="eval", unit="batch", leave=False):
                prediction, protos = _prediction(model(images.to(device, dtype)))
                nm = 0 if protos is None else protos.shape[1]
                detections = non_max_suppression(prediction.float(), conf, iou, nm=nm)
                for i, (record, boxes_map, det) in enumerate(zip(records, boxes_maps, detections)):
                    det[:, :4] = boxes_map.to_original(det[:, :4])
                    masks = None
                    if protos is not None and dataset.segments is not None:
                        masks = mask_encodings(det[:, 6:], protos[i], det[:, :4], boxes_map,
                                               tuple(images.shape[2:]))
                    evaluator.update(record, det, masks)
    finally:
        model.train(was_training)
    return evaluator.compute()


def format_metrics(metrics: Metrics) -> str:
    """A results table: the summary row (with mask mAPs for a segmentation model), then box
    AP50-95 per class present in the labels."""
    masks = metrics.mask_map50_95 is not None
    header = f"{'class':>20} {'P':>7} {'R':>7} {'mAP50':>7} {'mAP50-95':>9}"
    summary = (f"{'all':>20} {metrics.precision:7.3f} {metrics.recall:7.3f} "
               f"{metrics.map50:7.3f} {metrics.map50_95:9.3f}")
    if masks:
        header += f" {'mask50':>7} {'mask50-95':>9}"
        summary += f" {metrics.mask_map50:7.3f} {metrics.mask_map50_95:9.3f}"
    lines = [header, summary]
    lines += [f"{name:>20} {'':7} {'':7} {'':7} {ap:9.3f}" for name, ap in metrics.per_class.items()]
    return "\n".join(lines)


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``yoloq eval``."""
    parser.add_argument("--model", required=True, help="checkpoint (.pt), zoo name, ultralytics YAML, a file of "
                                                        "yoloq.save, or an exported .onnx (fixed size: add --square)")
    parser.add_argument("--data", required=True, help="data.yaml of a YOLO-format dataset")
    parser.add_argument("--imgsz", type=int, default=640, help="inference size (pixels)")
    parser.add_argument("--batch", type=int, default=1, help="images per batch")
    parser.add_argument("--conf", type=float, default=0.001, help="confidence threshold")
    parser.add_argument("--iou", type=float, default=0.6, help="NMS IoU threshold")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate the first N only")
    parser.add_argument("--square", action="store_true", help="pad to imgsz x imgsz, not rect")
    parser.add_argument("--baseline", default=None,
                        help="a second model: also print --model's mAP50-95 minus this one's, with a "
                             "paired bootstrap interval over the images")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for --baseline")
    return parser


def load_for_eval(spec: str) -> nn.Module:
    """What ``yoloq eval`` scores: an exported ``.onnx`` file (ONNX Runtime), a file of
    ``yoloq.save``, or any model ``yoloq.sources.load_model`` builds from ``spec``."""
    if spec.endswith(".onnx"):
        from yoloq.passes.check_onnx import OnnxModel

        if not os.path.isfile(spec):
            raise FileNotFoundError(f"ONNX file {spec} does not exist")
        return OnnxModel(spec, threads=torch.get_num_threads()).eval()
    from yoloq.storage import is_saved_model, load_quantized

    if is_saved_model(spec):
        return load_quantized(spec)
    from yoloq.sources import load_model  # the model zoo is only needed by this verb

    return load_model(spec)


def main_eval(args: argparse.Namespace) -> int:
    """``yoloq eval``: print the results table of a model on a dataset, and with ``--baseline``
    the difference to a second model with its bootstrap interval."""
    def run(name: str) -> Metrics:
        return evaluate(load_for_eval(name), args.data, imgsz=args.imgsz, batch=args.batch, conf=args.conf,
                        iou=args.iou, max_images=args.max_images, rect=not args.square)

    metrics = run(args.model)
    print(format_metrics(metrics))
    if args.baseline is not None:
        baseline = run(args.baseline)
        print(f"vs baseline {args.baseline}: {map_difference(baseline, metrics, args.resamples)}")
        if metrics.mask_matches is not None and baseline.mask_matches is not None:
            print(f"masks vs baseline: {map_difference(baseline, metrics, args.resamples, masks=True)}")
    return 0
