"""Secure aggregation (Bonawitz et al., CCS 2017): owners sum their values so that the scientist
learns only the sum, and no one (the scientist relaying every message included) sees one owner's
value. Shared by both sides: the owner runs a `Participant`, the scientist `unmask_total`.

- `shamir`: t-of-n secret sharing of 32-byte seeds over the prime field 2^521 - 1.
- `encoding`: values as fixed-point integers modulo 2^64, after clipping.
- `masks`: pairwise masks from X25519 agreements, self masks, both expanded by libsodium's
  ChaCha20 (`randombytes_buf_deterministic`).
- `participant`: one owner's side of one round; `aggregate`: the scientist's unmasking.
"""
