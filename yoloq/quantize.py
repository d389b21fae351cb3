"""``yoloq.quantize(model, recipe, calib=...)``: the library's main call (post-training quantization).

    model --capture--> graph + decoder --fold, fuse, plan, insert, calibrate--> QuantizedModel

The caller's model is never modified: capture traces a deep copy. Calibration data is read and
checked before anything is built, so bad data fails fast with nothing half-done.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from yoloq.passes.calibrate import CalibrationError, check_batches
from yoloq.passes.capture import Decoder, capture
from yoloq.pipeline import PassRecord, build_pipeline, run_pipeline
from yoloq.recipe import Recipe, load_recipe
from yoloq.report import QuantReport, build_report
from yoloq.tools.heads import HeadLayout, HeadLayoutError

REPORT_IMAGES = 2  # images of the first calibration batch the SQNR report runs on


class QuantizedModel(nn.Module):
    """A fake-quantized network graph and its float decoder: ``model(x) = decoder(graph_module(x))``.

    ``yoloq.evaluate`` takes it like any detector; ``report`` lists every quantizer."""

    def __init__(self, graph_module: fx.GraphModule, decoder: Decoder, recipe: Recipe,
                 report: QuantReport | None = None, records: tuple[PassRecord, ...] = (),
                 head: HeadLayout | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.decoder = decoder
        self.recipe = recipe
        self.report = report
        self.records = records
        self.head = head  # what the raw outputs mean, for training losses (None: unknown head)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.graph_module(x))


def unwrap_model(model) -> nn.Module:
    """The nn.Module to capture: ultralytics' ``YOLO``/``RTDETR`` wrappers (which predict, not
    forward) hold their network in ``.model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (or an ultralytics YOLO), got {type(model).__name__}")
    wrapper = any(c.__module__ == "ultralytics.engine.model" and c.__name__ == "Model" for c in type(model).__mro__)
    return model.model if wrapper and isinstance(getattr(model, "model", None), nn.Module) else model


def calibration_batches(calib, num_images: int = 32, imgsz: int = 640, batch: int = 8) -> list[torch.Tensor]:
    """``calib`` as checked image batches: a tensor, an iterable of tensors, or a data.yaml path
    (its ``train`` images, the first ``num_images``, letterboxed to ``imgsz`` squares)."""
    if calib is None:
        raise CalibrationError("calib is required: an iterable of B x 3 x H x W image batches in [0, 1], "
                               "or the path of a data.yaml (with num_images)")
    if isinstance(calib, (str, os.PathLike)):
        from yoloq.tools.data import YoloDataset, labels_are_polygons

        path = Path(calib)
        if path.suffix not in (".yaml", ".yml"):
            raise CalibrationError(f"calib {path}: expected a data.yaml path")
        dataset = YoloDataset(path, "train", imgsz=imgsz, batch=batch, rect=False, max_images=num_images,
                              segments=labels_are_polygons(path, "train"))
        return check_batches(images for images, _, _ in dataset.batches())
    if isinstance(calib, torch.Tensor):
        calib = [calib]
    if not isinstance(calib, Iterable):
        raise CalibrationError(f"calib must be image batches or a data.yaml path, got {type(calib).__name__}")
    return check_batches(calib, channels=3)


def quantize(model, recipe: Recipe | str | os.PathLike = "w8a8", example_inputs=None, calib=None, *,
             num_images: int = 32, imgsz: int = 640, batch: int = 8, boundary=None) -> QuantizedModel:
    """Post-training quantization of ``model`` with ``recipe`` (a Recipe, a preset name such as
    ``"w4a4"``, or a YAML path), calibrated on ``calib``.

    ``example_inputs`` fixes the traced input (default: the first calibration image); sizes and
    batch sizes stay free where the model's code keeps them symbolic (see ``capture``)."""
    return _build(model, recipe, example_inputs, calib, num_images, imgsz, batch, boundary, qat=False)


def prepare_qat(model, recipe: Recipe | str | os.PathLike = "w4a4", example_inputs=None, calib=None, *,
                num_images: int = 32, imgsz: int = 640, batch: int = 8, boundary=None) -> QuantizedModel:
    """``quantize`` for quantization-aware training: BatchNorm stays after each quantized conv
    (or is fold-simulated, per ``recipe.qat_batchnorm``), quantizers start from calibrated ranges,
    and ``QuantizedModel.head`` tells the trainer how to build the loss. Train it with
    ``yoloq.tools.qat.train_qat`` or attach a ``QATHook`` to a loop of your own."""
    return _build(model, recipe, example_inputs, calib, num_images, imgsz, batch, boundary, qat=True)


def _build(model, recipe, example_inputs, calib, num_images, imgsz, batch, boundary, qat: bool) -> QuantizedModel:
    recipe = load_recipe(recipe)
    network = unwrap_model(model)
    batches = calibration_batches(calib, num_images, imgsz, batch)
    example = example_inputs if example_inputs is not None else batches[0][:1]
    captured = capture(network, example, boundary)
    passes = build_pipeline("calibrated", recipe=recipe, calib=batches, qat=qat)
    gm, records = run_pipeline(captured.graph_module, passes)
    report = build_report(gm, batches[0][:REPORT_IMAGES])
    try:
        head = HeadLayout.from_model(network)
    except HeadLayoutError:
        head = None
    return QuantizedModel(gm, captured.decoder, recipe, report, tuple(records), head)
