"""Values as fixed-point integers modulo 2^64, so masked sums wrap exactly and unmask exactly.

A `Spec` (chosen by the scientist from public metadata, checked by every owner) lists the
segments of the vector: their shapes, and whether they hold integers (summed exactly) or floats
(rounded to multiples of 2^-scale_bits after clipping to [-clip, clip]). The sum of `owners`
vectors cannot wrap as long as owners * clip * 2^scale_bits < 2^63, which owners check.

Encoding never fails because of a value: an owner encodes after approving its contribution, and
an error then (or a different answer) would tell the scientist something about that value alone,
one bit per try. So NaN counts as 0 and +-infinity as +-clip, after weighting (a product that
overflows is an infinity), silently; only the public shapes, kinds and weight can be refused,
and those are checked before approval (`check_parts`, `check_weight`).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import msgpack
import numpy as np

DEFAULT_SCALE_BITS = 24  # floats are exact to 6e-8 (2^-24)
MAX_ELEMENTS = 1 << 26  # 512 MiB of masked vector: far beyond any model a round here carries
MAX_INTEGER_WEIGHT = 2**53  # integer parts are weighted exactly, without wrapping, below this


@dataclass(frozen=True)
class Segment:
    name: str
    shape: Tuple[int, ...]
    integer: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass(frozen=True)
class Spec:
    """What every contribution looks like: its segments, scale and clip."""

    segments: Tuple[Segment, ...]
    scale_bits: int = DEFAULT_SCALE_BITS
    clip: float = 2.0**30

    @property
    def length(self) -> int:
        return sum(s.size for s in self.segments)

    def check(self, owners: int) -> None:
        """ValueError unless the sum of `owners` contributions fits in int64 without wrapping."""
        if not 0 <= self.scale_bits <= 52:
            raise ValueError("scale_bits must be between 0 and 52")
        if not (isinstance(self.clip, float) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError("clip must be a finite number > 0")
        if owners * self.clip * 2.0**self.scale_bits >= 2.0**63:
            raise ValueError(f"{owners} contributions clipped at {self.clip:g} with {self.scale_bits} fractional bits "
                             "could overflow the 64-bit sum; lower clip or scale_bits")
        if not 0 < self.length <= MAX_ELEMENTS:
            raise ValueError(f"a secure sum carries 1 to {MAX_ELEMENTS} numbers")

    def to_wire(self) -> List[Any]:
        return [[[s.name, list(s.shape), s.integer] for s in self.segments], self.scale_bits, self.clip]

    @staticmethod
    def from_wire(data: Any) -> "Spec":
        try:
            segments, scale_bits, clip = data
            segs = tuple(Segment(str(n), tuple(int(d) for d in shape), bool(integer)) for n, shape, integer in segments)
            spec = Spec(segs, int(scale_bits), float(clip))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed secure-sum spec ({exc})") from None
        if not segs or any(d < 0 for s in segs for d in s.shape) or len(segs) > 10_000:
            raise ValueError("malformed secure-sum spec")
        return spec

    def digest(self) -> bytes:
        """What signatures bind: every owner sums the same kind of vector."""
        return hashlib.sha256(msgpack.packb(self.to_wire(), use_bin_type=True)).digest()


def check_weight(spec: Spec, weight: Any) -> float:
    """The weight as a float, or ValueError, from public numbers only (before approval): a weight
    that makes clip itself infinite, or that integers could not carry exactly, is refused up front."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError("weight must be a finite number > 0")
    try:
        w = float(weight)
    except OverflowError:
        raise ValueError("weight must be a finite number > 0") from None
    if not (math.isfinite(w) and w > 0 and math.isfinite(w * spec.clip)):
        raise ValueError("weight must be a finite number > 0 whose product with clip is finite")
    if any(seg.integer for seg in spec.segments) and w != 1 and not (w.is_integer() and w <= MAX_INTEGER_WEIGHT):
        raise ValueError(f"integer parts can only be weighted by a whole number up to {MAX_INTEGER_WEIGHT}")
    return w


def check_parts(spec: Spec, parts: Sequence[np.ndarray]) -> None:
    """ValueError unless the parts have the agreed number, shapes and kinds (metadata only)."""
    if len(parts) != len(spec.segments):
        raise ValueError("the value does not have the agreed parts")
    for seg, part in zip(spec.segments, parts):
        arr = np.asarray(part)
        if tuple(arr.shape) != seg.shape:
            raise ValueError(f"part {seg.name!r} has shape {tuple(arr.shape)}, not the agreed {seg.shape}")
        if arr.dtype.kind not in ("biu" if seg.integer else "biuf"):
            raise ValueError(f"part {seg.name!r} is not {'integers' if seg.integer else 'numbers'}")


def encode(spec: Spec, parts: Sequence[np.ndarray], weight: float = 1.0) -> np.ndarray:
    """The contribution, times `weight`, as uint64 (two's complement of the fixed-point integers).

    Raises only for what `check_parts` and `check_weight` refuse; any value encodes (see above)."""
    check_parts(spec, parts)
    w = check_weight(spec, weight)
    out = np.empty(spec.length, dtype=np.uint64)
    pos = 0
    for seg, part in zip(spec.segments, parts):
        flat = np.asarray(part).reshape(-1)
        ints = _integers(flat, spec.clip, int(w)) if seg.integer else _fixed_point(flat, spec, w)
        out[pos:pos + seg.size] = ints.view(np.uint64)
        pos += seg.size
    return out


def _fixed_point(flat: np.ndarray, spec: Spec, weight: float) -> np.ndarray:
    """Floats times weight, NaN as 0 and infinities (an overflowing product too) as +-clip, clipped
    and rounded to the grid: no error and no warning, whatever the values."""
    with np.errstate(all="ignore"):
        values = flat.astype(np.float64) * weight
        values = np.nan_to_num(values, nan=0.0, posinf=spec.clip, neginf=-spec.clip)
        return np.rint(np.clip(values, -spec.clip, spec.clip) * 2.0**spec.scale_bits).astype(np.int64)


def _integers(flat: np.ndarray, clip: float, weight: int) -> np.ndarray:
    """Integers times weight, clipped to +-clip without ever wrapping: clip(weight * v) exactly,
    computed as clip(weight * clip(v, +-(bound // weight + 1))), which stays far inside int64."""
    bound = int(clip)
    pre = bound // weight + 1
    if flat.dtype.kind == "u":
        flat = np.minimum(flat, np.uint64(pre)).astype(np.int64)
    else:
        flat = np.clip(flat.astype(np.int64), -pre, pre)
    return np.clip(flat * weight, -bound, bound)


def decode(spec: Spec, total: np.ndarray) -> List[np.ndarray]:
    """The summed parts: int64 for integer parts, float64 for the others."""
    signed = np.asarray(total, dtype=np.uint64).view(np.int64)
    out, pos = [], 0
    for seg in spec.segments:
        chunk = signed[pos:pos + seg.size].reshape(seg.shape)
        out.append(chunk.copy() if seg.integer else chunk.astype(np.float64) / 2.0**spec.scale_bits)
        pos += seg.size
    return out
