"""Fixed-point numbers in the ring Z_2^64, split into additive shares.

A real x is encoded as round(x * 2^f) modulo 2^64 (two's complement in a uint64): sums and
products wrap modulo 2^64 and come out right as long as the true result, at its scale, lies in
(-2^63, 2^63). A product of two encoded numbers has scale 2^(2f); results are decoded at their
scale, never truncated on shares (one multiplication deep), so the only error is the rounding of
the inputs. Whether a result fits is decided from public bounds before any value is touched
(`fits`), since an overflow would be a silently wrong result.

Shares: x = s_1 + ... + s_k mod 2^64 with s_1 .. s_{k-1} uniform (libsodium's randombytes), so
any k - 1 shares are uniform and independent of x.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import nacl.utils
import numpy as np

FRAC_BITS = 16  # the default fixed-point step: 2^-16 (about 1.5e-5)
MIN_FRAC_BITS = 4
MAX_FRAC_BITS = 24
MAX_LENGTH = 1 << 24  # numbers one computation may hold per party (128 MiB a vector)
_LIMIT = 2.0 ** 63


def check_frac_bits(frac_bits: int) -> int:
    if type(frac_bits) is not int or not MIN_FRAC_BITS <= frac_bits <= MAX_FRAC_BITS:
        raise ValueError(f"frac_bits is an int from {MIN_FRAC_BITS} to {MAX_FRAC_BITS}")
    return frac_bits


def encode(values: np.ndarray, frac_bits: int, bound: float) -> np.ndarray:
    """Numbers as ring elements: clipped to [-bound, bound] and NaN as 0 first, so encoding never
    fails whatever the values are (a refusal that depended on them would tell the scientist so)."""
    x = np.nan_to_num(np.asarray(values, dtype=np.float64).reshape(-1), nan=0.0, posinf=bound, neginf=-bound)
    x = np.clip(x, -bound, bound)
    return np.rint(x * 2.0 ** frac_bits).astype(np.int64).view(np.uint64)


def decode(values: np.ndarray, scale_bits: int) -> np.ndarray:
    """Ring elements at scale 2^scale_bits back to floats (two's complement)."""
    return np.asarray(values, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0 ** scale_bits


def uniform(length: int) -> np.ndarray:
    """`length` uniform ring elements from the operating system's generator (libsodium)."""
    return np.frombuffer(nacl.utils.random(8 * length), dtype=np.uint64).copy() if length else np.zeros(0, np.uint64)


def split(x: np.ndarray, parties: int) -> List[np.ndarray]:
    """Additive shares of x for `parties` parties: all but the first uniform."""
    if parties < 2:
        raise ValueError("sharing needs at least two parties")
    rest = [uniform(x.size) for _ in range(parties - 1)]
    first = np.asarray(x, dtype=np.uint64).copy()
    for r in rest:
        first -= r
    return [first] + rest


def combine(shares: Sequence[np.ndarray]) -> np.ndarray:
    """The value the shares add up to (modulo 2^64)."""
    total = np.zeros_like(np.asarray(shares[0], dtype=np.uint64))
    for s in shares:
        total += np.asarray(s, dtype=np.uint64)
    return total


def encoded_bound(bound: float, frac_bits: int) -> float:
    """The largest |round(x * 2^f)| for |x| <= bound."""
    return math.floor(bound * 2.0 ** frac_bits + 0.5)


def fits_product(length: int, bound_a: float, bound_b: float, frac_bits: int) -> bool:
    """Whether a dot product of `length` pairs with these bounds stays inside the ring at scale 2^(2f)."""
    return length * encoded_bound(bound_a, frac_bits) * encoded_bound(bound_b, frac_bits) < _LIMIT


def fits_sum(terms: int, bound: float, frac_bits: int) -> bool:
    """Whether a sum of `terms` numbers of at most `bound` stays inside the ring at scale 2^f."""
    return terms * encoded_bound(bound, frac_bits) < _LIMIT


def product_error(length: int, bound_a: float, bound_b: float, frac_bits: int) -> float:
    """How far a fixed-point dot product may be from the exact one (rounding of the inputs only):
    |xy - x'y'| <= |x||y - y'| + |y'||x - x'| with |x - x'| <= 2^-(f+1)."""
    step = 2.0 ** -(frac_bits + 1)
    return length * (bound_a * step + (bound_b + step) * step)


def sum_error(terms: int, frac_bits: int) -> float:
    """How far a fixed-point sum may be from the exact one."""
    return terms * 2.0 ** -(frac_bits + 1)
