"""yoloq: quantize YOLO detectors to 8, 4 and 3 bits as a torch.fx compiler-pass pipeline.

``quantize(model, recipe, calib=...)`` runs the front of the chain: ``capture`` a model as a
module-level FX graph plus a float decoder, then the passes that ``build_pipeline`` orders
(Conv-BN folding, Conv-activation fusion, planning, quantizer insertion, calibration).
"""
from yoloq.passes.capture import Captured, Decoder, capture
from yoloq.passes.concrete_tracer import CaptureError, Guard, GuardError
from yoloq.passes.fold_conv_bn import fold_conv_bn
from yoloq.passes.fold_implicit import fold_implicit
from yoloq.passes.fuse_conv_act import FusedConv2d, fuse_conv_act
from yoloq.pipeline import PassError, PassRecord, PassResult, build_pipeline, run_pipeline

__all__ = [
    "Captured", "Decoder", "capture", "CaptureError", "Guard", "GuardError",
    "fold_conv_bn", "fold_implicit", "fuse_conv_act", "FusedConv2d",
    "PassError", "PassRecord", "PassResult", "build_pipeline", "run_pipeline",
]
from yoloq import models  # noqa: E402  (yoloq.models.build, .load, tiny models)
from yoloq.tools.coco_eval import Metrics  # noqa: E402
from yoloq.tools.evaluate import evaluate  # noqa: E402
from yoloq.tools.bootstrap import MapDifference, map_difference  # noqa: E402

from yoloq.quantize import QuantizedModel, prepare_qat, quantize  # noqa: E402
from yoloq.recipe import Override, Recipe, RecipeError, load_recipe  # noqa: E402
from yoloq.quantizers.spec import QuantSpec  # noqa: E402
from yoloq.storage import load_quantized, save  # noqa: E402
from yoloq.tools.qat import QATConfig, train_qat  # noqa: E402
from yoloq.tools.qat_hook import QATHook, TrainingDiverged  # noqa: E402
from yoloq.passes.correct import correct  # noqa: E402

__all__ += ["Metrics", "evaluate", "MapDifference", "map_difference", "models", "QuantizedModel", "quantize",
            "Override", "Recipe", "RecipeError", "load_recipe", "QuantSpec", "load_quantized", "save",
            "prepare_qat", "QATConfig", "train_qat", "QATHook", "TrainingDiverged", "correct"]

from yoloq.passes.integer_ops import LoweringError  # noqa: E402
from yoloq.passes.lower_to_integer import LoweredModel, lower  # noqa: E402
from yoloq.passes.eval_form import eval_form  # noqa: E402
from yoloq.passes.check_integer import IntegerCheck, check_integer  # noqa: E402

__all__ += ["LoweringError", "LoweredModel", "lower", "eval_form", "IntegerCheck", "check_integer"]

from yoloq.passes.export_onnx import ExportError, ExportReport, export_onnx  # noqa: E402
from yoloq.passes.check_onnx import OnnxCheck, OnnxModel, check_onnx  # noqa: E402

__all__ += ["ExportError", "ExportReport", "export_onnx", "OnnxCheck", "OnnxModel", "check_onnx"]

__version__ = "0.1.0"
