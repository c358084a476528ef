"""Random numbers for one scientist: their own seed, a fresh stream for every action.

The owner's global generators are shared by every scientist and by the owner's
own notebook, and how many numbers an operation draws can depend on its input
(``torch.poisson``'s sampler, ``randint`` with a private bound). A shared,
continuing stream would therefore carry private facts into later, public
random values. So each scientist has a seed of their own (random, or set with
``scientist.torch.manual_seed(n)``), and every action draws from a generator
seeded from that seed and the action's position in the scientist's sequence of
actions: what one action draws can never change what another draws, and the
same program with the same seed gets the same numbers. Nothing here touches
torch's or numpy's global generators.

One torch generator per action serves the scientist's own random calls
(`torch.randn`, dropout, and `numpy.random.*` through `duet.owner.numpy_random`),
with the semantics those libraries document; no numpy bit generator runs on the
owner. These are not privacy noise or masks, which come from vetted libraries only.
"""
from __future__ import annotations

import hashlib
import secrets
from typing import Optional

import torch


def _derive(seed: int, path: tuple, sub: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{path}:{sub}".encode(), digest_size=8, person=b"duet-rng").digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63, what torch.Generator.manual_seed takes


class Randomness:
    """One scientist's seed and the count of actions that drew from it."""

    def __init__(self, seed: Optional[int] = None) -> None:
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self.step = 0

    def manual_seed(self, seed: int) -> None:
        """Start again from a known seed (the scientist's `torch.manual_seed`)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError("manual_seed takes an int")
        self.seed = seed % 2**64
        self.step = 0

    def for_action(self) -> "ActionRandomness":
        """The generators of the next message (an action, or a whole plan run), made only if it draws.

        One step per message, whatever happens to it: how far a failing plan
        got must not shift later draws.
        """
        self.step += 1
        return ActionRandomness(self.seed, (self.step,))


class ActionRandomness:
    """The generators one action draws from; created lazily."""

    def __init__(self, seed: int, path: tuple) -> None:
        self._seed = seed
        self._path = path
        self._torch: Optional[torch.Generator] = None
        self.draws = 0

    def child(self, index: int) -> "ActionRandomness":
        """The generators of the index-th action inside this one (a plan's actions)."""
        return ActionRandomness(self._seed, self._path + (index,))

    @property
    def torch_generator(self) -> torch.Generator:
        self.draws += 1
        if self._torch is None:
            self._torch = torch.Generator().manual_seed(_derive(self._seed, self._path, 0))
        return self._torch
