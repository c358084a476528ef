"""One scientist's remote objects on the owner, with lineage.

Lineage is kept per *alias group*: objects that may share memory (a tensor and
its view, a model and its parameter list, an optimizer over those parameters)
form one group, because a change through one of them changes them all. A
group's lineage is the set of published assets whose values flowed into it.
Anything with a non-empty lineage is private: it leaves only by approval.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch

from ..errors import LimitExceeded, UnknownObject

MAX_OPS_SHOWN = 24


@dataclass
class Group:
    """Objects that may share memory, and the assets their values derive from."""

    lineage: Set[str] = field(default_factory=set)
    ops: List[str] = field(default_factory=list)
    members: Set[int] = field(default_factory=set)

    def absorb(self, lineage: Iterable[str], ops: Iterable[str]) -> None:
        self.lineage.update(lineage)
        merge_ops(self.ops, ops)


def merge_ops(into: List[str], ops: Iterable[str]) -> None:
    """Append operation names, keeping the most recent MAX_OPS_SHOWN."""
    for op in ops:
        if not into or into[-1] != op:
            into.append(op)
    del into[:-MAX_OPS_SHOWN]


@dataclass
class RemoteObject:
    """A value held for a scientist, with the facts the permission queue shows."""

    value: Any
    group: Group
    shape_public: bool
    nbytes: int


def value_nbytes(value: Any, _depth: int = 0) -> int:
    """Memory a value holds, counted for the per-scientist byte limit."""
    if _depth > 8:
        return 0
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, torch.nn.Module):
        return sum(p.element_size() * p.nelement() for p in value.state_dict().values() if isinstance(p, torch.Tensor))
    if isinstance(value, (list, tuple)):
        return sum(value_nbytes(v, _depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(value_nbytes(v, _depth + 1) for v in value.values())
    return 0


def contained_tensors(value: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors held by a value: itself, a module's parameters, an optimizer's params."""
    if _depth > 8:
        return
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, torch.nn.Module):
        yield from value.parameters()
        yield from value.buffers()
    elif isinstance(value, torch.optim.Optimizer):
        for group in value.param_groups:
            yield from group["params"]
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from contained_tensors(v, _depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            yield from contained_tensors(v, _depth + 1)


def _byte_bounds(arr: np.ndarray) -> Tuple[int, int]:
    try:
        from numpy.lib.array_utils import byte_bounds  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        byte_bounds = np.byte_bounds
    return byte_bounds(arr)


def memory_ranges(value: Any, _depth: int = 0) -> List[Tuple[int, int]]:
    """Address ranges of the memory a value's tensors and arrays live in.

    Two objects whose ranges overlap may share memory, whatever the op that
    made them claimed: the owner uses this to find aliases it was not told of.
    """
    ranges: List[Tuple[int, int]] = []
    if _depth > 8:
        return ranges
    if isinstance(value, np.ndarray):
        if value.nbytes:
            ranges.append(_byte_bounds(value))
        return ranges
    if isinstance(value, (list, tuple)):
        for v in value:
            ranges.extend(memory_ranges(v, _depth + 1))
        return ranges
    if isinstance(value, dict):
        for v in value.values():
            ranges.extend(memory_ranges(v, _depth + 1))
        return ranges
    for t in contained_tensors(value):
        storage = t.untyped_storage()
        if storage.nbytes():
            start = storage.data_ptr()
            ranges.append((start, start + storage.nbytes()))
    return ranges


def overlaps(a: List[Tuple[int, int]], b: List[Tuple[int, int]]) -> bool:
    """Whether any range of a overlaps any range of b."""
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)


@dataclass
class Limits:
    """Per-scientist limits; going over one fails that action only."""

    max_objects: int = 100_000
    max_bytes: int = 8 * 2**30
    max_queued_actions: int = 100_000
    max_elements_per_object: int = 2**31


class ObjectTable:
    """The objects one scientist created, keyed by the ids the scientist allocated."""

    def __init__(self, limits: Optional[Limits] = None) -> None:
        self.limits = limits or Limits()
        self._objects: Dict[int, RemoteObject] = {}
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, rid: int) -> bool:
        return rid in self._objects

    def get(self, rid: int) -> RemoteObject:
        try:
            return self._objects[rid]
        except KeyError:
            raise UnknownObject(f"object #{rid} does not exist on the owner (freed, failed, or never created)") from None

    def items(self) -> List[tuple]:
        return list(self._objects.items())

    def check_room(self, extra_bytes: int = 0) -> None:
        """Raise LimitExceeded before an action that would go over a limit."""
        if len(self._objects) >= self.limits.max_objects:
            raise LimitExceeded(f"object limit reached ({self.limits.max_objects} objects); free some pointers")
        if self.total_bytes + extra_bytes > self.limits.max_bytes:
            raise LimitExceeded(
                f"memory limit reached ({self.limits.max_bytes} bytes held for this scientist); free some pointers"
            )

    def put(
        self,
        rid: int,
        value: Any,
        lineage: Iterable[str],
        ops: Iterable[str],
        shape_public: bool,
        alias_of: Iterable[int] = (),
    ) -> RemoteObject:
        """Store a value; with alias_of, it joins (and merges) those objects' groups."""
        nbytes = value_nbytes(value)
        self.check_room(nbytes)
        if rid in self._objects:
            self.free(rid)
        groups = _unique_groups(self._objects[a].group for a in alias_of if a in self._objects)
        if groups:
            group = self._merge(groups)
            group.absorb(lineage, ops)
        else:
            group = Group()
            group.absorb(lineage, ops)
        group.members.add(rid)
        obj = RemoteObject(value=value, group=group, shape_public=shape_public, nbytes=nbytes)
        self._objects[rid] = obj
        self.total_bytes += nbytes
        return obj

    def free(self, rid: int) -> None:
        obj = self._objects.pop(rid, None)
        if obj is not None:
            obj.group.members.discard(rid)
            self.total_bytes -= obj.nbytes

    def clear(self) -> None:
        self._objects.clear()
        self.total_bytes = 0

    def taint(self, rids: Iterable[int], lineage: Iterable[str], ops: Iterable[str]) -> None:
        """Objects changed in place take on the lineage of what changed them."""
        lineage = list(lineage)
        ops = list(ops)
        for group in _unique_groups(self._objects[r].group for r in rids if r in self._objects):
            group.absorb(lineage, ops)

    def taint_holders(self, tensors: Iterable[torch.Tensor], lineage: Iterable[str], ops: Iterable[str]) -> None:
        """Taint every object that holds one of these tensors (e.g. leaves after backward)."""
        wanted = {id(t) for t in tensors}
        if not wanted:
            return
        holders = [rid for rid, obj in self._objects.items() if any(id(t) in wanted for t in contained_tensors(obj.value))]
        self.taint(holders, lineage, ops)

    def _merge(self, groups: List[Group]) -> Group:
        groups.sort(key=lambda g: len(g.members), reverse=True)
        target = groups[0]
        for other in groups[1:]:
            target.absorb(other.lineage, other.ops)
            for rid in other.members:
                self._objects[rid].group = target
            target.members |= other.members
            other.members = set()
        return target


def _unique_groups(groups: Iterable[Group]) -> List[Group]:
    seen: Dict[int, Group] = {}
    for g in groups:
        seen.setdefault(id(g), g)
    return list(seen.values())
