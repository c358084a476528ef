"""Watching an action run: which memory torch wrote, whether values steered Python, and randomness.

An :class:`Observer` is a ``TorchDispatchMode`` active while one scientist's
action runs on the owner. It sees every ATen operation below autograd,
including those inside library code, a model's forward and backward, and:

- records the storage of every argument the operation writes, as torch's own
  schema says (``Tensor(a!)``), refined by torch's ``SchemaInfo`` for the
  operations whose writes depend on an argument (batch norm's running
  statistics are written only when ``training``);
- notes when tensor values were read back into Python (``item()``, ``bool()``,
  ``equal``): from then on the action's control flow, and so what it wrote,
  may depend on values;
- gives every random operation the action's own generator
  (:mod:`duet.owner.randomness`), and refuses one that cannot take it.

Nothing here decides lineage; the executor does, from these facts.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import LimitExceeded, NotAllowed
from .bounds import check_pieces
from .footprint import Range, tensor_range
from .randomness import ActionRandomness

aten = torch.ops.aten

# Operations that turn tensor values into Python values (and so can steer control flow).
_READS_VALUES = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::item"}


@dataclass(frozen=True)
class _OpInfo:
    writes: Tuple[int, ...]  # positions of arguments the schema marks as written
    sizes: Tuple[int, ...]  # positions of int-list arguments that size a new tensor
    value_dependent_writes: bool  # writes depend on argument values (e.g. `training`)
    names: Tuple[str, ...]
    random: bool
    has_generator: bool
    reads_values: bool


_INFO: Dict[Any, _OpInfo] = {}
_INFO_LOCK = threading.Lock()


def _info(func: Any) -> _OpInfo:
    info = _INFO.get(func)
    if info is not None:
        return info
    schema = func._schema
    args = schema.arguments
    writes = tuple(i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write)
    sizes = tuple(i for i, a in enumerate(args)
                  if a.name in ("size", "sizes", "repeats") and str(a.type).lower() in ("list[int]", "int[]", "symint[]"))
    info = _OpInfo(
        writes=writes,
        sizes=sizes,
        value_dependent_writes=any(a.name == "training" or a.name == "train" for a in args),
        names=tuple(a.name for a in args),
        random=torch.Tag.nondeterministic_seeded in func.tags,
        has_generator=any(a.name == "generator" for a in args),
        reads_values=schema.name in _READS_VALUES,
    )
    with _INFO_LOCK:
        _INFO[func] = info
    return info


try:  # entering a mode through `with` costs ~50 us in torch 2.13 (compile bookkeeping); these cost ~5
    from torch.utils._python_dispatch import _pop_mode, _push_mode
except ImportError:  # pragma: no cover - other torch versions
    _push_mode = _pop_mode = None  # type: ignore[assignment]


@contextlib.contextmanager
def active(mode: TorchDispatchMode) -> Iterator[TorchDispatchMode]:
    """Run the block under a dispatch mode, cheaply (an action runs under two of them)."""
    if _push_mode is None:
        with mode:
            yield mode
        return
    _push_mode(mode)
    try:
        yield mode
    finally:
        _pop_mode()


def _argument(info: _OpInfo, i: int, args: tuple, kwargs: Dict[str, Any]) -> Any:
    if i < len(args):
        return args[i]
    return kwargs.get(info.names[i])


def _written_by_values(func: Any, info: _OpInfo, args: tuple, kwargs: Dict[str, Any]) -> List[int]:
    """Positions written for this call, for ops whose writes depend on flags like `training`."""
    schema_info = torch._C._SchemaInfo(func._schema)
    values = {}
    for i, name in enumerate(info.names):
        v = _argument(info, i, args, kwargs)
        if isinstance(v, (torch.Tensor, bool, int, float)) or v is None:
            values[name] = v
    try:
        schema_info.add_argument_values(dict[str, object](values))
    except Exception:
        return list(range(len(info.names)))  # cannot tell: every tensor argument may be written
    arg = torch._C._SchemaArgument
    kind = torch._C._SchemaArgType.input
    return [i for i in range(len(info.names)) if schema_info.is_mutable(arg(kind, i))]


def _generator_overload(func: Any) -> Optional[Any]:
    """The `.generator` sibling of an overload that has none (aten.rand.default -> aten.rand.generator)."""
    packet = getattr(aten, func._schema.name.split("::", 1)[1], None)
    if packet is None:
        return None
    overload = func._overloadname
    return getattr(packet, "generator" if overload in ("default", "") else f"{overload}_generator", None)


class Observer(TorchDispatchMode):
    """Records one action's writes and value reads, and routes its randomness."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # nothing is compiled on the owner; torch's guard costs ~15 us per operation

    def __init__(self, randomness: ActionRandomness, track: bool, max_elements: Optional[int] = None) -> None:
        super().__init__()
        self.randomness = randomness
        self.track = track
        self.max_elements = max_elements  # set when no shadow run could check sizes beforehand
        self.written: List[Range] = []
        self.written_tensors: List[torch.Tensor] = []
        self.read_values = False

    def _record(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.device.type == "meta":
                return
            r = tensor_range(value)
            if r is not None:
                self.written.append(r)
                self.written_tensors.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self._record(v)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = dict(kwargs or {})
        info = _INFO.get(func) or _info(func)
        if info.reads_values:
            self.read_values = True
        check_pieces(func, args, kwargs)  # first: a shadow of chunk into ten million pieces would make them all
        if self.max_elements is not None:
            self._check_size(func, info, args, kwargs)
        if info.random:
            func, args, kwargs = self._route_random(func, info, args, kwargs)
            info = _INFO.get(func) or _info(func)
        if self.track and (info.writes or info.value_dependent_writes):
            positions = _written_by_values(func, info, args, kwargs) if info.value_dependent_writes else info.writes
            for i in positions:
                self._record(_argument(info, i, args, kwargs))
        return func(*args, **kwargs)

    # -- sizes, when nothing could check them before the action ran ---------------------------
    def _check_size(self, func: Any, info: _OpInfo, args: tuple, kwargs: Dict[str, Any]) -> None:
        """Refuse an operation that would allocate more than the limit, before it does (one-bit channel)."""
        n = 0
        name = func._schema.name
        for i in info.sizes:
            value = _argument(info, i, args, kwargs)
            if isinstance(value, (list, tuple)):
                n = max(n, _product(value) * (args[0].numel() if name == "aten::repeat" and args else 1))
        if name == "aten::bincount" and args:
            data = args[0]
            minlength = _argument(info, 2, args, kwargs) or 0
            top = int(data.max()) + 1 if data.numel() else 0
            n = max(n, top, int(minlength))
        elif name == "aten::repeat_interleave" and args:
            if func._overloadname == "Tensor":  # repeat_interleave(repeats)
                repeats, per = args[0], 1
            else:  # (self, repeats, dim): each repeat copies a slice of self
                repeats = _argument(info, 1, args, kwargs)
                count = repeats.numel() if isinstance(repeats, torch.Tensor) else 1
                per = max(args[0].numel() // max(count, 1), 1)
            if isinstance(repeats, torch.Tensor) and repeats.numel():
                n = max(n, int(repeats.sum()) * per)
            elif isinstance(repeats, int):
                n = max(n, repeats * args[0].numel())
        assert self.max_elements is not None
        if n <= self.max_elements:
            # Sizes given as plain ints (multinomial's num_samples, a distribution's trial count) are
            # in no size list: what the operation makes is read from a run on meta tensors.
            n = max(n, _meta_elements(func, args, kwargs))
        if n > self.max_elements:
            raise LimitExceeded(f"{name.split('::')[-1]} would allocate more than {self.max_elements} elements")

    # -- randomness ----------------------------------------------------------------
    def _route_random(self, func: Any, info: _OpInfo, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Any, tuple, Dict[str, Any]]:
        if info.has_generator:
            kwargs["generator"] = self.randomness.torch_generator
            return func, args, kwargs
        sibling = _generator_overload(func)
        if sibling is not None:
            kwargs["generator"] = self.randomness.torch_generator
            return sibling, args, kwargs
        name = func._schema.name
        if name in ("aten::rand_like", "aten::randn_like", "aten::randint_like"):
            return self._like(func, name, args, kwargs)
        raise NotAllowed(f"random operation {name} cannot draw from your generator on the owner")

    def _like(self, func: Any, name: str, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Any, tuple, Dict[str, Any]]:
        src = args[0]
        dtype = kwargs.get("dtype") or src.dtype
        gen = self.randomness.torch_generator
        if name == "aten::rand_like":
            return _draw, (src, dtype, lambda t: t.uniform_(0.0, 1.0, generator=gen)), {}
        if name == "aten::randn_like":
            return _draw, (src, dtype, lambda t: t.normal_(0.0, 1.0, generator=gen)), {}
        rest = list(args[1:])
        if any(isinstance(v, torch.Tensor) for v in rest):
            raise NotAllowed("randint_like with a tensor bound cannot draw from your generator on the owner")
        low, high = (0, rest[0]) if len(rest) == 1 else (rest[0], rest[1])
        return _draw, (src, dtype, lambda t: t.random_(low, high, generator=gen)), {}


_VALUE_READERS = frozenset({"tolist", "numpy"})


@contextlib.contextmanager
def reads_watched(observer: "Observer") -> Iterator[None]:
    """Note value reads that torch does not dispatch (`Tensor.tolist`, `Tensor.numpy`) in this thread.

    Library code that turns values into Python this way could steer what it
    writes; `sys.setprofile` sees every such C call (only this thread, only
    while the action runs; an earlier profiler keeps being called).
    """
    import sys

    previous = sys.getprofile()

    def profile(frame: Any, event: str, arg: Any) -> Any:
        if event == "c_call" and getattr(arg, "__name__", None) in _VALUE_READERS \
                and isinstance(getattr(arg, "__self__", None), torch.Tensor):
            observer.read_values = True
        if previous is not None:
            previous(frame, event, arg)  # type: ignore[arg-type]  # event is one of the profiler's names

    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)


def _meta_elements(func: Any, args: tuple, kwargs: Dict[str, Any]) -> int:
    """Elements an operation's results hold, from a run on meta copies of its tensors; 0 if it cannot say.

    Runs inside the dispatch mode, which is off while it handles an operation, so nothing recurses.
    """
    leaves = pytree.tree_leaves((args, kwargs))
    if not any(isinstance(v, int) and not isinstance(v, bool) for v in leaves):
        return 0  # every size is then in a size list, a tensor's shape, or nowhere
    if not any(isinstance(v, torch.Tensor) for v in leaves):
        return 0  # a factory: its sizes are in size lists, and a run here would allocate for real
    try:
        meta_args, meta_kwargs = pytree.tree_map_only(
            torch.Tensor, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta"), (args, kwargs))
        meta_kwargs.pop("generator", None)
        if "device" in meta_kwargs:
            meta_kwargs["device"] = torch.device("meta")  # new_zeros and the like: never a real allocation
        out = func(*meta_args, **meta_kwargs)
    except Exception:  # no meta kernel, or a size that depends on values: the other checks stand
        return 0
    return sum(t.numel() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _product(values: Any) -> int:
    total = 1
    for v in values:
        total *= max(int(v), 0)
        if total > 2**62:
            return 2**62
    return total


def _draw(src: torch.Tensor, dtype: torch.dtype, fill: Any) -> torch.Tensor:
    out = torch.empty_like(src, dtype=dtype)
    fill(out)
    return out
