"""yoloq: quantize YOLO detectors to 8, 4 and 3 bits as a torch.fx compiler-pass pipeline.

The front of the chain today: ``capture`` a model as a module-level FX graph plus a float
decoder, then run the structural passes that ``build_pipeline`` orders (Conv-BN folding,
Conv-activation fusion) with ``run_pipeline``.
"""
from yoloq.passes.capture import Captured, Decoder, capture
from yoloq.passes.concrete_tracer import CaptureError, Guard, GuardError
from yoloq.passes.fold_conv_bn import fold_conv_bn
from yoloq.passes.fuse_conv_act import FusedConv2d, fuse_conv_act
from yoloq.pipeline import PassError, PassRecord, PassResult, build_pipeline, run_pipeline

__all__ = [
    "Captured", "Decoder", "capture", "CaptureError", "Guard", "GuardError",
    "fold_conv_bn", "fuse_conv_act", "FusedConv2d",
    "PassError", "PassRecord", "PassResult", "build_pipeline", "run_pipeline",
]
from yoloq import models  # noqa: E402  (yoloq.models.build, .load, tiny models)
from yoloq.tools.coco_eval import Metrics  # noqa: E402
from yoloq.tools.evaluate import evaluate  # noqa: E402

__all__ += ["Metrics", "evaluate", "models"]

__version__ = "0.1.0"
