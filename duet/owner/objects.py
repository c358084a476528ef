"""One scientist's remote objects on the owner, with lineage.

Two kinds of lineage, each a set of published asset names:

- *value lineage*, kept per **alias group**: objects that may share state (a
  tensor and its views, a model, its parameter list and its optimizer) form
  one group, because a change through one of them changes them all. The
  group's lineage names the assets whose values flowed into any member.
- *metadata lineage*, kept per object: the assets that could have influenced
  its type, shape, dtype, length or ``requires_grad``. It is a subset of
  what a release would show: an object is private when either is non-empty.

Groups only ever merge, never split: once two objects may have shared state,
they stay tied (when in doubt, taint). Which objects changed, and which share
state, is decided by the executor from what an action did
(`duet.owner.effects`, `duet.owner.footprint`), not from the allowlist.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set

from ..errors import LimitExceeded, UnknownObject
from .footprint import Footprint, footprint, python_nbytes
from .opchain import OpChain


@dataclass
class Group:
    """Objects that may share state, and the assets their values derive from."""

    lineage: Set[str] = field(default_factory=set)
    ops: OpChain = field(default_factory=OpChain)
    members: Set[int] = field(default_factory=set)

    def absorb(self, lineage: Iterable[str], ops: "OpChain | Iterable[str]") -> None:
        self.lineage.update(lineage)
        if isinstance(ops, OpChain):
            self.ops.merge(ops)
        else:
            self.ops.extend(ops)


@dataclass
class RemoteObject:
    """A value held for a scientist, with the facts the permission queue shows."""

    value: Any
    group: Group
    meta: Set[str]  # assets its metadata may depend on
    nbytes: int
    footprint: Footprint
    # What declared bounds say of this value, for differentially private releases
    # (duet.owner.privacy.facts): a Rows or Aggregate fact, or None with the reason in dp_why.
    dp: Any = None
    dp_why: str = ""

    @property
    def shape_public(self) -> bool:
        """Whether type, shape, dtype and requires_grad may be shown to the scientist."""
        return not self.meta

    @property
    def lineage(self) -> Set[str]:
        """Everything a release of this object would reveal: values and metadata."""
        return self.group.lineage | self.meta

    @property
    def private(self) -> bool:
        return bool(self.group.lineage or self.meta)

    def refresh_footprint(self) -> None:
        self.footprint = footprint(self.value)


@dataclass
class Limits:
    """Per-scientist limits; going over one fails that action only."""

    max_objects: int = 100_000
    max_bytes: int = 8 * 2**30
    max_queued_actions: int = 100_000
    max_elements_per_object: int = 2**31
    max_pending_releases: int = 64  # open release requests, each holding a snapshot
    max_queued_bytes: int = 2 * 2**30  # bytes of messages waiting for the worker
    max_python_bits: int = 1 << 16  # size of a Python int an action may make (bits)
    max_sessions_per_key: int = 4  # concurrent sessions of one identity key


@dataclass
class Budget:
    """What all sessions of one identity key hold together, so a second session adds no room."""

    objects: int = 0
    bytes: int = 0


class ObjectTable:
    """The objects one scientist created, keyed by the ids the scientist allocated."""

    def __init__(self, limits: Optional[Limits] = None, budget: Optional[Budget] = None) -> None:
        self.limits = limits or Limits()
        self._objects: Dict[int, RemoteObject] = {}
        self.total_bytes = 0
        self.extra_bytes = 0  # held outside objects (pending release snapshots)
        self.budget = budget or Budget()

    def share_budget(self, budget: Budget) -> None:
        """Count this table against a budget shared with the identity's other sessions."""
        budget.objects += len(self._objects)
        budget.bytes += self.total_bytes + self.extra_bytes
        self.budget.objects -= len(self._objects)
        self.budget.bytes -= self.total_bytes + self.extra_bytes
        self.budget = budget

    def hold(self, nbytes: int) -> None:
        """Memory held outside objects (a pending release's snapshot); negative to give it back."""
        self.extra_bytes += nbytes
        self.budget.bytes += nbytes

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
        if self.budget.objects >= self.limits.max_objects:
            raise LimitExceeded(f"object limit reached ({self.limits.max_objects} objects); free some pointers")
        if self.budget.bytes + extra_bytes > self.limits.max_bytes:
            raise LimitExceeded(
                f"memory limit reached ({self.limits.max_bytes} bytes held for this scientist); free some pointers"
            )

    def put(
        self,
        rid: int,
        value: Any,
        lineage: Iterable[str],
        ops: Iterable[str],
        meta: Iterable[str] = (),
        alias_of: Iterable[int] = (),
        fp: Optional[Footprint] = None,
    ) -> RemoteObject:
        """Store a value; with alias_of, it joins (and merges) those objects' groups."""
        nbytes = python_nbytes(value)
        self.check_room(nbytes)
        # Groups first: the result may be stored under the id of one of the objects it aliases.
        groups = _unique_groups(self._objects[a].group for a in alias_of if a in self._objects)
        if rid in self._objects:
            self.free(rid)
        group = self._merge(groups) if groups else Group()
        group.absorb(lineage, ops)
        group.members.add(rid)
        meta_set = set(meta)
        obj = RemoteObject(value=value, group=group, meta=meta_set, nbytes=nbytes,
                           footprint=fp if fp is not None else footprint(value))
        self._objects[rid] = obj
        self.total_bytes += nbytes
        self.budget.objects += 1
        self.budget.bytes += nbytes
        return obj

    def free(self, rid: int) -> None:
        obj = self._objects.pop(rid, None)
        if obj is not None:
            obj.group.members.discard(rid)
            self.total_bytes -= obj.nbytes
            self.budget.objects -= 1
            self.budget.bytes -= obj.nbytes

    def clear(self) -> None:
        self.budget.objects -= len(self._objects)
        self.budget.bytes -= self.total_bytes + self.extra_bytes
        self._objects.clear()
        self.total_bytes = 0
        self.extra_bytes = 0

    def taint(self, rids: Iterable[int], lineage: Iterable[str], ops: "OpChain | Iterable[str]", meta: Iterable[str] = ()) -> None:
        """Objects changed by an action take on the lineage of what changed them.

        Metadata lineage goes to every member of their groups: two pointers may
        name the same object (a list element picked twice, a module and its
        child), and a change through one is a change through all.
        """
        lineage, meta = list(lineage), set(meta)
        if not isinstance(ops, OpChain):
            ops = OpChain(ops)
        objs = [self._objects[r] for r in rids if r in self._objects]
        for group in _unique_groups(o.group for o in objs):
            group.absorb(lineage, ops)
            for member in group.members:
                obj = self._objects.get(member)
                if obj is None:
                    continue
                if meta:
                    obj.meta |= meta
                if obj.dp is not None:  # its values may have changed: the recorded steps no longer say what it holds
                    obj.dp = None
                    obj.dp_why = "it was changed in place (or may have been) after it was computed"

    def has_facts(self, group: Group) -> bool:
        """Whether a member of this group carries a DP fact (so any write to the group must be seen)."""
        return any(self._objects[m].dp is not None for m in group.members if m in self._objects)

    def merge(self, rids: Iterable[int]) -> None:
        """These objects may now share state: one group from here on."""
        groups = _unique_groups(self._objects[r].group for r in rids if r in self._objects)
        if len(groups) > 1:
            self._merge(groups)

    def holders(self, predicate: Any) -> List[int]:
        """Ids of objects whose footprint satisfies predicate (a scan; used for autograd)."""
        return [rid for rid, obj in self._objects.items() if predicate(obj)]

    def _merge(self, groups: List[Group]) -> Group:
        groups.sort(key=lambda g: len(g.members), reverse=True)
        target = groups[0]
        for other in groups[1:]:
            target.lineage |= other.lineage
            target.ops.merge(other.ops)
            for rid in other.members:
                if rid in self._objects:
                    self._objects[rid].group = target
            target.members |= other.members
            other.members = set()
        return target


def _unique_groups(groups: Iterable[Group]) -> List[Group]:
    seen: Dict[int, Group] = {}
    for g in groups:
        seen.setdefault(id(g), g)
    return list(seen.values())
