"""Load official YOLOv5 ``.pt`` checkpoints without the YOLOv5 repository, and without running
anything the file asks for.

An official checkpoint is a pickle of the training code's own objects (``models.yolo.Model``
holding ``models.common.C3`` ...), so a plain ``torch.load`` needs that code importable and will
call whatever callable the file names. Here the pickle is read by ``RestrictedUnpickler``: a short
allow-list of tensor-rebuilding functions and containers resolves to the real thing, module classes
resolve to inert ``PickledObject`` records that only keep the state the pickle gives them, and
every other global is refused *before* it is resolved, so it is never called. From the records we
take the module tree and its tensors, build yoloq's own YOLOv5 of the matching scale, and load the
state dict into it.

Checkpoints of the ultralytics package (``ultralytics.nn.tasks.DetectionModel`` holding
``ultralytics.nn.modules.*``) take the same path; their YOLOv8 / YOLO11 layout and scale are
matched from the YAML dict the model record carries (``MATCHERS`` picks the matcher by package).
"""
from __future__ import annotations

import builtins
import codecs
import collections
import functools
import os
import pickle
import types
from typing import Any

import numpy
import torch
from torch import nn

from yoloq.models.yolov5 import SCALES, STRIDES, YOLOv5
from yoloq.models.yolov7 import VARIANTS as YOLOV7_VARIANTS
from yoloq.models.yolov7 import YOLOv7
from yoloq.models.yolov7 import layer_names as yolov7_layer_names
from yoloq.models.yolov8 import YOLOv8, match_yaml

try:  # numpy >= 2 moved the C core to numpy._core
    import numpy._core.multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    import numpy.core.multiarray as _np_multiarray


class CheckpointError(ValueError):
    """The file is not a checkpoint yoloq can read."""


class UnknownArchitectureError(CheckpointError):
    """The checkpoint holds a model yoloq cannot rebuild."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The pickle references a global outside the allow-list."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Protocol 2 stores bytes as ``_codecs.encode(text, "latin1")``; other codecs are refused
    because a codec name is looked up (and its module imported) by name."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"checkpoint asks for the {encoding!r} codec; only latin1 is allowed")
    return codecs.encode(text, "latin1")


def _ndarray_reconstruct(subtype: Any, shape: Any, dtype: Any) -> numpy.ndarray:
    """numpy's array constructor, for plain ndarrays only: a subclass named by the file would run
    its own ``__array_finalize__``."""
    if subtype is not numpy.ndarray:
        raise UnsafeCheckpointError(f"checkpoint asks numpy to build a {subtype!r}; only numpy.ndarray is allowed")
    return _np_multiarray._reconstruct(subtype, shape, dtype)


# Callables the pickle may really invoke: they rebuild tensors and containers from plain data.
SAFE_CALLABLES: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # numpy scalars (e.g. best_fitness in checkpoints that were not stripped) pickle as these.
    ("numpy.core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy", "dtype"): numpy.dtype,
    # YOLOv7's strip_optimizer keeps best_fitness, a 1-element ndarray.
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy", "ndarray"): numpy.ndarray,
    ("_codecs", "encode"): _latin1_encode,
    # Protocol-2 pickles spell builtins "__builtin__"; both spellings name the same containers.
    **{(mod, name): getattr(builtins, name)
       for mod in ("builtins", "__builtin__") for name in ("set", "frozenset", "dict", "list", "tuple")},
}
TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
TORCH_STORAGES = {name for name in dir(torch) if name.endswith("Storage") and isinstance(getattr(torch, name), type)}

# Classes that become inert records. The YOLOv5 names cover v6.0-v7.0 (Model was renamed
# DetectionModel in v7.0); Focus/SPP/BottleneckCSP are kept so that pre-v6 checkpoints fail with an
# architecture error rather than a safety error.
RECORDED_CLASSES = {
    "models.yolo": {"Model", "DetectionModel", "SegmentationModel", "Detect", "Segment"},
    "models.common": {"Conv", "C3", "Bottleneck", "SPPF", "Concat", "Proto", "Focus", "SPP", "BottleneckCSP"},
}
# WongKinYiu/yolov7 uses the same module paths (models.yolo.Model, models.common.Conv ...).
RECORDED_CLASSES["models.yolo"] |= {"IDetect"}
RECORDED_CLASSES["models.common"] |= {"MP", "SP", "SPPCSPC", "RepConv", "ImplicitA", "ImplicitM"}
# The ultralytics package (YOLOv8, YOLO11 and their -seg). Pose/OBB models and heads are recorded
# so that their checkpoints fail with an architecture error rather than a safety error.
RECORDED_CLASSES |= {
    "ultralytics.nn.tasks": {"DetectionModel", "SegmentationModel", "PoseModel", "OBBModel"},
    "ultralytics.nn.modules.conv": {"Conv", "DWConv", "Concat"},
    "ultralytics.nn.modules.block": {
        "C2f", "C3k2", "C3k", "C3", "Bottleneck", "SPPF", "C2PSA", "PSABlock", "Attention", "DFL", "Proto",
    },
    "ultralytics.nn.modules.head": {"Detect", "Segment", "Pose", "OBB"},
}
TORCH_LAYERS = {
    "Conv2d", "BatchNorm2d", "SiLU", "ReLU", "LeakyReLU", "Hardswish", "Identity",
    "Upsample", "MaxPool2d", "ModuleList", "Sequential", "ConvTranspose2d",
}


class PickledObject:
    """Stand-in for a class named by the checkpoint: keeps the state, has no behaviour."""

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise UnsafeCheckpointError(f"unexpected state of type {type(state).__name__} for {self.pickled_name}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name}>"


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; module classes become ``PickledObject`` subclasses."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._records: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_CALLABLES:
            return SAFE_CALLABLES[(module, name)]
        if module == "torch" and (name in TORCH_DTYPES or name in TORCH_STORAGES):
            return getattr(torch, name)
        is_torch_layer = module.startswith("torch.nn.modules.") and name in TORCH_LAYERS
        if is_torch_layer or name in RECORDED_CLASSES.get(module, ()):
            return self._record_class(f"{module}.{name}", name)
        raise UnsafeCheckpointError(f"checkpoint references '{module}.{name}', which is not allow-listed")

    def _record_class(self, qualified: str, name: str) -> type:
        if qualified not in self._records:
            self._records[qualified] = type(name, (PickledObject,), {"pickled_name": qualified})
        return self._records[qualified]


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load wants a module: it subclasses ``.Unpickler`` (adding tensor storage lookup) and calls
# ``.load`` for the legacy format's headers.
restricted_pickle = types.ModuleType("yoloq_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The unpickled checkpoint, with module objects as ``PickledObject`` records."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # torch reports truncation and bad archives with assorted types
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc


def _named(obj: Any) -> str:
    return obj.pickled_name if isinstance(obj, PickledObject) else type(obj).__name__


def module_state(record: PickledObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict a real ``nn.Module`` with this recorded state would return."""
    fields = record.__dict__
    skip = fields.get("_non_persistent_buffers_set") or set()
    state: dict[str, torch.Tensor] = {}
    for name, t in (fields.get("_parameters") or {}).items():
        if t is not None:
            state[prefix + name] = t
    for name, t in (fields.get("_buffers") or {}).items():
        if t is not None and name not in skip:
            state[prefix + name] = t
    for name, child in (fields.get("_modules") or {}).items():
        if child is not None:
            state.update(module_state(child, f"{prefix}{name}."))
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state entry {key!r} is a {_named(value)}, not a tensor")
    return state


def _model_record(ckpt: Any, path: str) -> PickledObject:
    record = ckpt
    if isinstance(ckpt, dict):
        record = ckpt.get("ema") or ckpt.get("model")  # the EMA weights are the ones evaluated
        if record is None:
            raise CheckpointError(f"{path}: no 'model' or 'ema' entry (keys: {sorted(map(str, ckpt))})")
    model_classes = {f"models.yolo.{n}" for n in ("Model", "DetectionModel", "SegmentationModel")}
    model_classes |= {f"ultralytics.nn.tasks.{n}" for n in ("DetectionModel", "SegmentationModel")}
    if not isinstance(record, PickledObject) or record.pickled_name not in model_classes:
        raise UnknownArchitectureError(f"{path}: the model is a {_named(record)}, not a YOLO model yoloq rebuilds")
    return record


def _layers(record: PickledObject, path: str) -> list[PickledObject]:
    seq = record.__dict__.get("_modules", {}).get("model")
    if not isinstance(seq, PickledObject):
        raise UnknownArchitectureError(f"{path}: the model has no 'model' layer list")
    return list((seq.__dict__.get("_modules") or {}).values())


def _candidate_scales(record: PickledObject) -> list[tuple[float, float]]:
    """The yaml's multiples first; the official scales as a fallback for a yaml-less record."""
    yaml = record.__dict__.get("yaml")
    found = []
    if isinstance(yaml, dict) and "depth_multiple" in yaml and "width_multiple" in yaml:
        found.append((float(yaml["depth_multiple"]), float(yaml["width_multiple"])))
    return found + [s for s in SCALES.values() if s not in found]


def _class_names(record: PickledObject, nc: int) -> list[str]:
    names = record.__dict__.get("names")
    if isinstance(names, dict):  # later YOLOv5 releases store {index: name}
        names = [names[i] for i in sorted(names)]
    if not isinstance(names, (list, tuple)) or len(names) != nc:
        return [f"class{i}" for i in range(nc)]
    return [str(n) for n in names]


def _shape_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    if ours.keys() != theirs.keys():
        missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        return f"missing keys {missing[:5]}, unexpected keys {extra[:5]}"
    bad = [f"{k}: {theirs[k]} vs {ours[k]}" for k in ours if ours[k] != theirs[k]]
    return f"shape mismatch {bad[:3]}" if bad else None


def _head(layers: list[Any], path: str) -> tuple[PickledObject, str]:
    head = layers[-1] if layers else None
    kind = _named(head).rsplit(".", 1)[-1]
    if not isinstance(head, PickledObject) or kind not in ARCHITECTURES or "nc" not in head.__dict__:
        raise UnknownArchitectureError(f"{path}: unknown head {_named(head)} (expected one of {list(ARCHITECTURES)})")
    return head, kind


def _strides(record: PickledObject, head: PickledObject, path: str) -> torch.Tensor:
    stride = head.__dict__.get("stride", record.__dict__.get("stride"))
    values = torch.as_tensor(stride, dtype=torch.float32).flatten().tolist() if stride is not None else None
    if values != [float(s) for s in STRIDES]:
        raise UnknownArchitectureError(f"{path}: unknown strides {values} (yoloq's YOLOv5: {list(STRIDES)})")
    return torch.tensor(values)


def _build_matching(record: PickledObject, state: dict[str, torch.Tensor], path: str) -> YOLOv5 | YOLOv7:
    """yoloq's model whose layer classes and state-dict shapes equal the checkpoint's."""
    layers = _layers(record, path)
    head, kind = _head(layers, path)
    stride = _strides(record, head, path)
    anchors_key = f"model.{len(layers) - 1}.anchors"
    if anchors_key not in state:
        raise UnknownArchitectureError(f"{path}: the head has no '{anchors_key}' buffer")
    anchors = (state[anchors_key].float() * stride.view(-1, 1, 1)).flatten(1).tolist()
    nc = int(head.__dict__["nc"])
    theirs = [_named(m).rsplit(".", 1)[-1] for m in layers]
    return ARCHITECTURES[kind](record, theirs, state, path, nc=nc, anchors=anchors, names=_class_names(record, nc))


def _match_yolov5(record, theirs, state, path, segment: bool = False, **head) -> YOLOv5:
    problems = []
    for depth, width in _candidate_scales(record):
        model = YOLOv5(depth, width, segment=segment, **head)
        ours = [type(m).__name__ for m in model.model]
        if theirs != ours:
            raise UnknownArchitectureError(f"{path}: unknown layer sequence {theirs} (yoloq's YOLOv5: {ours})")
        problem = _shape_mismatch(model, state)
        if problem is None:
            return model
        problems.append(f"depth {depth}, width {width}: {problem}")
    raise UnknownArchitectureError(f"{path}: no YOLOv5 scale matches the weights; " + "; ".join(problems[:2]))


def _match_yolov7(record, theirs, state, path, **head) -> YOLOv7:
    for variant in YOLOV7_VARIANTS:
        if yolov7_layer_names(variant) == theirs:  # compared before building: yolov7 is 37M parameters
            model = YOLOv7(variant, **head)
            if problem := _shape_mismatch(model, state):
                raise UnknownArchitectureError(f"{path}: {variant} does not match the weights; {problem}")
            return model
    raise UnknownArchitectureError(f"{path}: unknown layer sequence {theirs} (yoloq's YOLOv7: {list(YOLOV7_VARIANTS)})")


# The head's class picks the family of models tried against a checkpoint.
ARCHITECTURES = {
    "Detect": _match_yolov5,
    "Segment": functools.partial(_match_yolov5, segment=True),
    "IDetect": _match_yolov7,
}


def _match_ultralytics(record: PickledObject, state: dict[str, torch.Tensor], path: str) -> YOLOv8:
    """yoloq's YOLOv8 / YOLO11 (-seg) with the layout the record's YAML gives, at the YAML's scale
    (every official scale when the YAML names none) whose state-dict shapes equal the weights'."""
    yaml = record.__dict__.get("yaml")
    matched = match_yaml(yaml) if isinstance(yaml, dict) else None
    if matched is None:
        raise UnknownArchitectureError(f"{path}: the model's yaml is not a YOLOv8 or YOLO11 (-seg) layout")
    family, segment = matched
    head, _ = _head(_layers(record, path), path)
    _strides(record, head, path)
    nc = int(head.__dict__["nc"])
    scales = [yaml["scale"]] if yaml.get("scale") in family.scales else list(family.scales)
    problems = []
    for scale in scales:
        model = YOLOv8(family, scale, nc=nc, segment=segment, names=_class_names(record, nc))
        if (problem := _shape_mismatch(model, state)) is None:
            return model
        problems.append(f"{family.name}{scale}: {problem}")
    raise UnknownArchitectureError(f"{path}: no {family.name} scale matches the weights; " + "; ".join(problems[:2]))


# The package that pickled the model picks how it is matched: the YOLOv5 / YOLOv7 repositories
# (``models.yolo``) by head class and anchors, the ultralytics package by the model's YAML.
MATCHERS = {"models.yolo": _build_matching, "ultralytics.nn.tasks": _match_ultralytics}


def load(path: str | os.PathLike) -> YOLOv5 | YOLOv7 | YOLOv8:
    """yoloq's YOLOv5 (-seg), YOLOv7 (-tiny), YOLOv8 / YOLO11 (-seg) with the weights of an
    official or ultralytics checkpoint, fp32, eval mode.

    The model carries ``names`` (class names), ``stride`` and, when anchor-based, ``anchors`` (pixels).
    """
    path = os.fspath(path)
    record = _model_record(read_checkpoint(path), path)
    state = module_state(record)
    model = MATCHERS[record.pickled_name.rsplit(".", 1)[0]](record, state, path)
    # Release checkpoints are stored in fp16; yoloq works in fp32 and quantizes from there.
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()
