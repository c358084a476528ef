"""Runs one scientist's actions on the owner, within the allowlist.

Names are looked up in `duet.allowlist` tables; dotted paths written there are
resolved once and cached. Nothing that crossed the wire is ever passed to
getattr except names that are keys of those tables. Results must be of safe
types; every result carries the lineage of its inputs.
"""
from __future__ import annotations

import math
import operator as _operator  # noqa: F401  (resolved through _resolve)
import types
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from .. import allowlist
from ..allowlist import Entry
from ..errors import LimitExceeded, NotAllowed
from ..wire import Ref
from .objects import ObjectTable, RemoteObject, memory_ranges, overlaps

_resolved: Dict[str, Callable[..., Any]] = {}

ALIASING_CONSTRUCTORS = {"torch.nn.Sequential", "torch.nn.ModuleList"} | set(allowlist.OPTIMIZERS) | set(
    allowlist.LR_SCHEDULERS
)


def resolve(name: str) -> Callable[..., Any]:
    """The callable behind an allowlisted dotted name."""
    fn = _resolved.get(name)
    if fn is not None:
        return fn
    if name not in allowlist.FUNCTIONS:
        raise NotAllowed(f"{name} is not on the owner's allowlist")
    obj = allowlist.import_dotted(name)
    if obj is None or not callable(obj):
        raise NotAllowed(f"{name} is not available on the owner")
    _resolved[name] = obj
    return obj


def receiver_kind(value: Any) -> str:
    """Which method table applies to a receiver."""
    if isinstance(value, torch.Tensor):
        return "Tensor"
    if isinstance(value, np.ndarray):
        return "ndarray"
    if isinstance(value, torch.nn.Module):
        return "Module"
    if isinstance(value, torch.optim.Optimizer):
        return "Optimizer"
    if isinstance(value, torch.optim.lr_scheduler.LRScheduler):
        return "LRScheduler"
    if isinstance(value, (list, tuple)):
        return "sequence"
    return type(value).__name__


def type_name(value: Any) -> str:
    kind = receiver_kind(value)
    if kind == "Module" or kind == "Optimizer":
        return type(value).__name__
    return kind


# -- safe results ---------------------------------------------------------------
_SAFE_SCALARS = (type(None), bool, int, float, complex, str, torch.dtype, np.dtype, np.generic)
_MAX_RESULT_DEPTH = 8


def _allowed_module(value: torch.nn.Module) -> bool:
    cls = type(value)
    if getattr(cls, "__duet_graph_module__", False):
        return True
    return f"torch.nn.{cls.__name__}" in allowlist.NN_MODULES and cls.__module__.startswith("torch.nn")


def make_safe(value: Any, op: str, depth: int = 0) -> Any:
    """Convert a result to a storable form, or refuse it: only data, modules and optimizers we know."""
    if depth > _MAX_RESULT_DEPTH:
        raise NotAllowed(f"{op} returned a structure nested too deeply")
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.device.type != "cpu":
            raise NotAllowed(f"{op} returned a {value.layout} tensor on {value.device}; only dense CPU tensors are kept")
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            raise NotAllowed(f"{op} returned an array of dtype {value.dtype}; only numeric arrays are kept")
        return value
    if isinstance(value, np.generic) and not isinstance(value, (np.number, np.bool_)):
        raise NotAllowed(f"{op} returned a numpy {type(value).__name__}")
    if isinstance(value, str) and len(value) > 4096:
        raise NotAllowed(f"{op} returned a string too long to keep")
    if isinstance(value, _SAFE_SCALARS):
        return value
    if isinstance(value, torch.Size):
        return value
    if isinstance(value, torch.nn.Module):
        if not _allowed_module(value):
            raise NotAllowed(f"{op} returned a module of type {type(value).__name__}, which is not on the allowlist")
        return value
    if isinstance(value, torch.optim.Optimizer):
        if f"torch.optim.{type(value).__name__}" not in allowlist.OPTIMIZERS:
            raise NotAllowed(f"{op} returned an optimizer of type {type(value).__name__}")
        return value
    if isinstance(value, torch.optim.lr_scheduler.LRScheduler):
        return value
    if isinstance(value, types.GeneratorType) or type(value).__name__ in ("generator", "dict_values", "dict_keys"):
        return [make_safe(v, op, depth + 1) for v in _bounded(value, op)]
    if isinstance(value, tuple):  # includes torch.return_types structseqs
        return tuple(make_safe(v, op, depth + 1) for v in value)
    if isinstance(value, list):
        return [make_safe(v, op, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise NotAllowed(f"{op} returned a dict with {type(k).__name__} keys")
            out[k] = make_safe(v, op, depth + 1)
        return out
    raise NotAllowed(f"{op} returned a {type(value).__name__}, which is not a safe result type")


def _bounded(it: Iterable[Any], op: str, limit: int = 1_000_000) -> Iterable[Any]:
    for i, v in enumerate(it):
        if i >= limit:
            raise NotAllowed(f"{op} returned more than {limit} items")
        yield v


# -- argument resolution -----------------------------------------------------------
def collect_refs(obj: Any, out: List[int], depth: int = 0) -> None:
    """Every object id an action's arguments point at (refusing nesting it could not fully see)."""
    if depth > 32:
        raise NotAllowed("action arguments are nested too deeply")
    if isinstance(obj, Ref):
        out.append(obj.id)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            collect_refs(v, out, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            collect_refs(v, out, depth + 1)


def substitute(obj: Any, table: ObjectTable, depth: int = 0) -> Any:
    """Replace references by the owner's values."""
    if isinstance(obj, Ref):
        return table.get(obj.id).value
    if isinstance(obj, list):
        return [substitute(v, table, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(substitute(v, table, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return {k: substitute(v, table, depth + 1) for k, v in obj.items()}
    return obj


# -- size guards for factories -------------------------------------------------------
def _ints(obj: Any) -> List[int]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int):
        return [obj]
    if isinstance(obj, (list, tuple, torch.Size)):
        out: List[int] = []
        for v in obj:
            out.extend(_ints(v))
        return out
    return []


def _product(values: Iterable[int]) -> int:
    total = 1
    for v in values:
        total *= max(int(v), 0)
        if total > 2**62:
            return 2**62
    return total


def requested_elements(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any], target: Any = None) -> int:
    """How many elements a factory call would allocate, computed before running it."""
    short = name.rsplit(".", 1)[-1]
    size_kw = kwargs.get("size", kwargs.get("shape"))
    if short == "arange":
        nums = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        start, end, step = 0.0, 0.0, 1.0
        if len(nums) == 1:
            end = nums[0]
        elif len(nums) >= 2:
            start, end = nums[0], nums[1]
            step = nums[2] if len(nums) > 2 else kwargs.get("step", 1.0)
        start = kwargs.get("start", start)
        end = kwargs.get("end", kwargs.get("stop", end))
        step = kwargs.get("step", step) or 1.0
        try:
            return max(int(math.ceil((float(end) - float(start)) / float(step))), 0)
        except (TypeError, ValueError, OverflowError, ZeroDivisionError):
            return 0
    if short in ("linspace", "logspace"):
        steps = kwargs.get("steps", kwargs.get("num", args[2] if len(args) > 2 else 50))
        return int(steps) if isinstance(steps, int) else 0
    if short in ("randint",):
        if size_kw is not None:
            return _product(_ints(size_kw))
        tail = [a for a in args if isinstance(a, (tuple, list, torch.Size))]
        return _product(_ints(tail[-1])) if tail else 1
    if short in ("full", "new_full"):
        return _product(_ints(args[0] if args else size_kw))
    if short in ("normal", "uniform", "choice", "random"):
        if size_kw is not None:
            return _product(_ints(size_kw))
        shaped = [a for a in args if isinstance(a, (tuple, list, torch.Size))]
        if shaped:
            return _product(_ints(shaped[-1]))
        if short == "random" and args and isinstance(args[0], int):
            return args[0]
        return 1
    if short == "eye" or short == "identity":
        n = _ints(args[:1])
        m = _ints(args[1:2]) or n
        return _product(n + m)
    if short == "repeat" and target is not None:
        return _product([int(getattr(target, "numel", lambda: 1)())] + _ints(args))
    if size_kw is not None:
        return _product(_ints(size_kw))
    return _product(_ints(args))


# -- the action --------------------------------------------------------------------
def lookup(kind: str, name: str, target: Any) -> Tuple[Entry, Callable[..., Any], str]:
    """Find the allowlist entry and the callable for an action; refuse anything else."""
    if kind == "func":
        entry = allowlist.FUNCTIONS.get(name)
        if entry is None:
            raise NotAllowed(f"{name} is not on the owner's allowlist")
        if name in ALIASING_CONSTRUCTORS:
            entry = allowlist.ALIAS
        elif name in allowlist.NN_MODULES:
            entry = allowlist.FACTORY  # layer sizes come from integer arguments
        return entry, resolve(name), name
    rkind = receiver_kind(target)
    if kind == "method":
        entry = allowlist.METHODS.get(rkind, {}).get(name)
        label = f"{rkind}.{name}"
        if entry is None:
            raise NotAllowed(f"{label} is not on the owner's allowlist")
        return entry, getattr(target, name), label
    if kind == "attr":
        entry = allowlist.ATTRIBUTES.get(rkind, {}).get(name)
        label = f"{rkind}.{name}"
        if entry is None:
            raise NotAllowed(f"attribute {label} is not on the owner's allowlist")
        return entry, (lambda: getattr(target, name)), label
    if kind == "call":
        if rkind != "Module":
            raise NotAllowed(f"a {type_name(target)} cannot be called")
        return allowlist.MODULE_CALL, target, f"{type(target).__name__}.forward"
    raise NotAllowed(f"unknown action kind {kind!r}")


def leaf_tensors(roots: Iterable[torch.Tensor], limit: int = 1_000_000) -> List[torch.Tensor]:
    """Leaves of the autograd graph behind these tensors (what backward writes .grad into)."""
    leaves: List[torch.Tensor] = []
    seen = set()
    stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    stack += []
    while stack and len(seen) < limit:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if isinstance(var, torch.Tensor):
            leaves.append(var)
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


class Executor:
    """Applies one scientist's actions to their object table, in order."""

    def __init__(self, table: ObjectTable) -> None:
        self.table = table

    def describe(self, kind: str, name: str, args: List[Any]) -> str:
        """A label for an action, for errors and the permission queue."""
        if kind == "func":
            return name
        target = args[0] if args else None
        if isinstance(target, Ref) and target.id in self.table:
            return f"{receiver_kind(self.table.get(target.id).value)}.{name}" if kind != "call" else "forward"
        return name

    def inputs_of(self, args: Any, kwargs: Any) -> List[int]:
        refs: List[int] = []
        collect_refs(args, refs)
        collect_refs(kwargs, refs)
        return refs

    def lineage_of(self, rids: Iterable[int]) -> Tuple[set, List[str], bool]:
        """Union of lineage and operations of the inputs, and whether all their shapes are public."""
        lineage: set = set()
        ops: List[str] = []
        shape_public = True
        seen_groups = set()
        for rid in rids:
            obj = self.table.get(rid)
            shape_public = shape_public and obj.shape_public
            if id(obj.group) in seen_groups:
                continue
            seen_groups.add(id(obj.group))
            lineage |= obj.group.lineage
            for op in obj.group.ops:
                if op not in ops:
                    ops.append(op)
        return lineage, ops, shape_public

    def run(self, rid: Optional[int], kind: str, name: str, args: List[Any], kwargs: Dict[str, Any]) -> Optional[RemoteObject]:
        """Execute one action and store its result under rid."""
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise NotAllowed("malformed action: args must be a list and kwargs a dict")
        bad = allowlist.FORBIDDEN_KWARGS.intersection(kwargs)
        if bad:
            raise NotAllowed(f"keyword argument {sorted(bad)[0]!r} is not allowed")
        input_ids = self.inputs_of(args, kwargs)
        values = substitute(args, self.table)
        kw = substitute(kwargs, self.table)
        target = values[0] if (kind in ("method", "attr", "call") and values) else None
        if kind in ("method", "attr", "call"):
            if not args or not isinstance(args[0], Ref):
                raise NotAllowed(f"{kind} {name}: the first argument must be a remote object")
        entry, fn, label = lookup(kind, name, target)
        call_args = values[1:] if kind in ("method", "call") else values
        if kind == "attr" and (len(values) != 1 or kw):
            raise NotAllowed(f"attribute {label} takes no arguments")
        if entry.factory:
            n = requested_elements(name, tuple(call_args), kw, target=target)
            if n > self.table.limits.max_elements_per_object:
                # The count may derive from private values: name the limit, never n.
                raise LimitExceeded(
                    f"{label} would allocate more than {self.table.limits.max_elements_per_object} elements"
                )
            self.table.check_room(n)  # at least one byte per element
        lineage, ops, shape_public = self.lineage_of(input_ids)
        ops = ops + [label]

        if isinstance(fn, np.ufunc) and len(call_args) > fn.nin:
            raise NotAllowed(f"{label}: an output array passed by position is not allowed")
        result = fn() if kind == "attr" else fn(*call_args, **kw)
        safe = make_safe(result, label)

        # Whatever the table says, an input whose memory the result shares is an
        # alias (x.float() may return x itself; numpy may write into an input):
        # it joins the result's group and takes its lineage.
        result_ranges = memory_ranges(safe) if input_ids else []
        shared = [i for i in dict.fromkeys(input_ids) if result_ranges and overlaps(result_ranges, memory_ranges(self.table.get(i).value))]
        if shared and not entry.alias:  # declared aliases merge below anyway
            self.table.taint(shared, lineage, [label])

        if entry.mutates and input_ids:
            mutated = [args[0].id] if kind in ("method", "call") and isinstance(args[0], Ref) else input_ids[:1]
            self.table.taint(mutated, lineage, [label])
        if label in ("Tensor.backward", "torch.autograd.backward"):
            roots = [v for v in (values[:1] if kind == "method" else _flatten_tensors(call_args[:1]))]
            self.table.taint_holders(leaf_tensors(roots), lineage, [label])
        if rid is None:
            return None
        private_shape = entry.private_shape or (
            label in ("operator.getitem",) and any(isinstance(v, (torch.Tensor, np.ndarray)) for v in _flatten(call_args[1:]))
        )
        alias_of = input_ids if entry.alias else shared
        return self.table.put(
            rid, safe, lineage=lineage, ops=ops, shape_public=shape_public and not private_shape, alias_of=alias_of
        )


def _flatten(obj: Any) -> List[Any]:
    if isinstance(obj, (list, tuple)):
        out: List[Any] = []
        for v in obj:
            out.extend(_flatten(v))
        return out
    return [obj]


def _flatten_tensors(obj: Any) -> List[torch.Tensor]:
    return [v for v in _flatten(obj) if isinstance(v, torch.Tensor)]
