"""Plans: a function over pointers, recorded once, replayed on the owner with one message per call.

    @duet.plan
    def train_step(model, opt, x, y):
        opt.zero_grad()
        loss = F.nll_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

The first call with pointers runs the function once with *placeholder*
pointers that record each action (instead of sending it) and sends the list to
the owner as one ``plan_def`` message. Every call then sends one ``plan_run``
message naming the argument pointers and the ids for the results; the owner
replays the actions through its executor (same allowlist and lineage checks
per action; intermediate values stay internal). Results stay remote.

Arguments that are not pointers (numbers, strings) are baked into the
recording; calling with different constants records a new plan. Called with no
pointers at all, the function simply runs locally, so the same code trains
a local model.
"""
from __future__ import annotations

import functools
import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

import torch

from .. import allowlist, containers
from ..errors import NotAllowed
from ..protocol import Msg
from ..wire import Ref
from .pointer import Pointer, RefErrors, refs_in

if TYPE_CHECKING:
    from .client import Scientist

MAX_ACTIONS = 10_000


def _walk(obj: Any) -> Iterator[Any]:
    """The values in a plan's arguments, down to containers.MAX_DEPTH (deeper ones are skipped)."""
    return containers.leaves(obj, prune=True)


class _Recorder:
    """Stands in for the Scientist while a plan is recorded: actions are kept, not sent."""

    def _as_client(self) -> "Scientist":
        """While a plan is traced, the recorder stands in for the scientist its pointers talk to."""
        return cast("Scientist", self)

    def __init__(self, client: Any) -> None:
        self.client = client
        self.actions: List[Dict[str, Any]] = []
        self.labels: List[str] = []
        self._ids = itertools.count()
        self.thread = threading.get_ident()

    def new_placeholder(self, label: str, like: Optional[Pointer] = None) -> Pointer:
        """A stand-in for an argument; for a sent model, one that knows its methods and outputs."""
        from .models import ModelPointer

        if isinstance(like, ModelPointer):
            return like._stand_in(self, next(self._ids), label)
        return Pointer(self._as_client(), next(self._ids), label, kind=like._kind if like is not None else None,
                       length=like._length if like is not None else None)

    # what Pointer calls on its client ------------------------------------------------
    def _call(self, kind: str, name: str, args: List[Any], kwargs: Dict[str, Any], want_result: bool = True,
              result_kind: Optional[str] = None, length: Optional[int] = None) -> Any:
        if kind == "func" and name not in allowlist.FUNCTIONS:
            raise NotAllowed(f"{name} is not on the owner's allowlist")
        bad = allowlist.FORBIDDEN_KWARGS.intersection(kwargs)
        if bad:
            raise NotAllowed(f"keyword argument {sorted(bad)[0]!r} is not allowed remotely")
        if len(self.actions) >= MAX_ACTIONS:
            raise NotAllowed(f"a plan may hold at most {MAX_ACTIONS} actions")
        rid = next(self._ids) if want_result else None
        self.actions.append(
            {"rid": rid, "kind": kind, "name": name, "args": self._encode(list(args)), "kwargs": self._encode(dict(kwargs))}
        )
        self.labels.append(name if kind == "func" else (name if kind == "call" else f".{name}"))
        if rid is None:
            return None
        return Pointer(self._as_client(), rid, f"plan value {name}", kind=result_kind, length=length)

    def _torch_function(self, func: Any, args: Any, kwargs: Dict[str, Any]) -> Any:
        from .client import _TORCH_NAMES

        found = _TORCH_NAMES.lookup(func)
        if found is None:
            fname = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise NotAllowed(f"torch function {fname} is not on the owner's allowlist")
        kind, name = found
        return self._call(kind, name, list(args), kwargs)

    def _free(self, rid: int) -> None:
        pass

    def _meta(self, ptr: Pointer, timeout: Optional[float]) -> Dict[str, Any]:
        raise NotAllowed("a plan cannot read metadata while it is recorded; shapes are not known yet")

    def _request_release(self, ptr: Pointer, reason: str, decode: Any = None) -> Any:
        raise NotAllowed("a plan cannot get values while it is recorded; return them and .get() the result")

    def _encode(self, obj: Any) -> Any:
        return refs_in(obj, self, _PLAN_ARG_ERRORS)


_PLAN_ARG_ERRORS = RefErrors(
    foreign=lambda: NotAllowed(
        "a plan can only use remote objects passed to it as arguments; pass this pointer as an argument"
    ),
    too_deep=lambda: NotAllowed("plan arguments are nested too deeply"),
    module_hint="send a module with scientist.send(module) first, then pass its pointer to the plan",
)


def _template(value: Any, rec: _Recorder, outputs: List[int]) -> Any:
    """The return value's structure, with each pointer replaced by ('$out', index)."""

    def out(value: Any) -> Any:
        if not isinstance(value, Pointer):
            return value
        if value._client is not rec:
            raise NotAllowed("a plan may only return values it computed or was given")
        outputs.append(value._rid)
        return _Out(len(outputs) - 1)

    return containers.map_leaves(value, out, too_deep=lambda: NotAllowed("a plan's result is nested too deeply"))


class _Out:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _fill(template: Any, ptrs: List[Pointer]) -> Any:
    """A template `_template` made, with each output filled in (never deeper than it allowed)."""
    return containers.map_leaves(template, lambda v: ptrs[v.index] if isinstance(v, _Out) else v)


class _Recorded:
    def __init__(self, pid: int, n_inputs: int, constants: Tuple[Any, ...], template: Any, n_outputs: int, ops: List[str]) -> None:
        self.pid = pid
        self.n_inputs = n_inputs
        self.constants = constants
        self.template = template
        self.n_outputs = n_outputs
        self.ops = ops


class Plan:
    """A function recorded once per Duet session and replayed remotely; see the module docs."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._recorded: "weakref.WeakKeyDictionary[Any, List[_Recorded]]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = list(_walk([list(args), kwargs]))
        client = next((a._client for a in flat if isinstance(a, Pointer)), None)
        if client is None:
            return self.fn(*args, **kwargs)  # no pointers: plain local code
        positions, constants = self._split(args, kwargs, client)
        rec = self._find(client, constants)
        if rec is None:
            rec = self._record(client, args, kwargs, positions, constants)
        pointers = [p for p in flat if isinstance(p, Pointer)]
        out_rids = [client._new_rid() for _ in range(rec.n_outputs)]
        client.session.send(
            {"t": Msg.PLAN_RUN, "pid": rec.pid, "args": [Ref(p._rid) for p in pointers], "out": out_rids}
        )
        name = getattr(self.fn, "__name__", "plan")
        ptrs = [Pointer(client, r, f"{name}()[{i}]") for i, r in enumerate(out_rids)]
        return _fill(rec.template, ptrs)

    @staticmethod
    def _split(args: Tuple[Any, ...], kwargs: Dict[str, Any], client: Any) -> Tuple[List[int], Tuple[Any, ...]]:
        positions: List[int] = []
        constants: List[Any] = []
        for i, v in enumerate(_walk([list(args), kwargs])):
            if isinstance(v, Pointer):
                if v._client is not client:
                    raise ValueError("all pointers passed to a plan must belong to the same Duet session")
                positions.append(i)
            else:
                constants.append(v)
        structure = repr(_shape_of([list(args), kwargs]))
        return positions, (structure, tuple(positions), tuple(_const_key(c) for c in constants))

    def _find(self, client: Any, constants: Tuple[Any, ...]) -> Optional[_Recorded]:
        with self._lock:
            for rec in self._recorded.get(client, []):
                if rec.constants == constants:
                    return rec
        return None

    def _record(self, client: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], positions: List[int], constants: Tuple[Any, ...]) -> _Recorded:
        recorder = _Recorder(client)

        def swap(obj: Any, depth: int = 0) -> Any:
            if isinstance(obj, Pointer):
                return recorder.new_placeholder(obj._label, like=obj)
            if isinstance(obj, tuple):
                return tuple(swap(v, depth + 1) for v in obj)
            if isinstance(obj, list):
                return [swap(v, depth + 1) for v in obj]
            if isinstance(obj, dict):
                return {k: swap(v, depth + 1) for k, v in obj.items()}
            return obj

        p_args = swap(list(args))
        p_kwargs = swap(dict(kwargs))
        n_inputs = len(positions)
        previous = getattr(client, "_recorder", None)
        client._recorder = recorder  # scientist.torch.* calls made inside the function are recorded too
        try:
            result = self.fn(*p_args, **p_kwargs)
        finally:
            client._recorder = previous
        outputs: List[int] = []
        template = _template(result, recorder, outputs)
        pid = client._new_rid()
        client.session.send(
            {"t": Msg.PLAN_DEF, "pid": pid, "inputs": n_inputs, "actions": recorder.actions, "outputs": outputs,
             "name": str(getattr(self.fn, "__name__", "plan"))[:80]}
        )
        rec = _Recorded(pid, n_inputs, constants, template, len(outputs), recorder.labels)
        with self._lock:
            self._recorded.setdefault(client, []).append(rec)
        return rec

    def actions(self, client: Any) -> List[str]:
        """The operations recorded for a session (what the owner sees), for display."""
        with self._lock:
            recs = self._recorded.get(client, [])
        return list(recs[-1].ops) if recs else []

    def __repr__(self) -> str:
        return f"<duet.plan {getattr(self.fn, '__name__', '?')}>"


def _shape_of(obj: Any, depth: int = 0) -> Any:
    if isinstance(obj, Pointer):
        return "P"
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_shape_of(v, depth + 1) for v in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, _shape_of(v, depth + 1)) for k, v in obj.items()))
    return "c"


def _const_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.detach().flatten().tolist()[:64], id(value))
    try:
        hash(value)
        return (type(value).__name__, value)
    except TypeError:
        return (type(value).__name__, repr(value))


def plan(fn: Callable[..., Any]) -> Plan:
    """Decorator: record a function over pointers once, replay it remotely with one message per call."""
    return Plan(fn)
