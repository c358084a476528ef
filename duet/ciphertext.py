"""Encrypted values as they travel: CKKS data (TenSEAL's serialization), opaque to everyone but TenSEAL.

Defined apart from TenSEAL so the codec can carry it without importing it (duet.wire, ext 13). The
scientist makes these (`duet.scientist.he`), the owner turns them into TenSEAL objects bound to the
scientist's public context (`duet.owner.he`) and back. `context` is the sha256 of the public
context the data belongs to, so data meant for one context is never used with another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

__all__ = ["Ciphertext", "VECTOR", "CONTEXT", "KINDS", "MAX_PARTS"]

VECTOR = "ckks-vector"  # one or more CKKS vectors, read as one vector (their values in order)
CONTEXT = "ckks-context"  # a public TenSEAL context: keys to compute with, never the secret key
KINDS = (VECTOR, CONTEXT)
MAX_PARTS = 4096


@dataclass(frozen=True)
class Ciphertext:
    """Encrypted numbers (or a public context): `parts` are TenSEAL-serialized objects."""

    kind: str
    context: bytes  # sha256 of the public context (32 bytes)
    parts: Tuple[bytes, ...]
    sizes: Tuple[int, ...] = ()  # how many numbers each part holds (VECTOR), as the sender says

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown ciphertext kind {self.kind!r}")
        if not isinstance(self.context, bytes) or len(self.context) != 32:
            raise ValueError("context must be a 32-byte digest")
        if not isinstance(self.parts, tuple) or not 0 < len(self.parts) <= MAX_PARTS \
                or not all(isinstance(p, bytes) and p for p in self.parts):
            raise ValueError(f"parts: 1 to {MAX_PARTS} non-empty byte strings")
        if self.kind == VECTOR and (len(self.sizes) != len(self.parts)
                                    or not all(type(n) is int and 0 < n <= 1 << 20 for n in self.sizes)):
            raise ValueError("sizes: one count per part, each 1 to 2^20")
        if self.kind == CONTEXT and (len(self.parts) != 1 or self.sizes):
            raise ValueError("a context is one part")

    @property
    def size(self) -> int:
        """How many encrypted numbers (0 for a context)."""
        return sum(self.sizes)

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts)

    def __repr__(self) -> str:
        what = "public CKKS context" if self.kind == CONTEXT else f"{self.size} encrypted numbers (CKKS)"
        return f"<Ciphertext: {what}, {self.nbytes / 2**10:.0f} KiB>"
