"""Capture any YOLO (any nn.Module) as a module-level FX graph plus a float decoder.

    model(x) == decoder(network(x))

``network`` is a GraphModule from the input to the raw head tensors (the last layers), with every
Conv2d, BatchNorm2d, activation, Upsample and MaxPool as a ``call_module`` node under its
qualified name; ``decoder`` runs everything after (views, sigmoid, DFL, anchors, grids, NMS-free
top-k) in float. Python decisions taken from example values are kept as guards (see
``concrete_tracer``). The caller's model is deep-copied first and never modified.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from yoloq.passes.concrete_tracer import CaptureError, ConcreteTracer, Guard, GuardError, user_source
from yoloq.passes.split_head import find_boundary, split_at_boundary


class Decoder(nn.Module):
    """Float post-processing of the raw head tensors: ``decoder(network(x)) == model(x)``."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, outputs: Sequence[Any]) -> Any:
        return self.graph_module(*outputs)


@dataclasses.dataclass
class Captured:
    graph_module: fx.GraphModule
    decoder: Decoder
    guards: tuple[Guard, ...]
    head_outputs: tuple[str, ...]
    aux_outputs: tuple[str, ...]

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self.decoder(self.graph_module(*inputs))


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise TypeError(
            f"example_inputs must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}"
        )
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] is a {type(t).__name__}, expected a torch.Tensor")
    return tuple(inputs)


def _input_names(model: nn.Module, n: int) -> list[str]:
    params = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return [params[i] if i < len(params) else f"input_{i}" for i in range(n)]


def _describe(inputs: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in inputs)


def reset_forward_caches(root: nn.Module) -> list[str]:
    """Return caches that forward fills (``self.shape``, ``self.anchors``) to their unset defaults.

    YOLO heads declare such caches as class attributes that mean "not computed yet" (None, an
    empty tensor or an empty list: ``Detect.shape``, ``RTDETRDecoder.shapes``) and shadow them with
    per-instance values on the first call. Traced with a warm cache, ``if self.shape != shape``
    would compare against whatever size the model last saw; from the unset state the graph always
    rebuilds what it needs, which is right for every size. Only a tensor, shape or list shadowing
    such an unset class default is reset; user settings are left alone.
    """
    reset = []
    for name, module in root.named_modules():
        for attr, value in list(vars(module).items()):
            default = getattr(type(module), attr, _NO_DEFAULT)
            if _is_unset(default) and isinstance(value, _CACHE_TYPES) and value is not default:
                delattr(module, attr)
                reset.append(f"{name}.{attr}" if name else attr)
    return reset


_NO_DEFAULT = object()
_CACHE_TYPES = (torch.Size, torch.Tensor, list, tuple)


def _is_unset(default: Any) -> bool:
    if isinstance(default, torch.Tensor):
        return default.numel() == 0
    return default is None or (isinstance(default, (list, tuple)) and not isinstance(default, torch.Size) and not default)


def trace(
    model: nn.Module, example_inputs: Any, leaf_types: tuple[type, ...] = ()
) -> tuple[fx.GraphModule, nn.Module, list[Guard]]:
    """Trace a deep copy of ``model`` in eval mode on ``example_inputs``: (graph, traced root, guards)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_inputs(example_inputs)
    root = copy.deepcopy(model).eval()
    reset_forward_caches(root)
    tracer = ConcreteTracer(inputs, _input_names(root, len(inputs)), leaf_types)
    try:
        with torch.no_grad():
            graph = tracer.trace(root)
    except (CaptureError, GuardError) as exc:
        raise CaptureError(f"{exc} (example inputs: {_describe(inputs)})") from exc
    except Exception as exc:
        raise CaptureError(
            f"cannot capture {type(model).__name__}: {type(exc).__name__}: {exc}; in {tracer.current_module()} "
            f"at {user_source()} (example inputs: {_describe(inputs)})"
        ) from exc
    return fx.GraphModule(tracer.root, graph, class_name="Traced"), tracer.root, tracer.guards


def capture(
    model: nn.Module,
    example_inputs: Any,
    boundary: Iterable[str] | None = None,
    leaf_types: tuple[type, ...] = (),
) -> Captured:
    """Capture ``model`` at the example inputs. ``boundary`` names the raw head modules to end the
    network graph at (default: found as the last layers, see ``split_head``); ``leaf_types`` adds
    module classes to keep as single nodes besides those of ``torch.nn``."""
    gm, root, guards = trace(model, example_inputs, leaf_types)
    head = find_boundary(gm, root, boundary)
    split = split_at_boundary(gm, root, head)
    split.network.meta["yoloq.head_outputs"] = split.head_outputs
    split.network.meta["yoloq.aux_outputs"] = split.aux_outputs
    return Captured(
        graph_module=split.network,
        decoder=Decoder(split.decoder).eval(),
        guards=tuple(guards),
        head_outputs=split.head_outputs,
        aux_outputs=split.aux_outputs,
    )
