"""Turning the scientist's `nn.Module` into data the owner can check: graph + specs + weights.

`describe(module)` traces the module with `torch.fx.symbolic_trace` and writes
what it found as plain data (see `duet.owner.models` for the format and the
owner's checks). Nothing callable crosses the wire: functions travel as dotted
names from `duet.allowlist`, submodules as allowlisted class names plus
constructor arguments, weights as tensors. The submodules and attributes get
names the owner would choose anyway (`m0`, `a0`, ...); the scientist keeps the
map back to their own names, so `get()` returns the scientist's module class
with the trained weights loaded.

The scientist side refuses an off-list call early with a clear message; only
the owner's check counts.
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import inspect
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import allowlist, containers
from ..errors import NotAllowed, NotAllowedHere

FORMAT = "duet.fx/1"
MAX_STR = 256

_names: Optional[Dict[int, str]] = None
_lock = threading.Lock()


def _function_names() -> Dict[int, str]:
    """id(function) -> its allowlisted dotted name, for the functions a graph may call."""
    global _names
    with _lock:
        if _names is not None:
            return _names
        table: Dict[int, str] = {}
        for name in graph_function_names():
            obj = allowlist.import_dotted(name)
            if obj is not None:
                table.setdefault(id(obj), name)
        table[id(builtins.getattr)] = "builtins.getattr"
        _names = table
        return table


def graph_function_names() -> List[str]:
    """Allowlisted functions a model graph may call (the owner checks the same table)."""
    return sorted(allowlist.GRAPH_FUNCTIONS)


def _qualname(fn: Any) -> str:
    """The name a user would write for a function (for refusals), e.g. torch.fft.fft."""
    import sys

    for modname in ("torch", "torch.nn.functional", "torch.fft", "torch.linalg", "torch.special", "operator", "builtins", "math", "os"):
        mod = sys.modules.get(modname)
        if mod is None:
            continue
        for attr in dir(mod):
            if not attr.startswith("_") and getattr(mod, attr, None) is fn:
                return f"{modname}.{attr}"
    return _raw_qualname(fn)


def _raw_qualname(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    if mod in ("torch._C._VariableFunctions", "torch._VariableFunctionsClass", "torch._C"):
        mod = "torch"
    if mod.startswith("torch._C._"):
        mod = "torch." + mod[len("torch._C._"):]
    return f"{mod}.{name}" if mod else str(name)


def _module_spec(mod: torch.nn.Module, path: str) -> Dict[str, Any]:
    cls = type(mod)
    qual = f"torch.nn.{cls.__name__}"
    if qual not in allowlist.NN_MODULES or not cls.__module__.startswith("torch.nn") or getattr(torch.nn, cls.__name__, None) is not cls:
        raise NotAllowed(f"model uses submodule {path!r} of type {cls.__module__}.{cls.__qualname__}, which is not on the allowlist")
    kwargs: Dict[str, Any] = {}
    for pname, param in _constructor_parameters(cls).items():
        if pname in ("self", "device", "dtype", "mode") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if pname == "bias" and hasattr(mod, "bias"):
            bias = getattr(mod, "bias")
            kwargs["bias"] = bias if isinstance(bias, bool) else bias is not None  # RNNs keep a bool
            continue
        if not hasattr(mod, pname):
            continue
        value = getattr(mod, pname)
        if pname == "proj_size" and cls is not torch.nn.LSTM:
            continue  # RNNBase keeps it, but GRU and RNN refuse it even when 0
        if _plain(value):
            kwargs[pname] = value
    return {"cls": qual, "kwargs": kwargs}


def _constructor_parameters(cls: type) -> Dict[str, inspect.Parameter]:
    """The named parameters of the first constructor up the class's MRO that has some.

    nn.LSTM, nn.GRU and nn.RNN take `*args, **kwargs` and pass them to RNNBase, whose
    signature names them; `nonlinearity` is RNN's own.
    """
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = dict(inspect.signature(init).parameters)
        if any(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for n, p in params.items() if n != "self"):
            if cls is torch.nn.RNN:
                params["nonlinearity"] = inspect.Parameter("nonlinearity", inspect.Parameter.KEYWORD_ONLY)
            return params
    return {}


PLAIN_DEPTH = 4  # the owner accepts constructor arguments this deep (duet.owner.models.PLAIN_DEPTH)


def _plain(value: Any) -> bool:
    """None, bools, numbers and short strings, in tuples and lists at most PLAIN_DEPTH deep."""
    try:
        return all(_plain_leaf(v) for v in containers.leaves(value, max_depth=PLAIN_DEPTH, is_mapping=containers.never))
    except containers.TooDeep:
        return False


def _plain_leaf(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return len(value) <= MAX_STR
    return False


class Described:
    """What crosses the wire for a model, and what the scientist keeps to map the weights back."""

    def __init__(self, graph: Dict[str, Any], keymap: Dict[str, str], outputs: Optional[Dict[str, Optional[int]]] = None,
                 unavailable: Optional[Dict[str, str]] = None) -> None:
        self.graph = graph
        self.keymap = keymap  # owner's state_dict key -> the scientist's key
        self.outputs = outputs or {}  # method -> length of its tuple/list output (None: a single value)
        self.unavailable = unavailable or {}  # method -> why it could not be traced


def describe(module: torch.nn.Module, methods: Optional[List[str]] = None) -> Described:
    """Trace a module into graphs of allowlisted operations plus weights; refuse off-list calls.

    `forward` always; other public methods of the model's own class too (`vae.decode(z)`), traced on
    a copy so tracing cannot change the module. With `methods`, exactly those, and a method that
    cannot be traced is an error; without, such a method is only unavailable remotely (it says why).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError("describe() takes an nn.Module")
    gm = _traced_twice(module)
    funcs = _function_names()
    modules: List[Dict[str, Any]] = []
    module_index: Dict[str, int] = {}
    attrs: List[Dict[str, Any]] = []
    attr_names: Dict[str, str] = {}
    state: Dict[str, torch.Tensor] = {}
    keymap: Dict[str, str] = {}
    def convert(gm: torch.fx.GraphModule) -> List[List[Any]]:
        """One traced graph as node lists; submodules, attributes and weights go to the shared tables."""
        nodes: List[List[Any]] = []
        index: Dict[Any, int] = {}

        def arg(value: Any) -> Any:
            """A node's argument as sent: nodes as {"$node": index}, as deep as the owner accepts."""
            return containers.walk(value, visit_arg,
                                   too_deep=lambda: NotAllowed("model graph arguments are nested too deeply"))

        def visit_arg(value: Any, inner: Callable[[Any], Any]) -> Any:
            if isinstance(value, torch.fx.Node):
                return {"$node": index[value]}
            if isinstance(value, tuple):
                return tuple(inner(v) for v in value)
            if isinstance(value, list):
                return [inner(v) for v in value]
            if isinstance(value, dict):
                raise NotAllowed("model graph arguments may not hold dicts")
            if value is None or isinstance(value, (bool, int, float, complex, torch.dtype, slice, type(Ellipsis))):
                if isinstance(value, slice):  # its parts count one level deeper
                    return slice(inner(value.start), inner(value.stop), inner(value.step))
                return value
            if isinstance(value, str):
                if len(value) > MAX_STR:
                    raise NotAllowed("model graph holds a string constant that is too long")
                return value
            if isinstance(value, torch.Size):
                return tuple(int(v) for v in value)
            if isinstance(value, torch.device):
                raise NotAllowed("model graph refers to a device; models run on the owner's CPU")
            raise NotAllowed(f"model graph holds a constant of type {type(value).__name__}, which cannot be sent")

        for node in gm.graph.nodes:
            op, target = node.op, node.target
            if op == "placeholder":
                default = node.args[0] if node.args else None
                if node.args and not _plain(default):
                    raise NotAllowed("model inputs may only have plain default values")
                out: List[Any] = ["placeholder", None, [default] if node.args else [], {}]
            elif op == "call_module":
                sub = gm.get_submodule(target)
                if target not in module_index:
                    # keyed by the original module object's path (may be shared by several call sites)
                    module_index[target] = len(modules)
                    modules.append(_module_spec(sub, target))
                    i = module_index[target]
                    for k, v in sub.state_dict(keep_vars=True).items():
                        state[f"m{i}.{k}"] = v.detach()
                        keymap[f"m{i}.{k}"] = f"{target}.{k}"
                out = ["call_module", module_index[target], arg(node.args), {k: arg(v) for k, v in node.kwargs.items()}]
            elif op == "get_attr":
                if target not in attr_names:
                    value = _get_attr(gm, target)
                    prefix = target.rsplit(".", 1)[0] if "." in target else None
                    if prefix in module_index:  # e.g. self.conv.weight, where conv is also called
                        attr_names[target] = f"m{module_index[prefix]}.{target.rsplit('.', 1)[1]}"
                    else:
                        name = f"a{len(attrs)}"
                        kind = "parameter" if isinstance(value, torch.nn.Parameter) else "buffer"
                        attrs.append({"kind": kind, "requires_grad": bool(value.requires_grad)})
                        state[name] = value.detach()
                        keymap[name] = target
                        attr_names[target] = name
                out = ["get_attr", attr_names[target], [], {}]
            elif op == "call_function":
                found = funcs.get(id(target))
                if found is None:
                    raise NotAllowed(f"model uses {_qualname(target)}, which is not on the allowlist")
                name = found
                if name == "builtins.getattr":
                    attr = node.args[1] if len(node.args) > 1 else None
                    if not isinstance(attr, str) or attr not in allowlist.TENSOR_ATTRIBUTES:
                        raise NotAllowed(f"model reads attribute {attr!r}, which is not on the allowlist")
                out = ["call_function", name, arg(node.args), {k: arg(v) for k, v in node.kwargs.items()}]
            elif op == "call_method":
                if target not in allowlist.GRAPH_METHODS:
                    raise NotAllowed(f"model uses Tensor.{target}, which is not allowed in a model")
                out = ["call_method", target, arg(node.args), {k: arg(v) for k, v in node.kwargs.items()}]
            elif op == "output":
                out = ["output", None, arg(node.args), {}]
            else:
                raise NotAllowed(f"model graph has a node of kind {op!r}")
            index[node] = len(nodes)
            nodes.append(out)
        return nodes

    nodes = convert(gm)
    method_graphs: Dict[str, List[List[Any]]] = {}
    outputs: Dict[str, Optional[int]] = {"forward": _output_length(gm)}
    unavailable: Dict[str, str] = {}
    for name, traced in _trace_methods(module, methods).items():
        if isinstance(traced, str):
            unavailable[name] = traced
            continue
        try:
            method_graphs[name] = convert(traced)
        except NotAllowed as exc:
            if methods is not None:
                raise NotAllowed(f"method {name}: {exc}") from None
            unavailable[name] = str(exc)
            continue
        outputs[name] = _output_length(traced)
    # Modules no graph calls (and parameters none reads) stay with the scientist.
    graph = {
        "format": FORMAT,
        "modules": modules,
        "attrs": attrs,
        "state": state,
        "nodes": nodes,
        "methods": method_graphs,
        "training": bool(module.training),
    }
    return Described(graph, keymap, outputs, unavailable)


MAX_METHODS = 32


def _traced_twice(module: torch.nn.Module, method: str = "forward") -> torch.fx.GraphModule:
    """A trace of one method, refused when two traces differ (a value computed on this side, frozen)."""
    gm = _trace(module, method)
    again = _trace(module, method)
    if gm.code != again.code or not _same_constants(gm, again):
        raise NotAllowed(
            f"the model's {method} computes a value on your side that changes from call to call (Python's "
            "random, numpy.random, the time, ...); it would be frozen into the graph as a constant. "
            "Use torch random functions (torch.randn, torch.randn_like, dropout): they stay random on the owner"
        )
    return gm


def model_methods(module: torch.nn.Module) -> List[str]:
    """Public methods the model's own classes define (not nn.Module's): candidates to call remotely."""
    names: List[str] = []
    for klass in type(module).__mro__:
        if klass is torch.nn.Module or not issubclass(klass, torch.nn.Module) or klass.__module__.startswith("torch."):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name == "forward" or name in names or hasattr(torch.nn.Module, name):
                continue
            if inspect.isfunction(value):
                names.append(name)
    return names[:MAX_METHODS]


def _trace_methods(module: torch.nn.Module, wanted: Optional[List[str]]) -> Dict[str, Any]:
    """Each method's trace (on a copy of the module), or why it could not be traced."""
    if wanted is not None:
        known = set(model_methods(module))
        for name in wanted:
            if name not in known:
                raise ValueError(f"{type(module).__name__} has no public method {name!r} of its own to send")
    names = model_methods(module) if wanted is None else [n for n in wanted if n != "forward"]
    out: Dict[str, Any] = {}
    scratch = copy_module(module) if names else module
    for name in names:
        try:
            out[name] = _traced_twice(scratch, name)
        except (NotAllowed, TypeError) as exc:
            if wanted is not None:
                raise NotAllowed(f"method {name}: {exc}") from None
            out[name] = str(exc)
    return out


def _output_length(gm: torch.fx.GraphModule) -> Optional[int]:
    """How many values a graph returns when it returns a tuple or list (`mu, logvar = model(x)`)."""
    for node in gm.graph.nodes:
        if node.op == "output":
            value = node.args[0]
            return len(value) if isinstance(value, (tuple, list)) else None
    return None


# torch random functions that take no tensor (allowlist.GRAPH_RANDOM_FACTORIES): called in forward,
# they would run once at trace time and be frozen as constants. Recorded as graph nodes instead; the
# owner draws them from your generator.
_RANDOM_FACTORIES: Tuple[Any, ...] = tuple(allowlist.import_dotted(n) for n in sorted(allowlist.GRAPH_RANDOM_FACTORIES))


_tracing = threading.local()
_patch_lock = threading.Lock()


def _recorded(original: Any) -> Any:
    """`original`, except on a thread that is tracing: there the call becomes a graph node."""

    @functools.wraps(original)
    def call(*args: Any, **kwargs: Any) -> Any:
        tracer = getattr(_tracing, "tracer", None)
        if tracer is None:
            return original(*args, **kwargs)
        return tracer.create_proxy("call_function", original, args, kwargs)

    return call


@contextlib.contextmanager
def _random_as_nodes(tracer: torch.fx.Tracer) -> Iterator[None]:
    """While tracing: `torch.randn(...)` and the like become nodes, not constants.

    A function mode cannot do it: with a traced size (`torch.randn(x.shape[0], 2)`) torch's
    argument parser fails before any mode sees the call. So the names are swapped on the
    torch module for the trace, as fx itself swaps `Module.__call__`; other threads still
    reach the originals.
    """
    with _patch_lock:
        saved = {f.__name__: f for f in _RANDOM_FACTORIES}
        for name, f in saved.items():
            setattr(torch, name, _recorded(f))
        _tracing.tracer = tracer
        try:
            yield
        finally:
            _tracing.tracer = None
            for name, f in saved.items():
                setattr(torch, name, f)


class _RandomRanForReal(TorchDispatchMode):
    """While tracing: notes random operations that ran on real tensors (their results would be frozen)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.ops.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def _trace(module: torch.nn.Module, method: str = "forward") -> torch.fx.GraphModule:
    """symbolic_trace of one method, with random calls kept random, and errors that say what went wrong."""
    tracer = torch.fx.Tracer()
    tracer.traced_func_name = method
    ran = _RandomRanForReal()
    try:
        with _random_as_nodes(tracer), ran:
            graph = tracer.trace(module)
    except Exception as exc:
        raise NotAllowed(f"the model could not be traced into a graph: {_trace_failure(exc)}") from exc
    if ran.ops:
        raise NotAllowed(
            f"the model's forward draws random numbers into a tensor that does not depend on its inputs "
            f"({ran.ops[0]}); it would be frozen into the graph as a constant. Draw with torch.randn(...), "
            f"torch.rand_like(x) or x.new_empty(...).normal_() instead: they stay random on the owner"
        )
    return torch.fx.GraphModule(tracer.root, graph, type(module).__name__)


def _trace_failure(exc: BaseException) -> str:
    """What went wrong while tracing, and how to fix it, in the user's terms."""
    text = str(exc)
    if "not installed as a submodule" in text:
        return ("forward builds a module while it runs (like nn.Tanh()(x)); create it in __init__ "
                "(self.act = nn.Tanh()) or use the function (torch.tanh(x))")
    if "cannot be used as inputs to control flow" in text:
        return "Python control flow (if, while, bool()) depends on a traced value; use torch operations (torch.where) instead"
    if "'len' is not supported" in text:
        return "len() of a traced value; use x.shape[0] instead"
    if "torch.fx.proxy.Proxy" in text:
        return "forward calls the owner (scientist.torch..., a pointer); a sent model uses torch and its own modules, as local code would"
    return f"{type(exc).__name__}: {text}"


def _same_constants(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    """Whether two traces captured equal constant tensors (made at trace time, outside the module's state)."""
    own = {n for n, _ in a.named_buffers()} | {n for n, _ in a.named_parameters()}
    for node in a.graph.nodes:
        if node.op == "get_attr" and node.target not in own:
            x, y = _get_attr(a, node.target), _get_attr(b, node.target)
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def _get_attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise NotAllowed(f"model reads attribute {target!r}, which is not a tensor")
    return obj


def copy_module(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a module, sharing the Python modules it keeps a reference to (`self.torch = torch`)."""
    import copy
    import types

    memo: Dict[int, Any] = {}
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, types.ModuleType):
                memo[id(value)] = value
    try:
        return copy.deepcopy(module, memo)
    except Exception as exc:
        raise TypeError(
            f"the model cannot be copied ({type(exc).__name__}: {exc}); Duet keeps a copy to give back your "
            f"class with the trained weights. Remove attributes that cannot be copied (open files, locks, clients)"
        ) from None


def rebuild(template: torch.nn.Module, state: Dict[str, Any], keymap: Dict[str, str]) -> torch.nn.Module:
    """A copy of the scientist's own module with the weights the owner released."""
    if not isinstance(state, dict):
        raise NotAllowed("the owner released something that is not a model's weights")
    mine = {}
    own_keys = set(template.state_dict().keys())
    for key, value in state.items():
        name = keymap.get(key)
        if name is None or not isinstance(value, torch.Tensor):
            raise NotAllowed(f"the released weights hold an unexpected entry {key!r}")
        if name in own_keys:
            mine[name] = value
    model = copy_module(template)
    missing, unexpected = model.load_state_dict(mine, strict=False)
    if unexpected:
        raise NotAllowed(f"the released weights do not fit the model: {unexpected[:3]}")
    return model


from .pointer import Pointer, _RemoteMethod  # noqa: E402


class ModelPointer(Pointer):
    """A pointer to a model sent with `scientist.send(module)`; `.get()` returns your module class, trained."""

    __slots__ = ("_template", "_keymap", "_outputs", "_unavailable")

    def __init__(self, client: Any, rid: int, label: str, template: torch.nn.Module, described: Described) -> None:
        super().__init__(client, rid, label, kind="Module")
        object.__setattr__(self, "_template", template)  # a copy: later changes to the local module do not count
        object.__setattr__(self, "_keymap", dict(described.keymap))
        object.__setattr__(self, "_outputs", dict(described.outputs))
        object.__setattr__(self, "_unavailable", dict(described.unavailable))

    def __call__(self, *args: Any, **kwargs: Any) -> Pointer:
        return self._client._call("call", "forward", [self, *args], kwargs, length=self._outputs.get("forward"))

    def _stand_in(self, client: Any, rid: int, label: str) -> "ModelPointer":
        """The same model's methods and outputs on another client (a plan's placeholder)."""
        other = object.__new__(ModelPointer)
        Pointer.__init__(other, client, rid, label, kind="Module")
        for slot in ModelPointer.__slots__:
            object.__setattr__(other, slot, getattr(self, slot))
        return other

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_"):
            if name in self._outputs:
                return _RemoteMethod(self, name, kind="call", length=self._outputs.get(name))
            if name in self._unavailable:
                raise NotAllowedHere(f"{name} of the sent model cannot run remotely: {self._unavailable[name]}")
        return super().__getattr__(name)

    def __dir__(self) -> List[str]:
        return sorted(set(object.__dir__(self)) | set(self._outputs) | set(allowlist.MODULE_METHODS))

    def _decoder(self) -> Any:
        return self._decode

    def _decode(self, raw: Any) -> torch.nn.Module:
        value = self._client._decode_release(raw)
        if not isinstance(value, dict) or "state" not in value:
            raise NotAllowed("the owner released something that is not a model")
        return rebuild(self._template, value["state"], self._keymap)
