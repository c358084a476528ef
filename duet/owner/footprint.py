"""What a value reaches: the memory and the mutable Python objects behind it.

Lineage on the owner is decided from what an action actually did, so the
owner must be able to say, for any value a scientist holds, which bytes and
which mutable objects (lists, dicts, modules, optimizers) it can see or change.
Two values whose footprints intersect may share state, whatever the operation
that made them claimed.

A *structure* is the part of a value's state that is not tensor bytes: which
tensor objects a module or list holds, each tensor's storage, shape, stride,
dtype, ``requires_grad`` and ``.grad``. Comparing structures before and after
an action finds changes that write no memory (a ``.grad`` assigned by
backward, parameters swapped by ``load_state_dict(assign=True)``, a list
element replaced). Structures hold identities and metadata, never values.
Identities are not always free of values (CPython shares small ints and
strings, so ``lst[0] = private_int`` can leave every identity as it was):
writes into Python containers are therefore declared by the executor, never
inferred from an unchanged structure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch

MAX_NODES = 1_000_000  # one walk visits at most this many nodes (bounded by the table's limits anyway)

Range = Tuple[int, int]


def array_range(arr: np.ndarray) -> Optional[Range]:
    """The byte range an array's elements occupy, or None for an empty array."""
    if not arr.nbytes:
        return None
    try:
        from numpy.lib.array_utils import byte_bounds  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        byte_bounds = np.byte_bounds  # type: ignore[attr-defined]
    start, end = byte_bounds(arr)
    return (int(start), int(end))


def storage_key(t: torch.Tensor) -> int:
    """The identity of a tensor's storage (every view of it has the same), even while it holds no bytes."""
    return t.untyped_storage()._cdata


def tensor_range(t: torch.Tensor) -> Optional[Range]:
    """The byte range of a tensor's whole storage (every view of it can write there)."""
    storage = t.untyped_storage()
    n = storage.nbytes()
    if not n:
        return None
    start = storage.data_ptr()
    return (start, start + n)


def _children(value: Any) -> Iterator[Any]:
    """The values a value holds, as far as lineage is concerned."""
    if isinstance(value, torch.Tensor):
        grad = grad_of(value)
        if grad is not None:
            yield grad
    elif isinstance(value, np.ndarray):
        return
    elif isinstance(value, torch.nn.Module):
        for _, p in value.named_parameters(recurse=True, remove_duplicate=False):
            yield p
        for _, b in value.named_buffers(recurse=True, remove_duplicate=False):
            yield b
        for m in value.modules():
            if m is not value:
                yield m
    elif isinstance(value, torch.optim.Optimizer):
        for group in value.param_groups:
            yield from group["params"]
        for state in value.state.values():
            if isinstance(state, dict):
                yield from state.values()
    elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
        yield value.optimizer
    elif isinstance(value, torch.distributions.Distribution):
        yield from vars(value).values()  # its parameters (often the very tensors it was built from), cached ones
    elif isinstance(value, (list, tuple)):
        yield from value
    elif isinstance(value, dict):
        yield from value.values()


def grad_of(t: torch.Tensor) -> Optional[torch.Tensor]:
    """A tensor's gradient, without torch's warning for non-leaves that do not retain one."""
    return t.grad if (t.is_leaf or t.retains_grad) else None


def _mutable(value: Any) -> bool:
    return isinstance(value, (list, dict, torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
                              torch.distributions.Distribution))


def walk(value: Any, limit: int = MAX_NODES) -> Iterator[Any]:
    """Every tensor, array and container reachable from a value, each once."""
    seen: Set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if len(seen) > limit:
            raise OverflowError("value reaches too many objects to track")
        yield v
        stack.extend(_children(v))


@dataclass
class Footprint:
    """Memory ranges and mutable objects a value reaches."""

    ranges: List[Range] = field(default_factory=list)
    ids: Set[int] = field(default_factory=set)
    requires_grad: bool = False  # holds a tensor that can receive a gradient
    stateful: bool = False  # holds a tensor, array or mutable object, of any size (even empty)

    def intersects(self, other: "Footprint") -> bool:
        if self.ids & other.ids:
            return True
        return ranges_overlap(self.ranges, other.ranges)

    def touches(self, ranges: List[Range]) -> bool:
        return ranges_overlap(self.ranges, ranges)

    @property
    def empty(self) -> bool:
        """Holds no state at all. Decided by type, never by size: an empty result is still a tensor."""
        return not self.stateful


def footprint(value: Any) -> Footprint:
    """The footprint of a value (tensors, arrays, modules, optimizers, containers)."""
    fp = Footprint()
    for v in walk(value):
        if isinstance(v, torch.Tensor):
            fp.stateful = True
            fp.ids.add(storage_key(v))  # by identity too: an empty storage may grow and be shared later
            r = tensor_range(v)
            if r is not None:
                fp.ranges.append(r)
            if v.requires_grad:
                fp.requires_grad = True
        elif isinstance(v, np.ndarray):
            fp.stateful = True
            r = array_range(v)
            if r is not None:
                fp.ranges.append(r)
        elif _mutable(v):
            fp.stateful = True
            fp.ids.add(id(v))
    return fp


def ranges_overlap(a: List[Range], b: List[Range]) -> bool:
    """Whether any range of a overlaps any range of b (n log n, for large models)."""
    if not a or not b:
        return False
    if len(a) * len(b) <= 64:
        return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)
    events = sorted([(s, e, 0) for s, e in a] + [(s, e, 1) for s, e in b])
    max_end = [-1, -1]
    for s, e, side in events:
        if max_end[1 - side] > s:
            return True
        max_end[side] = max(max_end[side], e)
    return False


def _tensor_structure(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    grad = grad_of(t)
    return (
        "T",
        id(t),
        storage._cdata,
        storage.data_ptr(),
        storage.nbytes(),
        tuple(t.shape),
        t.stride(),
        t.storage_offset(),
        t.dtype,
        t.requires_grad,
        t.retains_grad if not t.is_leaf else False,
        None if grad is None else id(grad),
    )


def structure(value: Any) -> tuple:
    """Identities and metadata of everything a value reaches (never tensor values)."""
    parts: List[tuple] = []
    for v in walk(value):
        if isinstance(v, torch.Tensor):
            parts.append(_tensor_structure(v))
        elif isinstance(v, np.ndarray):
            parts.append(("A", id(v), array_range(v), v.shape, v.strides, v.dtype.str))
        elif isinstance(v, torch.nn.Module):
            parts.append(("M", id(v), v.training, tuple((n, id(p)) for n, p in v.named_parameters(remove_duplicate=False)),
                          tuple((n, id(b)) for n, b in v.named_buffers(remove_duplicate=False))))
        elif isinstance(v, (list, tuple)):
            parts.append(("L", id(v), len(v), tuple(id(x) for x in v)))
        elif isinstance(v, dict):
            parts.append(("D", id(v), len(v), tuple((k, id(x)) for k, x in v.items())))
        elif isinstance(v, torch.optim.Optimizer):
            parts.append(("O", id(v), len(v.param_groups), tuple(len(g["params"]) for g in v.param_groups), len(v.state)))
        elif isinstance(v, torch.distributions.Distribution):
            parts.append(("P", id(v), tuple((k, id(x)) for k, x in vars(v).items())))
    return tuple(parts)


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor a value reaches (its own, a module's parameters, gradients, ...)."""
    for v in walk(value):
        if isinstance(v, torch.Tensor):
            yield v


def arrays_in(value: Any) -> Iterator[np.ndarray]:
    """Every numpy array a value reaches."""
    for v in walk(value):
        if isinstance(v, np.ndarray):
            yield v


def is_data(value: Any) -> bool:
    """Tensors and arrays: values whose contents feed results but not, by themselves, sizes."""
    return isinstance(value, (torch.Tensor, np.ndarray, torch.nn.Module, torch.optim.Optimizer,
                              torch.optim.lr_scheduler.LRScheduler, torch.distributions.Distribution))


# What an empty tensor or array still costs (the Python object, its storage): counted, so a million
# empty tensors are not free.
TENSOR_OVERHEAD = 512
ARRAY_OVERHEAD = 112


def python_nbytes(value: Any, limit: int = MAX_NODES) -> int:
    """Memory a value holds: tensor and array bytes plus an estimate for Python objects."""
    import sys

    total = 0
    seen: Set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if len(seen) > limit:
            break
        if isinstance(v, torch.Tensor):
            total += v.element_size() * v.nelement() + TENSOR_OVERHEAD
            grad = grad_of(v)
            if grad is not None:
                stack.append(grad)
        elif isinstance(v, np.ndarray):
            total += int(v.nbytes) + ARRAY_OVERHEAD
        elif isinstance(v, (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
                            torch.distributions.Distribution)):
            total += 1024
            stack.extend(_children(v))
        elif isinstance(v, (list, tuple)):
            total += 56 + 8 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += 64 + 100 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (str, bytes)):
            total += 49 + len(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            total += 28 + v.bit_length() // 8
        else:
            total += sys.getsizeof(v) if not isinstance(v, (bool, type(None))) else 0
    return total

