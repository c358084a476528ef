"""The scientist's side of unmasking: from the masked vectors and the owners' shares, the sum of
the survivors' vectors and nothing else."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from . import masks, shamir
from .participant import Round


class RoundFailed(RuntimeError):
    """Too few owners (or shares) to unmask: nothing about any single vector was learned."""


def unmask_total(rnd: Round, mask_keys: Mapping[int, bytes], masked: Mapping[int, np.ndarray],
                 replies: Mapping[int, Mapping[int, Tuple[str, bytes]]], shared: Sequence[int]) -> np.ndarray:
    """Sum of the masked vectors of the survivors (`masked`), with every mask removed.

    `mask_keys`: each owner's advertised public mask key; `replies`: each survivor's unmask reply
    (for each owner that shared keys: ("seed", share) if it survived, ("key", share) if it dropped);
    `shared`: the owners that shared keys (U2).
    """
    survivors = sorted(masked)
    dropped = sorted(set(shared) - set(survivors))
    length = rnd.spec.length
    total = np.zeros(length, dtype=np.uint64)
    for u in survivors:
        total += masked[u]
    for v in survivors + dropped:
        kind = "seed" if v in masked else "key"
        shares: Dict[int, int] = {}
        for u, reply in replies.items():
            entry = reply.get(v)
            if entry is not None and entry[0] == kind:
                shares[u] = shamir.from_bytes(entry[1])
        if len(shares) < rnd.threshold:
            raise RoundFailed(f"only {len(shares)} shares for owner {v}; {rnd.threshold} are needed")
        secret = shamir.combine(dict(list(shares.items())[: rnd.threshold]))
        if kind == "seed":
            total -= masks.expand(secret, length)
            continue
        if masks.public_of(secret) != mask_keys[v]:
            raise RoundFailed(f"the shares of owner {v}'s key do not rebuild its advertised key")
        for u in survivors:  # what survivor u added for the pair (u, v), removed
            mask = masks.expand(masks.pair_seed(secret, mask_keys[v], mask_keys[u], rnd.round_id), length)
            if u < v:
                total -= mask
            else:
                total += mask
    return total
