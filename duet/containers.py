"""One bounded walk over nested lists, tuples and dicts.

Arguments, results, published values, plan templates and signaling bodies are
Python values nested in lists, tuples and dicts, and many of them come from the
other side. The walks over them are made with this module, so each has a depth
limit, counts depth the same way, and says clearly when the limit is exceeded,
long before Python's recursion limit (about 1000 frames) would turn hostile
nesting into a RecursionError somewhere deep inside. (The wire codec checks
nesting itself, as msgpack counts it: see duet.wire.)

Depth: the value a walk starts from is at depth 0, and each list, tuple or dict
around a value adds one, so in `[[x]]` x is at depth 2. A walk with
`max_depth=n` looks at values down to depth n; meeting one deeper, it raises
`too_deep()` (TooDeep by default) or, where a walk only searches or makes
copies, leaves that value out (`prune`). The default limit is MAX_DEPTH; the
walks that need another one pass it and say why where they do.

Three forms:

- `leaves(value)`: the values that are not containers, left to right.
- `map_leaves(value, fn)`: a copy with each such value replaced by fn(value);
  lists stay lists, other sequences become tuples, mappings become dicts.
- `walk(value, visit)`: for walks with their own rules per type; visit(v, inner)
  returns the result for v and calls inner(child) for each child it descends into.

What counts as a container is `is_sequence` and `is_mapping` (by default any
list or tuple, including named tuples, and any dict).

Size: depth alone does not bound the work. A list can hold itself, or one list
many times over (`l[0] = l[1] = ... = l`), and the paths through it grow as
width**depth while the object stays small. So every walk also stops after
MAX_NODES values (each visit counts, shared ones every time) with TooLarge, a
LimitExceeded: the action that asked for the walk fails, the owner goes on.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, TypeVar

from .errors import LimitExceeded

MAX_DEPTH = 16  # the default: call arguments, shadow runs, plans, model graphs
# Values one walk may visit. Twice the wire's max_items, so nothing that can arrive in one message
# is refused, while a self-referential list (4**16 paths at width 4) stops within about a second.
MAX_NODES = 2_000_000

T = TypeVar("T")
Predicate = Callable[[Any], bool]
ErrorFactory = Callable[[], BaseException]


class TooDeep(ValueError):
    """A value nests lists, tuples or dicts deeper than a walk allows."""

    def __init__(self, max_depth: int) -> None:
        super().__init__(f"nested deeper than {max_depth} levels of lists, tuples and dicts")
        self.max_depth = max_depth


class TooLarge(LimitExceeded):
    """A walk met more values than MAX_NODES (a container that holds itself, or one shared many times)."""

    def __init__(self, max_nodes: int) -> None:
        super().__init__(f"more than {max_nodes:,} values in nested lists, tuples and dicts "
                         "(an item held several times counts each time; a list may hold itself)")
        self.max_nodes = max_nodes


def is_sequence(value: Any) -> bool:
    """Lists and tuples, subclasses included (named tuples, torch.Size, torch.return_types)."""
    return isinstance(value, (list, tuple))


def is_mapping(value: Any) -> bool:
    return isinstance(value, dict)


_is_sequence, _is_mapping = is_sequence, is_mapping


def never(value: Any) -> bool:
    """For `is_mapping=never` (dicts are leaves) and the like."""
    return False


_CONTAINERS = (list, tuple, dict)


def flat_values(value: Any) -> Optional[Any]:
    """The items of a list or tuple, or the values of a dict, when none is itself a container; else None.

    Most action arguments are such one-level containers, and the walks that run on every action
    (this module's, and a few hand-made ones) take this short cut for them.
    """
    if isinstance(value, (list, tuple)):
        items: Any = value
    elif isinstance(value, dict):
        items = value.values()
    else:
        return None
    for v in items:
        if isinstance(v, _CONTAINERS):
            return None
    return items


def _error(max_depth: int, too_deep: Optional[ErrorFactory]) -> BaseException:
    return too_deep() if too_deep is not None else TooDeep(max_depth)


def leaves(
    value: Any,
    *,
    max_depth: int = MAX_DEPTH,
    too_deep: Optional[ErrorFactory] = None,
    prune: bool = False,
    is_sequence: Predicate = is_sequence,
    is_mapping: Predicate = is_mapping,
    max_nodes: int = MAX_NODES,
) -> Iterator[Any]:
    """Every value under `value` that is not a container, depth first, left to right.

    Beyond max_depth: raises too_deep() (TooDeep by default), or with prune=True
    leaves those values out and goes on with the rest.
    """
    # The default predicates are inlined: this runs on every action's arguments.
    default_seq, default_map = is_sequence is _is_sequence, is_mapping is _is_mapping
    if default_seq and default_map and max_depth >= 1 and len(value if isinstance(value, _CONTAINERS) else ()) < max_nodes:
        flat = flat_values(value)
        if flat is not None:
            yield from flat
            return
    left = max_nodes
    stack = [iter((value,))]  # the values of stack[d] are at depth d
    depth = 0
    while stack:
        for v in stack[-1]:
            left -= 1
            if left < 0:
                raise TooLarge(max_nodes)
            if depth > max_depth:
                if not prune:
                    raise _error(max_depth, too_deep)
                stack.pop()  # the other values there are as deep: skip them all
                depth -= 1
                break
            if isinstance(v, (list, tuple)) if default_seq else is_sequence(v):
                stack.append(iter(v))
                depth += 1
                break
            if isinstance(v, dict) if default_map else is_mapping(v):
                stack.append(iter(v.values()))
                depth += 1
                break
            yield v
        else:
            stack.pop()
            depth -= 1


def map_leaves(
    value: Any,
    fn: Callable[[Any], Any],
    *,
    max_depth: int = MAX_DEPTH,
    too_deep: Optional[ErrorFactory] = None,
    prune: bool = False,
    is_sequence: Predicate = is_sequence,
    is_mapping: Predicate = is_mapping,
    max_nodes: int = MAX_NODES,
) -> Any:
    """A copy of the containers of `value` with every other value v replaced by fn(v).

    Lists are copied as lists, other sequences as plain tuples, mappings as dicts
    with the same keys. Beyond max_depth: raises too_deep() (TooDeep by default),
    or with prune=True keeps those values as they are, unmapped.
    """
    if is_sequence is _is_sequence and is_mapping is _is_mapping and max_depth >= 1 \
            and len(value if isinstance(value, _CONTAINERS) else ()) < max_nodes \
            and flat_values(value) is not None:  # one level: most action arguments
        if isinstance(value, dict):
            return {k: fn(v) for k, v in value.items()}
        items = [fn(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    left = max_nodes

    def go(v: Any, depth: int) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise TooLarge(max_nodes)
        if depth > max_depth:
            if prune:
                return v
            raise _error(max_depth, too_deep)
        if is_sequence(v):
            items = [go(x, depth + 1) for x in v]
            return items if isinstance(v, list) else tuple(items)
        if is_mapping(v):
            return {k: go(x, depth + 1) for k, x in v.items()}
        return fn(v)

    return go(value, 0)


def walk(
    value: Any,
    visit: Callable[[Any, Callable[[Any], Any]], T],
    *,
    max_depth: int = MAX_DEPTH,
    too_deep: Optional[ErrorFactory] = None,
    beyond: Optional[Callable[[Any], Any]] = None,
    max_nodes: int = MAX_NODES,
) -> T:
    """visit(value, inner), where inner(child) visits a child one level deeper.

    For walks whose rules differ by type (what to refuse, what to descend into,
    what to build). A value beyond max_depth is never visited: the walk raises
    too_deep() (TooDeep by default), or, with `beyond`, inner returns beyond(child).
    visit must call inner only while it runs (not from a generator it returns): the walk
    keeps one depth counter rather than one closure per level, as this runs on every action.
    """
    left = max_nodes
    depth = 0  # of the value being visited; visit calls inner only while it runs, so a counter will do

    def inner(v: Any) -> Any:
        nonlocal left, depth
        left -= 1
        if left < 0:
            raise TooLarge(max_nodes)
        if depth >= max_depth:  # v would be at depth + 1
            if beyond is not None:
                return beyond(v)
            raise _error(max_depth, too_deep)
        depth += 1
        try:
            return visit(v, inner)
        finally:
            depth -= 1

    if max_depth < 0:
        if beyond is not None:
            return beyond(value)
        raise _error(max_depth, too_deep)
    left -= 1
    if left < 0:
        raise TooLarge(max_nodes)
    return visit(value, inner)
