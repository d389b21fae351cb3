"""An FX tracer that carries a concrete example value beside every proxy.

Plain ``torch.fx.symbolic_trace`` knows nothing about values, so it stops at the first piece of
Python that needs one: ``list(x.chunk(2, 1))`` (iterating a proxy), ``if self.shape != shape``
(a proxy in control flow), ``range(h)`` or ``int(n)``. Here every node is also executed on real
example tensors while the graph is recorded, so each such decision is taken from the value the
example produced, exactly as eager PyTorch would take it, and is written down as a ``Guard``: a
``GuardCheck`` node in the graph re-checks it on every call and raises ``GuardError`` naming the
decision and its source line when an input would have taken the other branch.

Leaf modules (everything in ``torch.nn``) stay ``call_module`` nodes with their qualified names,
parameters and buffers stay ``get_attr`` nodes, and the model's source is never edited: the only
patching is FX's own, scoped to the trace.
"""
from __future__ import annotations

import dataclasses
import operator
import os
import traceback
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from yoloq.passes.graph_utils import resolve_attr

_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_MISSING = object()


class CaptureError(RuntimeError):
    """The model (or its example input) cannot be captured; names the module and source line."""


class GuardError(RuntimeError):
    """An input takes a different Python branch than the example the graph was captured with."""


@dataclasses.dataclass(frozen=True)
class Guard:
    """One decision taken from an example value: ``observe(kind, value) == expected``."""

    kind: str  # "bool", "int", "float", "len" or "keys"
    expected: Any
    expr: str  # the graph node the decision was taken on
    module: str  # qualified name and class of the module whose code took it
    source: str  # "file:line in function: code"

    def describe(self) -> str:
        return f"{self.kind}({self.expr}) == {self.expected!r} in {self.module} at {self.source}"


def observe(kind: str, value: Any) -> Any:
    if kind == "bool":
        return bool(value)
    if kind == "int":
        return operator.index(value) if not isinstance(value, torch.Tensor) else int(value)
    if kind == "float":
        return float(value)
    if kind == "len":
        return len(value)
    if kind == "keys":
        return tuple(value.keys())
    raise ValueError(f"unknown guard kind {kind!r}")


class GuardCheck(nn.Module):
    """Graph node that re-checks one ``Guard`` at run time (impure, so dead-code removal keeps it)."""

    _is_impure = True

    def __init__(self, guard: Guard):
        super().__init__()
        self.guard = guard

    def forward(self, value: Any) -> None:
        actual = observe(self.guard.kind, value)
        if actual != self.guard.expected:
            raise GuardError(
                f"input violates a decision taken at capture time: {self.guard.kind}({self.guard.expr}) "
                f"was {self.guard.expected!r}, now {actual!r}; in {self.guard.module} at "
                f"{self.guard.source}. Capture again with an example input like this one."
            )

    def extra_repr(self) -> str:
        return self.guard.describe()


def concrete(a: Any) -> Any:
    """Replace every proxy inside ``a`` (nested tuples, lists, dicts, slices) with its value."""
    if isinstance(a, ConcreteProxy):
        return a.value
    if isinstance(a, fx.Proxy):
        raise CaptureError(f"proxy {a} from another tracer has no example value")
    if isinstance(a, torch.Size):
        return a
    if isinstance(a, tuple):
        items = [concrete(x) for x in a]
        return type(a)(*items) if hasattr(a, "_fields") else tuple(items)
    if isinstance(a, list):
        return [concrete(x) for x in a]
    if isinstance(a, dict):
        return {k: concrete(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(concrete(a.start), concrete(a.stop), concrete(a.step))
    return a


class ConcreteProxy(fx.Proxy):
    """A proxy that also holds the example value its node computed."""

    def __init__(self, node: fx.Node, tracer: ConcreteTracer, value: Any = _MISSING):
        super().__init__(node, tracer)
        self.__dict__["value"] = value

    def __getattr__(self, k: str) -> ConcreteAttribute:
        return ConcreteAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.specialise(self, "len")

    def __index__(self) -> int:
        return self.tracer.specialise(self, "int")

    def __int__(self) -> int:
        return self.tracer.specialise(self, "int")

    def __float__(self) -> float:
        return self.tracer.specialise(self, "float")

    def __iter__(self):
        return iter([self[i] for i in range(self.tracer.specialise(self, "len"))])

    def __contains__(self, item: Any) -> bool:
        return self.tracer.specialise(self.tracer.create_proxy("call_function", operator.contains, (self, item), {}), "bool")

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def keys(self):
        return self.tracer.specialise(self, "keys")


class ConcreteAttribute(fx.proxy.Attribute, ConcreteProxy):
    """``proxy.attr``: a method call, or (lazily) a ``getattr`` node; its value is read eagerly."""

    def __init__(self, root: ConcreteProxy, attr: str):
        fx.proxy.Attribute.__init__(self, root, attr)

    @property
    def value(self) -> Any:
        return getattr(self.root.value, self.attr)


class ConcreteTracer(fx.Tracer):
    """Trace ``root`` on ``example_inputs``; ``guards`` lists every decision taken from a value."""

    def __init__(self, example_inputs: tuple[Any, ...], input_names: list[str], leaf_types: tuple[type, ...] = ()):
        super().__init__(param_shapes_constant=False)
        self.proxy_buffer_attributes = True
        self.example_inputs = example_inputs
        self.input_names = input_names
        self.leaf_types = leaf_types
        self.guards: list[Guard] = []
        self._concrete = False
        self._dynamic_modules = 0

    # -- structure -----------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        proxies = [self.create_proxy("placeholder", name, (), {}) for name in self.input_names]
        return root_fn, ([self.root] if is_module else []) + proxies

    def proxy(self, node: fx.Node) -> ConcreteProxy:
        return ConcreteProxy(node, self)

    def path_of_module(self, mod: nn.Module) -> str:
        try:
            return super().path_of_module(mod)
        except NameError:  # a module built during forward: give it a home so it can be a node
            name = f"dynamic_{type(mod).__name__.lower()}_{self._dynamic_modules}"
            self._dynamic_modules += 1
            self.root.add_module(name, mod)
            self.submodule_paths[mod] = name
            return name

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        return attr_val if self._concrete else super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward, args, kwargs) -> Any:
        return forward(*args, **kwargs) if self._concrete else super().call_module(m, forward, args, kwargs)

    # -- values --------------------------------------------------------------------------------
    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        value = self._evaluate(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, ConcreteProxy):
            proxy.__dict__["value"] = value
        node = proxy.node
        node.meta["yoloq.origin"] = "capture"
        node.meta["yoloq.example"] = summarise(value)
        node.meta["yoloq.module"] = self.current_module()
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.example_inputs[self.input_names.index(target)]
        a, k = concrete(args), concrete(kwargs)
        previous, self._concrete = self._concrete, True
        try:
            if kind == "get_attr":
                return resolve_attr(self.root, target)
            if kind == "call_function":
                return target(*a, **k)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            if kind == "call_module":
                return self.root.get_submodule(target)(*a, **k)
            return None  # output
        except (CaptureError, GuardError):
            raise
        except Exception as exc:
            name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
            raise CaptureError(
                f"{kind} {name} failed on the example values in {self.current_module()} at "
                f"{user_source()}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._concrete = previous

    # -- decisions taken from values -----------------------------------------------------------
    def specialise(self, proxy: ConcreteProxy, kind: str) -> Any:
        if proxy.value is _MISSING:
            raise CaptureError(f"no example value for {proxy.node.name} in {self.current_module()}")
        try:
            expected = observe(kind, proxy.value)
        except Exception as exc:
            raise CaptureError(
                f"cannot take {kind}() of {proxy.node.name} in {self.current_module()} at {user_source()}: {exc}"
            ) from exc
        guard = Guard(kind, expected, proxy.node.name, self.current_module(), user_source())
        name = f"guard_{len(self.guards)}"
        self.root.add_module(name, GuardCheck(guard))
        self.guards.append(guard)
        self.create_proxy("call_module", name, (proxy,), {})
        return expected

    def to_bool(self, obj: ConcreteProxy) -> bool:
        return self.specialise(obj, "bool")

    def iter(self, obj: ConcreteProxy):
        return iter(obj)

    def keys(self, obj: ConcreteProxy):
        return obj.keys()

    def current_module(self) -> str:
        if not self.module_stack:
            return f"{type(self.root).__name__} (root)"
        qualname, mtype = next(reversed(self.module_stack.values()))
        return f"{qualname} ({getattr(mtype, '__name__', mtype)})"


def user_source() -> str:
    """The innermost stack frame outside torch and this file: where the model's own code stands."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if not path.startswith((_TORCH, _HERE)):
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return "<unknown source>"


@dataclasses.dataclass(frozen=True)
class TensorSummary:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{str(self.dtype).replace('torch.', '')}[{', '.join(map(str, self.shape))}]"


def summarise(value: Any) -> Any:
    """A light, picklable description of an example value for listings and later passes."""
    if isinstance(value, torch.Tensor):
        return TensorSummary(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(summarise(v) for v in value) if not hasattr(value, "_fields") else tuple(
            summarise(v) for v in value
        )
    if isinstance(value, (int, float, bool, str, torch.Size)) or value is None:
        return value
    return type(value).__name__
