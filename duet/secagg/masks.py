"""Masks that hide one owner's vector and cancel in the sum.

- A pairwise mask between owners u and v: both derive the same 32-byte seed from an X25519
  agreement of their round keys, hashed with keyed BLAKE2b together with the round id and both
  public keys (so it is fresh per round and bound to exactly this pair); u adds the expanded
  mask and v subtracts it (the one with the smaller index adds).
- A self mask: a random 32-byte seed per owner and round, so that revealing pairwise keys of an
  owner who is said to have dropped out does not unmask it if it did not (double masking).

Seeds are expanded with libsodium's ChaCha20 (`randombytes_buf_deterministic`) into uint64
words; never a 32-bit seed, never numpy's generator.
"""
from __future__ import annotations

import nacl.bindings
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.public
import numpy as np

SEED_BYTES = 32
_PAIR_PERSON = b"duet-secagg-pair"  # BLAKE2b personalization (16 bytes)


def expand(seed: bytes, length: int) -> np.ndarray:
    """`length` uint64 words from a seed (ChaCha20 keystream)."""
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError("a mask seed is 32 bytes")
    raw = nacl.bindings.randombytes_buf_deterministic(8 * length, seed)
    return np.frombuffer(raw, dtype=np.uint64).copy()


def pair_seed(my_secret: bytes, my_public: bytes, their_public: bytes, round_id: bytes) -> bytes:
    """The seed u and v share: KA(my secret, their public), keyed into BLAKE2b with the round and both keys."""
    if my_public == their_public:
        raise ValueError("a pair needs two different keys")
    try:
        shared = nacl.bindings.crypto_scalarmult(my_secret, their_public)
    except nacl.exceptions.CryptoError:  # libsodium refuses low-order points
        shared = bytes(32)
    if shared == bytes(32):
        raise ValueError("a degenerate public key")  # a low-order point: the agreement would be public
    low, high = sorted((my_public, their_public))
    return nacl.hash.blake2b(round_id + low + high, digest_size=SEED_BYTES, key=shared, person=_PAIR_PERSON,
                             encoder=nacl.encoding.RawEncoder)


def usable(public: bytes) -> bool:
    """Whether a public key gives a secret agreement (libsodium refuses low-order points)."""
    try:
        return nacl.bindings.crypto_scalarmult(bytes(new_key()), public) != bytes(32)
    except nacl.exceptions.CryptoError:
        return False


def new_key() -> nacl.public.PrivateKey:
    return nacl.public.PrivateKey.generate()


def public_of(secret: bytes) -> bytes:
    return bytes(nacl.public.PrivateKey(secret).public_key)


def pairwise(my_index: int, my_secret: bytes, my_public: bytes, others: dict, round_id: bytes, length: int) -> np.ndarray:
    """The sum of pairwise masks owner `my_index` adds, over `others` (index -> public mask key)."""
    total = np.zeros(length, dtype=np.uint64)
    for v, public in others.items():
        if v == my_index:
            continue
        mask = expand(pair_seed(my_secret, my_public, public, round_id), length)
        if my_index < v:
            total += mask
        else:
            total -= mask
    return total
