"""The operations behind a value, as the owner sees them when deciding.

A value's history is a graph; the permission queue shows it as every distinct
operation in the order it was first used, with how many times (at most) it
was applied along the way. Nothing is ever dropped to save space: the number
of distinct names is bounded by the allowlist and the owner's asset names.
Operations that pick out individual values (indexing, selection, ``item``,
sorting, extremes) are flagged, so a release of ``ages[2]`` can never look
like a harmless aggregate.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Tuple

# Short names (the part after the last dot) of operations that select values.
SELECTING = frozenset(
    """getitem index_select gather take take_along_dim masked_select select narrow nonzero argwhere
    topk kthvalue max min amax amin argmax argmin aminmax median nanmedian mode quantile nanquantile
    sort msort argsort unique unique_consecutive item tolist diagonal diag tril triu chunk split
    tensor_split unbind unfold where cummax cummin searchsorted bucketize percentile nanpercentile
    nanmax nanmin extract compress flatnonzero histogram bincount""".split()
)
MAX_COUNT = 10**9


def is_selecting(op: str) -> bool:
    """Whether an operation label names an operation that can pick out single values."""
    short = op.rsplit(".", 1)[-1].rsplit(": ", 1)[-1]
    return short in SELECTING


class OpChain:
    """Distinct operation labels in first-use order, with a repetition count each."""

    __slots__ = ("_counts",)

    def __init__(self, ops: Iterable[str] = ()) -> None:
        self._counts: Dict[str, int] = {}
        self.extend(ops)

    def extend(self, ops: Iterable[str]) -> None:
        """Append operations applied (in order) to this value."""
        for op in ops:
            self._counts[op] = min(self._counts.get(op, 0) + 1, MAX_COUNT)

    def merge(self, other: "OpChain") -> None:
        """Take in another history (of an input, or of a group this one merges with)."""
        for op, n in other._counts.items():
            self._counts[op] = max(self._counts.get(op, 0), n)

    def copy(self) -> "OpChain":
        out = OpChain()
        out._counts = dict(self._counts)
        return out

    def items(self) -> List[Tuple[str, int]]:
        return list(self._counts.items())

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def __contains__(self, op: object) -> bool:
        return op in self._counts

    def labels(self) -> Tuple[str, ...]:
        """Each operation once, with ' ×n' when applied more than once."""
        return tuple(f"{op} ×{n}" if n > 1 else op for op, n in self._counts.items())


def describe_ops(ops: Iterable[str], width: int = 0) -> str:
    """One line for a table: selecting operations always shown, others elided only if width demands."""
    ops = list(ops)
    text = " → ".join(ops)
    if not width or len(text) <= width:
        return text
    kept: List[str] = []
    skipped = 0
    for i, op in enumerate(ops):
        if is_selecting(op.split(" ×", 1)[0]) or i == 0 or i == len(ops) - 1:
            if skipped:
                kept.append(f"…{skipped}…")
                skipped = 0
            kept.append(op)
        else:
            skipped += 1
    if skipped:
        kept.append(f"…{skipped}…")
    return " → ".join(kept)
