"""Runs one scientist's actions on the owner, within the allowlist, with lineage from what they did.

The allowlist (`duet.allowlist`) decides *what may run*. What an action's
results and effects derive from is decided from facts observed while it runs:

1. **Flow.** Everything the action read: the value and metadata lineage of
   every input (``all``), and what could have influenced sizes, indices,
   flags and control flow (``meta``): the inputs' metadata lineage, plus the
   value lineage of inputs that are Python data (ints, lists, slices, keys),
   whose values are used as sizes and indices.
2. **Effects.** Every object the action could have changed whose lineage would
   grow (arguments, their contents, a module's parameters and buffers, an
   optimizer's state, every holder of a tensor that can receive a gradient)
   is watched: memory writes as torch reports them (`duet.owner.effects`),
   numpy writes trapped by read-only flags, and changes of structure
   (`duet.owner.footprint`). A changed object takes the flow's lineage.
   When the set of writes itself may depend on private data (values were
   read back into Python, or Python library code ran with private metadata
   or Python arguments), every watched object is treated as changed.
3. **Results.** A result's values take ``all``. Its metadata takes ``meta``
   only when a shadow run on meta tensors (`duet.owner.shapes`) predicts it
   exactly; a plain Python result so predicted (``x.size(0)``) takes ``meta``
   for its value too. A result that shares state with inputs joins their
   alias group; when which inputs it shares with may depend on private data,
   it joins every input's group.

Names that crossed the wire are only ever used as keys of the allowlist's
tables. ``empty*`` allocate zeroed memory; every random operation draws from
the scientist's own generator (`duet.owner.randomness`).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import operator as _operator  # noqa: F401  (resolved through allowlist.import_dotted)
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import numpy as np
import torch

from .. import allowlist, containers
from ..allowlist import Entry
from ..errors import LimitExceeded, NotAllowed, RemoteError, UnknownObject
from ..wire import Ref
from . import bounds, he, numpy_random, shapes
from . import frames  # pandas, optional: a no-op unless pandas is loaded
from .effects import Observer, active, reads_watched
from .footprint import Footprint, arrays_in, footprint, grad_of, ranges_overlap, structure, tensor_range, tensors_in
from .objects import ObjectTable, RemoteObject
from .opchain import OpChain
from .privacy import facts
from .randomness import ActionRandomness, Randomness

log = logging.getLogger(__name__)

_resolved: Dict[str, Callable[..., Any]] = {}

# Uninitialised memory never reaches a scientist: these allocate zeroed.
ZEROED = {
    "torch.empty": "torch.zeros",
    "torch.empty_like": "torch.zeros_like",
    "numpy.empty": "numpy.zeros",
    "numpy.empty_like": "numpy.zeros_like",
    **{name: "duet.owner.legacy." + name.rsplit(".", 1)[1] for name in allowlist.LEGACY_CONSTRUCTORS},
}
ZEROED_METHODS = {"new_empty": "new_zeros"}


def resolve(name: str) -> Callable[..., Any]:
    """The callable behind an allowlisted dotted name."""
    fn = _resolved.get(name)
    if fn is not None:
        return fn
    if name not in allowlist.FUNCTIONS:
        raise NotAllowed(f"{name} is not on the owner's allowlist")
    obj = allowlist.import_dotted(ZEROED.get(name, name))
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
    if isinstance(value, torch.distributions.Distribution):
        return "Distribution"
    return frames.kind(value) or type(value).__name__


def type_name(value: Any) -> str:
    kind = receiver_kind(value)
    if kind == "Module" or kind == "Optimizer":
        return type(value).__name__
    return kind


# -- safe results ---------------------------------------------------------------
_SAFE_SCALARS = (type(None), bool, int, float, complex, str, torch.dtype, np.dtype, np.generic)
# Fewer levels than arguments may have (containers.MAX_DEPTH): a stored result can always be
# released, and the release snapshot (host.snapshot) takes 8 levels too.
_MAX_RESULT_DEPTH = 8


def _allowed_module(value: torch.nn.Module) -> bool:
    cls = type(value)
    if getattr(cls, "__duet_graph_module__", False):
        return True
    return f"torch.nn.{cls.__name__}" in allowlist.NN_MODULES and cls.__module__.startswith("torch.nn")


def make_safe(value: Any, op: str) -> Any:
    """Convert a result to a storable form, or refuse it: only data, modules and optimizers we know."""

    def visit(value: Any, inner: Callable[[Any], Any]) -> Any:
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
        if isinstance(value, torch.distributions.Distribution):
            if f"torch.distributions.{type(value).__name__}" not in allowlist.DISTRIBUTIONS or \
                    not type(value).__module__.startswith("torch.distributions"):
                raise NotAllowed(f"{op} returned a distribution of type {type(value).__name__}, which is not on the allowlist")
            return value
        if isinstance(value, types.GeneratorType) or type(value).__name__ in ("generator", "dict_values", "dict_keys"):
            return [inner(v) for v in _bounded(value, op)]
        if isinstance(value, tuple):  # includes torch.return_types structseqs
            return tuple(inner(v) for v in value)
        if isinstance(value, list):
            return [inner(v) for v in value]
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, (str, int)):
                    raise NotAllowed(f"{op} returned a dict with {type(k).__name__} keys")
                out[k] = inner(v)
            return out
        if frames.kind(value) is not None:
            return frames.make_safe(value, op)  # a deep copy of a frame that can travel
        raise NotAllowed(f"{op} returned a {type(value).__name__}, which is not a safe result type")

    return containers.walk(value, visit, max_depth=_MAX_RESULT_DEPTH,
                           too_deep=lambda: NotAllowed(f"{op} returned a structure nested too deeply"))


def _bounded(it: Iterable[Any], op: str, limit: int = 1_000_000) -> Iterable[Any]:
    for i, v in enumerate(it):
        if i >= limit:
            raise NotAllowed(f"{op} returned more than {limit} items")
        yield v


# -- argument resolution -----------------------------------------------------------
# Arguments are nested at most as deep as a wire message may be (wire.Limits.max_depth): a
# deeper action is refused, not partly resolved. `substitute` and `plans.remap` walk arguments
# that `collect_refs` has already checked, with the same limit.
ACTION_ARG_DEPTH = 32


def arguments_too_deep() -> NotAllowed:
    return NotAllowed("action arguments are nested too deeply")


def collect_refs(obj: Any, out: List[int]) -> None:
    """Every object id an action's arguments point at (refusing nesting it could not fully see)."""
    flat = containers.flat_values(obj)
    if flat is not None:
        out.extend(v.id for v in flat if isinstance(v, Ref))
        return
    out.extend(v.id for v in containers.leaves(obj, max_depth=ACTION_ARG_DEPTH, too_deep=arguments_too_deep)
               if isinstance(v, Ref))


def substitute(obj: Any, table: ObjectTable) -> Any:
    """Replace references by the owner's values."""
    return containers.map_leaves(obj, lambda v: table.get(v.id).value if isinstance(v, Ref) else v,
                                 max_depth=ACTION_ARG_DEPTH, too_deep=arguments_too_deep)


# -- lookups -------------------------------------------------------------------------
def lookup(kind: str, name: str, target: Any) -> Tuple[Entry, str]:
    """The allowlist entry and the label of an action; refuses anything off the list."""
    if kind == "func":
        entry = allowlist.FUNCTIONS.get(name)
        if entry is None:
            raise NotAllowed(f"{name} is not on the owner's allowlist")
        if name in allowlist.NN_MODULES:
            entry = allowlist.FACTORY  # layer sizes come from integer arguments
        return entry, name
    rkind = receiver_kind(target)
    if kind == "method":
        entry = allowlist.METHODS.get(rkind, {}).get(name)
        label = f"{rkind}.{name}"
        if entry is None:
            raise NotAllowed(f"{label} is not on the owner's allowlist")
        return entry, label
    if kind == "attr":
        entry = allowlist.ATTRIBUTES.get(rkind, {}).get(name)
        label = f"{rkind}.{name}"
        if entry is None:
            raise NotAllowed(f"attribute {label} is not on the owner's allowlist")
        return entry, label
    if kind == "call":
        if rkind != "Module":
            raise NotAllowed(f"a {type_name(target)} cannot be called")
        if name != "forward" and name not in model_methods(target):
            raise NotAllowed(f"{type(target).__name__}.{str(name)[:64]} is not a method sent with this model")
        return allowlist.MODULE_CALL, f"{type(target).__name__}.{name}"
    raise NotAllowed(f"unknown action kind {kind!r}")


def _callable(kind: str, name: str, target: Any, rng: ActionRandomness) -> Callable[..., Any]:
    """The owner's callable for a looked-up action (names are allowlist keys by now)."""
    if kind == "func":
        if name.startswith("numpy.random."):
            fn = numpy_random.bind(name.rsplit(".", 1)[1], rng)
            if fn is None:
                raise NotAllowed(f"{name} is not available on the owner")
            return fn
        return resolve(name)
    if kind == "method":
        if isinstance(target, torch.Tensor) and name == "resize_as_":
            return lambda other: _resize_as_zeroed(target, other)
        if frames.kind(target) is not None:
            return frames.method(target, name)
        return getattr(target, ZEROED_METHODS.get(name, name)) if isinstance(target, torch.Tensor) else getattr(target, name)
    if kind == "attr":
        if name == "grad" and isinstance(target, torch.Tensor):
            return lambda: grad_of(target)  # None for a non-leaf that keeps none, without torch's warning
        return lambda: getattr(target, name)
    return target if name == "forward" else model_methods(target)[name]  # "call": the module, or a method's graph


def model_methods(module: Any) -> Dict[str, Any]:
    """The other methods of a model the scientist sent (`decode`), by name; none for other modules."""
    methods = getattr(module, "__dict__", {}).get("duet_methods") if getattr(type(module), "__duet_graph_module__", False) else None
    return methods if isinstance(methods, dict) else {}


def _resize_as_zeroed(target: torch.Tensor, other: Any) -> torch.Tensor:
    """`resize_as_` without exposing memory it does not own.

    A larger storage is zeroed beyond what the tensor held. torch changes a
    tensor's sizes before it finds that its storage cannot grow (it was shared
    with numpy), leaving a tensor larger than its memory: refuse that case
    first, and put the old geometry back should torch fail anyway.
    """
    storage = target.untyped_storage()
    before = storage.nbytes()
    if isinstance(other, torch.Tensor):
        needed = (target.storage_offset() + other.numel()) * target.element_size()
        if needed > before and not storage.resizable():
            raise NotAllowed("resize_as_: this tensor's memory is shared with numpy and cannot grow")
    geometry = (target.storage_offset(), tuple(target.shape), target.stride())
    try:
        target.resize_as_(other)
    except Exception:
        with torch.no_grad():
            target.set_(storage, geometry[0], geometry[1], geometry[2])
        raise
    storage = target.untyped_storage()
    if storage.nbytes() > before:
        raw = torch.empty(0, dtype=torch.uint8).set_(storage)
        with torch.no_grad():
            raw[before:].zero_()
    return target


def _is_builtin(fn: Any) -> bool:
    """C-implemented callables: which inputs they write is fixed by their schema, not by Python code."""
    return isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodWrapperType,
                           types.WrapperDescriptorType, np.ufunc)) or getattr(fn, "__module__", "") == "_operator"


@dataclass(frozen=True)
class _Prediction:
    """What the shadow run on meta tensors said of an action."""

    description: Any  # the result's structure (shapes.describe)
    random: bool  # it drew random numbers


# -- flow ----------------------------------------------------------------------------
@dataclass
class Flow:
    """What an action read: lineage of everything (`all`), and of what could steer sizes and flags (`meta`)."""

    all: Set[str] = field(default_factory=set)
    meta: Set[str] = field(default_factory=set)
    ops: OpChain = field(default_factory=OpChain)

    @property
    def private(self) -> bool:
        return bool(self.all)


_CONTAINER_OPS = {"operator.getitem", "operator.setitem", "operator.contains", "operator.add", "operator.mul",
                  "operator.iadd", "operator.imul"}


def flow_of(table: ObjectTable, input_ids: List[int], kind: str, name: str, target: Any) -> Flow:
    """The lineage an action reads, from its inputs."""
    flow = Flow()
    seen_groups: Set[int] = set()
    first = table.get(input_ids[0]).value if input_ids else None
    # Indexing a Python container: the key decides which object comes out, whatever its type;
    # which object sits where is the container's metadata.
    container = isinstance(target if kind != "func" else first, (list, tuple, dict)) and (kind != "func" or name in _CONTAINER_OPS)
    for i, rid in enumerate(input_ids):
        obj = table.get(rid)
        if id(obj.group) not in seen_groups:
            seen_groups.add(id(obj.group))
            flow.ops.merge(obj.group.ops)
        flow.all |= obj.group.lineage | obj.meta
        flow.meta |= obj.meta
        is_container = container and i == 0
        if (container and not is_container) or (not is_container and not _is_data(obj.value)):
            flow.meta |= obj.group.lineage
    return flow


def _is_data(value: Any) -> bool:
    """Tensors, arrays and models: their contents are computed on, not used as sizes or keys."""
    return isinstance(value, (torch.Tensor, np.ndarray, torch.nn.Module, torch.optim.Optimizer,
                              torch.optim.lr_scheduler.LRScheduler)) or frames.kind(value) is not None


# -- watching effects ------------------------------------------------------------------
@dataclass
class _Watched:
    obj: RemoteObject
    footprint: Footprint
    structure: tuple


class Watch:
    """Objects an action could change whose lineage would grow, as they were before it ran."""

    def __init__(self, table: ObjectTable, flow: Flow, input_ids: List[int], values: Any) -> None:
        self.table = table
        self.flow = flow
        candidates = list(dict.fromkeys(input_ids))
        if any(t.grad_fn is not None or t.requires_grad for t in tensors_in(values)):
            # A backward may reach any tensor that can receive a gradient, by graph, not by argument.
            candidates += table.holders(_holds_gradient)
        self.watched: Dict[int, _Watched] = {}
        self.skipped: List[int] = []  # could learn nothing, unless the action turns out to be in doubt
        for rid in dict.fromkeys(candidates):
            obj = table.get(rid)
            members = [table.get(m) for m in obj.group.members if m in table]
            # Another pointer to the same object (any member of the group) must already know it too.
            # A group with DP facts is always watched: a write must drop them, whatever the lineage.
            if flow.all <= obj.group.lineage and all(flow.meta <= m.meta for m in members) \
                    and not table.has_facts(obj.group):
                self.skipped.append(rid)
                continue
            fp = footprint(obj.value)
            self.watched[rid] = _Watched(obj, fp, structure(obj.value))
        self._readonly: List[np.ndarray] = []

    @property
    def active(self) -> bool:
        return bool(self.watched)

    def protect_arrays(self, writable: Iterable[np.ndarray]) -> None:
        """Make watched numpy arrays read-only, except the declared target of an in-place op."""
        allowed = {id(a) for a in writable}
        for w in self.watched.values():
            for arr in arrays_in(w.obj.value):
                if id(arr) not in allowed and arr.flags.writeable:
                    arr.flags.writeable = False
                    self._readonly.append(arr)

    def restore_arrays(self) -> None:
        for arr in self._readonly:
            try:
                arr.flags.writeable = True
            except ValueError:  # pragma: no cover - a base made read-only meanwhile
                pass
        self._readonly = []

    def changed(self, written: List[Tuple[int, int]], declared: Set[int]) -> Tuple[List[int], Dict[int, Footprint]]:
        """Watched objects whose memory or structure changed, and everyone's new footprint."""
        out: List[int] = []
        new: Dict[int, Footprint] = {}
        for rid, w in self.watched.items():
            fp = footprint(w.obj.value)
            new[rid] = fp
            if rid in declared or ranges_overlap(w.footprint.ranges + fp.ranges, written) or structure(w.obj.value) != w.structure:
                out.append(rid)
        return out, new


def _read_only_views(value: Any, views: List[np.ndarray]) -> Any:
    """Tensors in numpy arguments replaced by read-only ndarray views of the same memory.

    Values nested deeper than containers.MAX_DEPTH are passed as they are.
    """

    def view(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.device.type != "cpu" \
                or value.dtype == torch.bfloat16:
            return value
        arr = value.detach().numpy().view()  # a view of the view: its base stays writable, so this one can be again
        arr.flags.writeable = False
        views.append(arr)
        return arr

    return containers.map_leaves(value, view, prune=True)


def _writable_again(views: List[np.ndarray], result: Any) -> None:
    """After the call: the views, and results that are views of them, writable as numpy made them."""
    for arr in views:
        try:
            arr.flags.writeable = True
        except ValueError:  # pragma: no cover - numpy refused; the view stays read-only
            pass
    ids = {id(v) for v in views}
    for arr in arrays_in(result):
        base, chain = arr, []
        while isinstance(base, np.ndarray) and id(base) not in ids and base.base is not None:
            chain.append(base)
            base = base.base
        if isinstance(base, np.ndarray) and id(base) in ids:
            for a in [arr] + chain:
                try:
                    a.flags.writeable = True
                except ValueError:  # pragma: no cover
                    pass


def withheld_failure(label: str) -> RemoteError:
    """The one error a scientist sees when an action on private inputs fails, whatever the cause."""
    return RemoteError(label, "Error", "the details are withheld because the inputs derive from private data; "
                                       "the owner's log has them")


def _holds_gradient(obj: Any) -> bool:
    """From the live value, not the stored footprint: a list's tensor may have been given
    requires_grad through another pointer since the list was last an input."""
    return any(t.requires_grad for t in tensors_in(obj.value))


def _bump_versions(value: Any, written: List[Tuple[int, int]]) -> None:
    """Tell autograd that written memory changed, so a graph that saved the old values refuses to run."""
    for t in tensors_in(value):
        r = tensor_range(t)
        if r is not None and ranges_overlap([r], written):
            try:
                torch.autograd.graph.increment_version(t)
            except Exception:  # pragma: no cover - inference tensors
                pass


# -- the action --------------------------------------------------------------------
class Executor:
    """Applies one scientist's actions to their object table, in order."""

    def __init__(self, table: ObjectTable, randomness: Optional[Randomness] = None) -> None:
        self.table = table
        self.randomness = randomness or Randomness()
        self.he_context: Any = None  # the scientist's public CKKS context, once sent (duet.owner.he)
        self._shadows: Dict[Any, Tuple[Any, int, int, bool]] = {}  # signature -> (prediction, elements, bytes, random)
        self._chain: Optional[List[str]] = None

    def describe(self, kind: str, name: str, args: List[Any]) -> str:
        """A label for an action, for errors and the permission queue: only names Duet knows."""
        try:
            target = None
            if kind in ("method", "attr", "call"):
                if not args or not isinstance(args[0], Ref) or args[0].id not in self.table:
                    return "action"
                target = self.table.get(args[0].id).value
            label = lookup(kind, name, target)[1]
            return self._public_label(kind, name, label, args[0].id if target is not None else None)
        except NotAllowed:
            return "refused action"

    def _public_label(self, kind: str, name: str, label: str, target_id: Optional[int]) -> str:
        """A label that never names the type of a receiver whose type is private.

        (Picked from a list by a private index, a receiver may be a tensor in one
        run and an array in another; "Tensor.sum" would tell which.)
        """
        if target_id is None or target_id not in self.table or not self.table.get(target_id).meta:
            return label
        if kind == "call":
            return "forward" if name == "forward" else f"model.{name}"
        return f"(private type).{name}"

    def inputs_of(self, args: Any, kwargs: Any) -> List[int]:
        refs: List[int] = []
        collect_refs(args, refs)
        collect_refs(kwargs, refs)
        return list(dict.fromkeys(refs))

    def lineage_of(self, rids: Iterable[int]) -> Tuple[set, List[str], bool]:
        """Union of lineage and operations of some objects, and whether all their shapes are public."""
        lineage: set = set()
        ops = OpChain()
        shape_public = True
        for rid in rids:
            obj = self.table.get(rid)
            shape_public = shape_public and obj.shape_public
            lineage |= obj.lineage
            ops.merge(obj.group.ops)
        return lineage, list(ops.labels()), shape_public

    def run(self, rid: Optional[int], kind: str, name: str, args: List[Any], kwargs: Dict[str, Any],
            rng: Optional[ActionRandomness] = None, chain: Optional[List[str]] = None) -> Optional[RemoteObject]:
        """Execute one action and store its result under rid.

        `chain`: the operations to record for what this action changes or makes, instead of its
        own label (a plan's actions record the whole plan, so how far a failing plan got never
        shows in the operations of what it touched).
        """
        rng = rng if rng is not None else self.randomness.for_action()
        self._chain = chain
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise NotAllowed("malformed action: args must be a list and kwargs a dict")
        bad = allowlist.FORBIDDEN_KWARGS.intersection(kwargs)
        if bad:
            raise NotAllowed(f"keyword argument {sorted(bad)[0]!r} is not allowed")
        if kind in ("method", "attr", "call") and (not args or not isinstance(args[0], Ref)):
            raise NotAllowed(f"{kind} {name}: the first argument must be a remote object")
        input_ids = self.inputs_of(args, kwargs)
        values = substitute(args, self.table)
        kw = substitute(kwargs, self.table)
        if he.involved(values, kw):
            return self._run_encrypted(rid, kind, name, values, kw, input_ids)
        target = values[0] if kind in ("method", "attr", "call") else None
        try:
            entry, label = lookup(kind, name, target)
            frames.check_call(kind, name, args, kwargs, values, kw)  # pandas: plain arguments, each on its list
        except NotAllowed:
            if target is not None and self.table.get(args[0].id).meta:  # the refusal would name a private type
                raise NotAllowed(f"{name} is not allowed on this value, whose type depends on private data") from None
            raise
        if target is not None:
            label = self._public_label(kind, name, label, args[0].id)
        call_args = values[1:] if kind in ("method", "call") else values
        if kind == "attr" and (len(values) != 1 or kw):
            raise NotAllowed(f"attribute {label} takes no arguments")
        flow = flow_of(self.table, input_ids, kind, name, target)
        if kind == "func" and name == "torch.manual_seed":
            return self._manual_seed(rid, call_args, kw, flow)
        fn = _callable(kind, name, target, rng)
        dtypes = self._check_writes_by_position(fn, label, call_args, kw)  # decided by the program alone
        try:
            obj = self._run_flow(rid, kind, name, label, entry, target, values, call_args, kw, input_ids, flow, rng,
                                 fn, dtypes, (args, kwargs))
        except Exception as exc:
            if not flow.private or isinstance(exc, UnknownObject):
                raise
            # Which check refused, or whether torch failed instead, may depend on private data (a
            # size, a dtype, a result's type): every failure on private inputs reads the same.
            log.warning("%s failed on private inputs", label, exc_info=True)  # the owner's log has the details
            raise withheld_failure(label) from None
        return obj

    def _run_encrypted(self, rid: Optional[int], kind: str, name: str, values: List[Any], kw: Dict[str, Any],
                       input_ids: List[int]) -> Optional[RemoteObject]:
        """An action on the scientist's ciphertexts (duet.owner.he): a short list of operations. The
        result reads everything the action read (a private model's weights make it private), and its
        metadata too (its size follows the model)."""
        label = f"encrypted {name}" if kind != "call" else "encrypted model call"
        flow = flow_of(self.table, input_ids, kind, name, values[0] if kind != "func" else None)
        try:
            result = he.run(kind, name, values, kw, self.he_context, self.table.check_room)
        except (NotAllowed, LimitExceeded):
            if flow.private:
                raise withheld_failure(label) from None  # which check refused may depend on private shapes
            raise
        except Exception:
            if flow.private:
                raise withheld_failure(label) from None
            raise NotAllowed(f"{label} failed: TenSEAL refused it (more multiplications than the context's "
                             "depth allows? the default context takes a Linear layer and a square)") from None
        if rid is None:
            return None
        lineage = set(flow.all)
        obj = self.table.put(rid, result, lineage=lineage, ops=[], meta=lineage)
        chain = flow.ops.copy()
        self._record(chain, label)
        obj.group.ops.merge(chain)
        return obj

    def _fact_of(self, kind: str, name: str, args: List[Any], kwargs: Dict[str, Any], fn: Any,
                 input_ids: List[int]) -> Tuple[Any, str]:
        """What declared bounds say of the result (duet.owner.privacy.facts), from public facts only;
        (None, "") when no input has a fact."""
        inputs = [self.table.get(r) for r in input_ids if r in self.table]
        if not any(o.dp is not None for o in inputs):
            # Say why, when an input lost its fact (changed in place) or never had one for a reason.
            return None, next((o.dp_why for o in inputs if o.dp_why and o.private), "")

        def lookup(rid: int) -> Tuple[Any, bool, Any]:
            o = self.table.get(rid)
            return o.dp, o.private, o.value

        try:
            return facts.derive(kind, name, [facts.argument(a, lookup) for a in args],
                                {k: facts.argument(v, lookup) for k, v in kwargs.items()}, fn)
        except facts.Refused as exc:
            return None, str(exc)
        except Exception:  # a bug here must never cost the action: no fact, and the owner's log says why
            log.warning("deriving the DP fact of %s failed", name, exc_info=True)
            return None, "an internal error (see the owner's log)"

    def _run_flow(self, rid: Optional[int], kind: str, name: str, label: str, entry: Entry, target: Any,
                  values: List[Any], call_args: List[Any], kw: Dict[str, Any], input_ids: List[int], flow: Flow,
                  rng: ActionRandomness, fn: Any, dtypes: List[Any], raw: Tuple[List[Any], Dict[str, Any]]) -> Optional[RemoteObject]:
        """The part of an action after its names are checked: sizes, the run, effects, the result."""
        bounds.check_dtype_arguments(dtypes)
        self._check_python(label, name, kind, call_args)
        frame_bytes = frames.result_bytes(kind, name, target, call_args, kw)  # pandas: before it runs
        if frame_bytes:
            self.table.check_room(frame_bytes)

        # How many objects a result will hold, before anything builds them (a (10**7, 0) tensor's
        # tolist or unbind makes ten million objects out of zero bytes).
        bounds.check_outputs(name, target if kind == "method" else None, call_args, kw, MAX_PYTHON_ITEMS, bounds.MAX_PIECES)
        # Sizes first: from a shadow run on meta tensors where one exists, else from the arguments.
        predicted = self._shadow(kind, name, fn, target, call_args, kw)
        n = 0
        if entry.factory:
            n = bounds.requested_elements(name, fn, tuple(call_args), kw, target=target if kind == "method" else None)
        elif kind == "func" and name.startswith("numpy."):
            n = bounds.numpy_elements(name, fn, tuple(call_args), kw)
        bounds.check_elements(n, self.table.limits.max_elements_per_object, label)
        self.table.check_room(n * bounds.itemsize_of(kw.get("dtype")))

        views: List[np.ndarray] = []
        if kind == "func" and name.startswith("numpy."):
            # numpy reads a tensor through a zero-copy view and could write through it (percentile's
            # overwrite_input) where torch sees nothing: hand it read-only views instead.
            call_args, kw = _read_only_views(call_args, views), _read_only_views(kw, views)
        watch = Watch(self.table, flow, input_ids, [values, kw]) if flow.private else None
        declared = self._declared_writes(kind, name, entry, target, input_ids, values)
        tracking = watch is not None and (watch.active or bool(watch.skipped))
        if tracking:
            assert watch is not None
            watch.protect_arrays(self.table.get(r).value for r in declared)
        # Without a shadow run nothing has checked the sizes of what runs inside: check them op by op.
        unpredicted = predicted is shapes.UNAVAILABLE
        guard = self.table.limits.max_elements_per_object if unpredicted else None
        observer = Observer(rng, track=tracking, max_elements=guard)
        # The observer is needed to watch writes, to give random operations the scientist's generator,
        # or to check sizes; a shadow run that drew nothing proves the real one draws nothing either.
        observe = tracking or unpredicted or predicted.random
        failure: Optional[BaseException] = None
        result: Any = None
        try:
            with (active(observer) if observe else contextlib.nullcontext()), \
                    (reads_watched(observer) if flow.private and (tracking or unpredicted) else contextlib.nullcontext()):
                result = fn() if kind == "attr" else fn(*call_args, **kw)
        except Exception as exc:  # effects count even when the action fails half way (index_put_ out of range)
            failure = exc
        finally:
            if watch is not None:
                watch.restore_arrays()
        if views:
            _writable_again(views, result)
        doubt = self._apply_effects(watch, observer, flow, label, kind, fn, target, input_ids, declared, failure)
        self._tie_inputs(input_ids, doubt)
        if failure is not None:
            if isinstance(failure, ValueError) and "read-only" in str(failure):
                raise NotAllowed(f"{label} tried to write into an argument it does not own; refused") from None
            raise failure
        safe = make_safe(result, label)  # (a refusal naming a private type is reworded by run)

        if rid is None:
            return None
        fact, why = self._fact_of(kind, name, raw[0], raw[1], fn, input_ids)
        obj = self._store(rid, safe, flow, label, input_ids, predicted.description if not unpredicted else predicted, fact)
        obj.dp, obj.dp_why = fact, why
        return obj

    # -- pieces of run ------------------------------------------------------------------
    def _apply_effects(self, watch: Optional[Watch], observer: Observer, flow: Flow, label: str, kind: str, fn: Any,
                       target: Any, input_ids: List[int], declared: Set[int], failure: Optional[BaseException]) -> bool:
        """What changed takes the flow's lineage; returns whether the action's writes were in doubt.

        In doubt (the set of writes may itself depend on private data: values were
        read back into Python, or Python library code ran with private metadata or
        Python arguments), everything watched counts as changed.
        """
        python_code = not _is_builtin(fn) or kind == "call"
        # A failure half way through several operations wrote some and not others, depending on where
        # it failed: in doubt too.
        # A private Python number or bool as an argument (requires_grad_(b), transpose_(0, i)) can
        # change metadata without writing a byte: whatever it reached may have changed, shape included.
        # An input whose type is private may be such a number too.
        private_scalar = flow.private and any(
            obj.private and (bool(obj.meta) or isinstance(obj.value, (bool, int, float, complex, str, np.generic)))
            for obj in map(self.table.get, input_ids))
        doubt = flow.private and (observer.read_values or (bool(flow.meta) and python_code) or failure is not None
                                  or private_scalar)
        everything = observer.read_values or failure is not None or private_scalar  # metadata taint: all it read
        fresh: Dict[int, Footprint] = {}
        if watch is not None and doubt and watch.skipped:
            # In doubt the metadata taint is everything read; what was skipped may not have it yet.
            chain = flow.ops.copy()
            self._record(chain, label)
            self.table.taint(watch.skipped, flow.all, chain, flow.all if everything else flow.meta)
        if watch is not None and watch.active:
            changed, fresh = watch.changed(observer.written, declared)
            written = list(watch.watched) if doubt else changed
            meta = flow.all if everything else flow.meta
            is_stateful_receiver = isinstance(target, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler))
            if kind == "method" and is_stateful_receiver and input_ids and input_ids[0] in watch.watched:
                written.append(input_ids[0])  # Python state (step counts, learning rates) has no write counter
            written = list(dict.fromkeys(written))
            if written:
                chain = flow.ops.copy()
                self._record(chain, label)
                self.table.taint(written, flow.all, chain, meta)
            # Copies of this memory saved for backward (under any alias) are now stale, whether torch
            # wrote it or numpy did (numpy has no version counter: its declared writes count whole).
            ranges = list(observer.written)
            for r in declared:
                ranges.extend(footprint(self.table.get(r).value).ranges)
            if ranges:
                groups = {id(self.table.get(r).group): self.table.get(r).group for r in list(changed) + list(declared)}
                for group in groups.values():
                    for member in list(group.members):
                        if member in self.table:
                            _bump_versions(self.table.get(member).value, ranges)
        for r in input_ids:
            obj = self.table.get(r)
            obj.footprint = fresh.get(r) or footprint(obj.value)
        return doubt

    def _shadow(self, kind: str, name: str, fn: Any, target: Any, call_args: List[Any], kw: Dict[str, Any]) -> Any:
        """The result's structure as predicted on meta tensors, with the sizes it would allocate checked.

        The outcome depends only on the arguments' metadata, so it is kept per signature:
        a training loop pays for one shadow run per distinct shape.
        """
        found = frames.predict(kind, name, target, call_args, kw, shapes.UNAVAILABLE)
        if found is not None:  # pandas: predicted on a frame of zeros, for value-independent operations only
            return found if found is shapes.UNAVAILABLE else _Prediction(found, False)
        if kind == "func" and (name.startswith("numpy.") or name in allowlist.NN_MODULES or name in allowlist.OPTIMIZERS
                               or name in allowlist.LR_SCHEDULERS):
            return shapes.UNAVAILABLE
        if kind in ("method", "attr") and not isinstance(target, (torch.Tensor, torch.nn.Module)):
            return shapes.UNAVAILABLE
        if kind == "method" and isinstance(target, torch.nn.Module) and name not in _MODULE_READS:
            return shapes.UNAVAILABLE
        if not isinstance(target, (torch.Tensor, torch.nn.Module)) \
                and not any(isinstance(t, torch.Tensor) for t in _flat([call_args, kw])):
            return shapes.UNAVAILABLE
        try:
            key: Any = (kind, name, shapes.signature([target, call_args, kw]))
        except shapes.Uncacheable:
            key = None
        cached = self._shadows.get(key) if key is not None else None
        if cached is None:
            meter = bounds.SizeMeter()
            if kind == "call":
                predicted = shapes.shadow(fn, call_args, kw, meter=meter)
            elif kind == "method":
                predicted = shapes.shadow(None, [target] + list(call_args), kw, target_method=ZEROED_METHODS.get(name, name),
                                          meter=meter)
            elif kind == "attr":
                predicted = shapes.shadow(None, [target], {}, target_method=name, meter=meter, attribute=True)
            else:
                predicted = shapes.shadow(fn, call_args, kw, meter=meter)
            cached = (predicted, meter.largest_elements, meter.peak, meter.random)
            if key is not None:
                self._shadows[key] = cached
                while len(self._shadows) > SHADOW_CACHE:
                    self._shadows.pop(next(iter(self._shadows)))
        predicted, largest_elements, peak_bytes, random = cached
        limit = self.table.limits.max_elements_per_object
        if largest_elements > limit:
            raise LimitExceeded(f"{name} would allocate more than {limit} elements")
        self.table.check_room(peak_bytes)
        return _Prediction(predicted, random) if predicted is not shapes.UNAVAILABLE else predicted

    def _check_writes_by_position(self, fn: Any, label: str, call_args: List[Any], kw: Dict[str, Any]) -> List[Any]:
        """Refuse writes into arguments by position (numpy's `out`: dot(a, b, out)); the dtypes asked for."""
        dtypes = [kw.get("dtype")]
        if isinstance(fn, np.ufunc):
            if len(call_args) > fn.nin:
                raise NotAllowed(f"{label}: an output array passed by position is not allowed")
            return dtypes
        module = getattr(fn, "__module__", "") or ""
        if module.startswith("numpy") or label.startswith("numpy."):
            try:
                bound = inspect.signature(fn).bind(*call_args, **kw)
            except (TypeError, ValueError):
                bound = None  # the call itself will fail
            for pname in bound.arguments if bound is not None else ():
                if pname == "out" or pname.startswith("out"):
                    raise NotAllowed(f"{label}: writing into an `{pname}` argument is not allowed")
            if bound is not None:
                dtypes.append(bound.arguments.get("dtype"))
        return dtypes

    def _check_python(self, label: str, name: str, kind: str, call_args: List[Any]) -> None:
        if kind == "func" and name.startswith("operator."):
            limits = self.table.limits
            bounds.check_python_arithmetic(name, call_args, limits.max_python_bits, MAX_PYTHON_ITEMS)

    def _declared_writes(self, kind: str, name: str, entry: Entry, target: Any, input_ids: List[int], values: List[Any]) -> Set[int]:
        """numpy arrays and Python containers have no write counters: an in-place operation's target is
        written by definition. (Comparing identities would not do: CPython shares small ints, so
        `lst[0] = private_int` could look like no change at all.)"""
        first = target if kind == "method" else (values[0] if values else None)
        if isinstance(first, (np.ndarray, list, dict)) and entry.mutates and input_ids:
            return {input_ids[0]}
        return set()

    def _record(self, chain: OpChain, label: str) -> None:
        """Add this action to a chain. Inside a plan, the plan's whole chain, counted once per
        object, not once per action: how many of its actions ran must not show."""
        if self._chain:
            chain.merge(OpChain(self._chain))
        else:
            chain.extend([label])

    def taint_reachable(self, rids: List[int], label: str, chain: Optional[List[str]] = None) -> None:
        """After a failure part way through several actions (a plan): everything they could have
        changed takes everything they read, since how far they got may depend on private data."""
        rids = [r for r in dict.fromkeys(rids) if r in self.table]
        flow = flow_of(self.table, rids, "func", "plan", None)
        if not flow.private:
            return
        values = [self.table.get(r).value for r in rids]
        candidates = list(rids)
        if any(t.grad_fn is not None or t.requires_grad for t in tensors_in(values)):
            candidates += self.table.holders(_holds_gradient)
        ops = flow.ops.copy()
        ops.merge(OpChain(chain or [label]))
        self.table.taint(candidates, flow.all, ops, flow.all)
        for r in candidates:
            obj = self.table.get(r)
            obj.footprint = footprint(obj.value)
        self._tie_inputs(rids, doubt=True)

    def _tie_inputs(self, input_ids: List[int], doubt: bool) -> None:
        """Inputs that now share state (load_state_dict(assign=True), state_dict(destination=)) form one group.

        In doubt, which inputs came to share state may depend on private data: all of them do.
        """
        with_state = [r for r in input_ids if not self.table.get(r).footprint.empty]
        if len(with_state) < 2:
            return
        if doubt:
            self.table.merge(with_state)
            return
        for i, r1 in enumerate(with_state):
            o1 = self.table.get(r1)
            for r2 in with_state[i + 1:]:
                o2 = self.table.get(r2)
                if o1.group is not o2.group and o1.footprint.intersects(o2.footprint):
                    self.table.merge([r1, r2])

    def _store(self, rid: int, safe: Any, flow: Flow, label: str, input_ids: List[int], predicted: Any,
               fact: Any = None) -> RemoteObject:
        value_lineage, meta_lineage = set(flow.all), set(flow.all)
        if flow.all != flow.meta and predicted is shapes.UNAVAILABLE and fact is not None and facts.form_agrees(fact, safe):
            # The facts module predicted the result's type, shape and dtype from public facts alone (the
            # same call made on exemplars), as a shadow run would: its metadata is as public as theirs.
            # Only its metadata: the values were not predicted.
            meta_lineage = set(flow.meta)
        elif flow.all != flow.meta and predicted is not shapes.UNAVAILABLE:
            try:
                agrees = predicted == shapes.describe(safe)
            except Exception:
                agrees = False
            if agrees:
                meta_lineage = set(flow.meta)
                if not shapes.holds_data(safe):
                    value_lineage = set(flow.meta)  # computed from metadata alone (x.size(0), x.dim())
        fp = footprint(safe)
        if flow.meta:
            # Which inputs the result shares state with may depend on private metadata: all of them.
            # (Not only those with memory: whether an input or the result has any, a tensor or a
            # Python number, can be the private fact itself.)
            alias_of = list(input_ids)
        else:
            alias_of = [r for r in input_ids if fp.intersects(self.table.get(r).footprint)]
        obj = self.table.put(rid, safe, lineage=value_lineage, ops=[], meta=meta_lineage, alias_of=alias_of, fp=fp)
        chain = flow.ops.copy()  # merged, not extended: a write may have recorded this action already
        self._record(chain, label)
        obj.group.ops.merge(chain)
        return obj

    def _manual_seed(self, rid: Optional[int], call_args: List[Any], kw: Dict[str, Any], flow: Flow) -> Optional[RemoteObject]:
        """`scientist.torch.manual_seed(n)`: seeds this scientist's own generator, never the owner's."""
        if flow.private:
            raise NotAllowed("manual_seed takes a public number: a seed derived from private data would make later random values private")
        seed = call_args[0] if call_args else kw.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise NotAllowed("manual_seed takes an int")
        self.randomness.manual_seed(int(seed))
        if rid is None:
            return None
        return self.table.put(rid, None, lineage=(), ops=["torch.manual_seed"])


SHADOW_CACHE = 4096
MAX_PYTHON_ITEMS = 1_000_000  # a Python list or string an action may build (strings over 4096 are refused anyway)
_MODULE_READS = frozenset({"parameters", "buffers", "children", "modules", "state_dict"})


def _flat(obj: Any) -> List[Any]:
    """The values in lists, tuples and dicts, down to containers.MAX_DEPTH (a dict's values count two levels)."""

    def visit(v: Any, inner: Callable[[Any], List[Any]]) -> List[Any]:
        if isinstance(v, (list, tuple)):
            return [x for item in v for x in inner(item)]
        if isinstance(v, dict):
            return inner(list(v.values()))
        return [v]

    return containers.walk(obj, visit, beyond=lambda _v: [])
