"""Shamir secret sharing of 32-byte secrets: any `threshold` shares rebuild the secret, fewer
reveal nothing about it (information-theoretically), over the field of the prime 2^521 - 1.

The polynomial's coefficients come from the operating system (libsodium's randombytes), drawn by
rejection so they are uniform in the field. Shares are evaluated at the participants' indices
(1, 2, ...): never at 0, where the secret sits.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping

import nacl.utils

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # 521 bits


def _random_field_element() -> int:
    while True:
        value = int.from_bytes(nacl.utils.random(SHARE_BYTES), "big") & ((1 << 521) - 1)
        if value < PRIME:
            return value


def split(secret: bytes, indices: Iterable[int], threshold: int) -> Dict[int, int]:
    """One share per index: the secret's polynomial of degree threshold - 1 evaluated there."""
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes")
    points = list(indices)
    if len(set(points)) != len(points) or any(not 0 < i < PRIME for i in points):
        raise ValueError("share indices must be distinct positive numbers")
    if not 1 <= threshold <= len(points):
        raise ValueError("the threshold must be between 1 and the number of shares")
    coefficients = [int.from_bytes(secret, "big")] + [_random_field_element() for _ in range(threshold - 1)]
    shares = {}
    for x in points:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def combine(shares: Mapping[int, int]) -> bytes:
    """The secret, from at least `threshold` shares (Lagrange interpolation at 0).

    Fewer shares give a wrong value, not an error: callers count shares first.
    """
    points = list(shares.items())
    if not points:
        raise ValueError("no shares")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _yj) in enumerate(points):
            if i != j:
                num = (num * -xj) % PRIME
                den = (den * (xi - xj)) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ValueError("these shares do not belong to one secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def to_bytes(share: int) -> bytes:
    return share.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
    if not isinstance(data, bytes) or len(data) != SHARE_BYTES:
        raise ValueError("malformed share")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("malformed share")
    return value
