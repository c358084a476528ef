"""One owner's side of one secure-aggregation round, as a state machine that refuses what could
unmask it (Bonawitz et al. 2017, with the consistency check of their actively secure variant).

Steps, each called once and in order, with what the scientist relays:

1. `advertise()`: two fresh X25519 key pairs (one to encrypt shares to other owners, one for
   pairwise masks), signed with the owner's long-term Ed25519 identity over the round: its id,
   every participant's fingerprint in order, the threshold and the vector's spec.
2. `share_keys(adverts)`: every advert is checked (signature, fingerprint in the agreed list,
   same round); then a self-mask seed and the mask secret key are split t-of-n (Shamir) and each
   owner's shares are sealed to it (crypto_box): the scientist relays what it cannot read.
3. `masked_input(sealed)`: shares addressed to this owner are opened; the vector goes out as
   value + self mask + pairwise masks with every owner who shared keys, modulo 2^64.
4. `consistency(survivors)`: the owner signs the list of owners whose masked vectors arrived,
   bound to this run of the round (a hash of every advert it received: fresh keys per run).
5. `unmask(survivors, signatures)`: only with valid signatures of at least t survivors on the very
   same list in the very same run, the owner reveals, for each survivor, its share of that
   owner's self mask, and for each owner who dropped after sharing keys, its share of that
   owner's mask key. Never both for one owner, and only once.

Two stories about who survived cannot both gather t signatures as long as 2t > n + c, where c
is how many owners may collude with the scientist (they sign both stories): every owner refuses
a round where that fails, c being its own bound (`max_colluders`; by default fewer than a third
of the round's owners). Fewer than max(threshold, min_owners) owners at any step ends the round:
nothing is revealed. A step that refuses leaves the participant at "refused": nothing goes on.
"""
from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import msgpack
import nacl.exceptions
import nacl.public
import nacl.utils
import numpy as np

from .. import identity as identity_mod
from . import masks, shamir
from .encoding import Spec

ROUND_ID_BYTES = 16
MAX_OWNERS = 64  # full-graph secure aggregation: n^2 pairwise masks
MAX_MASK_WORDS = 1 << 28  # owners x numbers: the keystream one masked step expands (2 GiB, a few seconds)
_FINGERPRINT = re.compile(r"SHA256(:[0-9a-f]{4}){8}")  # duet.identity.fingerprint's form


class RoundRefused(ValueError):
    """This owner will not go on with the round; the message says why (it carries no data)."""


def default_colluders(owners: int) -> int:
    """The owners that may collude with the scientist unless an owner says otherwise: fewer than a third."""
    return (owners - 1) // 3


def withstands(owners: int, threshold: int, colluders: int) -> bool:
    """Whether no two survivor lists can each gather `threshold` signatures when `colluders` owners
    sign both: the honest owners sign one list each, so each list needs threshold - colluders of
    the owners - colluders honest ones, and two lists need 2 * threshold > owners + colluders."""
    return 2 * threshold > owners + colluders


def smallest_threshold(owners: int, colluders: Optional[int] = None) -> int:
    """The least threshold that withstands `colluders` (default: fewer than a third of the owners)."""
    c = default_colluders(owners) if colluders is None else colluders
    return (owners + c) // 2 + 1


@dataclass(frozen=True)
class Round:
    """What every owner of a round agrees on, and signs."""

    round_id: bytes
    participants: Tuple[str, ...]  # key fingerprints; owner i (1-based) is participants[i - 1]
    threshold: int
    spec: Spec
    # Every owner's weight (position order) and the dp epsilon (None: an exact sum). Signed with the
    # rest, so each owner knows what all the others were asked, not only its own part.
    weights: Tuple[float, ...] = ()
    dp: Optional[float] = None

    def check(self) -> None:
        if not isinstance(self.round_id, bytes) or len(self.round_id) != ROUND_ID_BYTES:
            raise RoundRefused("malformed round id")
        n = len(self.participants)
        if not 2 <= n <= MAX_OWNERS or len(set(self.participants)) != n:
            raise RoundRefused(f"a round needs 2 to {MAX_OWNERS} distinct owners")
        if not all(isinstance(p, str) and _FINGERPRINT.fullmatch(p) for p in self.participants):
            raise RoundRefused("participants are key fingerprints (\"SHA256:xxxx:...\")")
        if not (n // 2 < self.threshold <= n):
            raise RoundRefused("the threshold must be more than half of the owners (so no two groups of owners "
                               "can be told different stories) and at most all of them")
        try:
            self.spec.check(n)
        except ValueError as exc:
            raise RoundRefused(str(exc)) from None
        if self.weights and len(self.weights) != n:
            raise RoundRefused("one weight per owner")
        if n * self.spec.length > MAX_MASK_WORDS:
            raise RoundRefused(f"{n} owners x {self.spec.length} numbers is more masking than one round may ask "
                               f"(at most {MAX_MASK_WORDS} in all)")

    def transcript(self, what: str, *fields: Any) -> bytes:
        return msgpack.packb([b"duet-secagg-v1", what, self.round_id, list(self.participants), self.threshold,
                              self.spec.digest(), [float(w) for w in self.weights], self.dp, *fields], use_bin_type=True)


@dataclass
class _Peer:
    index: int
    identity_key: bytes
    box_key: bytes
    mask_key: bytes


def admit(rnd: Round, fingerprint: str, index: int, min_owners: int = 2, max_colluders: Optional[int] = None) -> None:
    """RoundRefused unless this owner takes part in `rnd` at `index` under its own limits: at least
    `min_owners` owners, and a threshold no two stories can both reach with `max_colluders`
    colluding owners (None: fewer than a third). Public numbers only, so it can run before approval."""
    rnd.check()
    n = len(rnd.participants)
    if not 1 <= index <= n or rnd.participants[index - 1] != fingerprint:
        raise RoundRefused("this owner is not the participant at that position")
    if n < min_owners:
        raise RoundRefused(f"only {n} owners take part; this owner requires at least {min_owners}")
    if max_colluders is not None and (type(max_colluders) is not int or max_colluders < 0):
        raise RoundRefused("max_colluders must be an int >= 0")
    c = default_colluders(n) if max_colluders is None else max_colluders
    if not withstands(n, rnd.threshold, c):
        needed = f"a threshold of at least {smallest_threshold(n, c)}" if c < n else "more owners"
        raise RoundRefused(f"a threshold of {rnd.threshold} of {n} owners does not withstand {c} owner(s) colluding "
                           f"with the scientist (two stories about who survived could both be signed); this owner "
                           f"needs 2 x threshold > owners + colluders: {needed}")


def adverts_digest(peers: Mapping[int, _Peer]) -> bytes:
    """What one run of a round is: every owner's fresh keys as this owner received them. Survivor
    lists are signed with it, so a signature from another run (a reused round id) never counts."""
    keys = [[v, peers[v].box_key, peers[v].mask_key] for v in sorted(peers)]
    return hashlib.sha256(msgpack.packb(keys, use_bin_type=True)).digest()


@dataclass
class Participant:
    """This owner in one round. `vector` is its contribution, already encoded (uint64)."""

    identity: Any  # duet.identity.Identity
    round: Round
    index: int
    vector: np.ndarray
    min_owners: int = 2
    max_colluders: Optional[int] = None  # None: fewer than a third of the round's owners
    stage: str = field(default="new")

    def __post_init__(self) -> None:
        admit(self.round, self.identity.fingerprint, self.index, self.min_owners, self.max_colluders)
        if self.vector.dtype != np.uint64 or self.vector.shape != (self.round.spec.length,):
            raise RoundRefused("the contribution does not match the agreed spec")
        self._box = nacl.public.PrivateKey.generate()
        self._mask = nacl.public.PrivateKey.generate()
        self._self_seed = nacl.utils.random(masks.SEED_BYTES)
        self._peers: Dict[int, _Peer] = {}
        self._received: Dict[int, Tuple[int, int]] = {}  # owner -> (share of its self seed, share of its mask key)
        self._u2: List[int] = []
        self._u3: List[int] = []
        self._run = b""  # adverts_digest of this run, set when keys are shared

    @property
    def quorum(self) -> int:
        return max(self.round.threshold, self.min_owners)

    @contextmanager
    def _step(self, expected: str, then: str) -> Iterator[None]:
        """One step, in order: the stage is "refused" until it completes, so a step that failed
        half way (shares opened, no vector sent) can never be followed by the next."""
        if self.stage != expected:
            raise RoundRefused(f"this step comes after {expected!r}; the round is at {self.stage!r}")
        self.stage = "refused"
        yield
        self.stage = then

    def survivors_message(self, survivors: Sequence[int]) -> bytes:
        """What a survivor list's signatures sign: the list, in this run of this round."""
        return self.round.transcript("survivors", self._run, list(survivors))

    # -- 1 -------------------------------------------------------------------------------
    def advertise(self) -> Dict[str, Any]:
        with self._step("new", "advertised"):
            return self._advertise()

    def _advertise(self) -> Dict[str, Any]:
        box_pk, mask_pk = bytes(self._box.public_key), bytes(self._mask.public_key)
        sig = self.identity.sign(self.round.transcript("advert", self.index, box_pk, mask_pk))
        return {"index": self.index, "pub": self.identity.public_key, "box": box_pk, "mask": mask_pk, "sig": sig}

    # -- 2 -------------------------------------------------------------------------------
    def share_keys(self, adverts: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        with self._step("advertised", "shared"):
            return self._share_keys(adverts)

    def _share_keys(self, adverts: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        peers = verify_adverts(self.round, adverts)
        mine = peers.get(self.index)
        if mine is None or mine.box_key != bytes(self._box.public_key) or mine.mask_key != bytes(self._mask.public_key):
            raise RoundRefused("this owner's own advert was not relayed as it was sent")
        if len(peers) < self.quorum:
            raise RoundRefused(f"only {len(peers)} owners advertised keys; at least {self.quorum} are needed")
        self._peers = peers
        self._run = adverts_digest(peers)
        indices = sorted(peers)
        seed_shares = shamir.split(self._self_seed, indices, self.round.threshold)
        key_shares = shamir.split(bytes(self._mask), indices, self.round.threshold)
        self._received[self.index] = (seed_shares[self.index], key_shares[self.index])
        out = []
        for v in indices:
            if v == self.index:
                continue
            box = nacl.public.Box(self._box, nacl.public.PublicKey(peers[v].box_key))
            plain = msgpack.packb([self.round.round_id, self.index, v, shamir.to_bytes(seed_shares[v]),
                                   shamir.to_bytes(key_shares[v])], use_bin_type=True)
            out.append({"to": v, "ct": bytes(box.encrypt(plain))})
        return out

    # -- 3 -------------------------------------------------------------------------------
    def masked_input(self, sealed: Sequence[Mapping[str, Any]]) -> np.ndarray:
        with self._step("shared", "masked"):
            return self._masked_input(sealed)

    def _masked_input(self, sealed: Sequence[Mapping[str, Any]]) -> np.ndarray:
        for item in sealed:
            v, ct = item.get("from"), item.get("ct")
            peer = self._peers.get(v) if type(v) is int else None
            if peer is None or v == self.index or v in self._received or not isinstance(ct, bytes):
                raise RoundRefused("malformed or repeated shares")
            try:
                plain = nacl.public.Box(self._box, nacl.public.PublicKey(peer.box_key)).decrypt(ct)
                rid, sender, to, seed_share, key_share = msgpack.unpackb(plain, raw=False)
            except (nacl.exceptions.CryptoError, ValueError, TypeError):
                raise RoundRefused(f"the shares from owner {v} do not open: they were not sealed by that owner") from None
            if rid != self.round.round_id or sender != v or to != self.index:
                raise RoundRefused(f"the shares from owner {v} belong to another round or owner")
            try:
                self._received[v] = (shamir.from_bytes(seed_share), shamir.from_bytes(key_share))
            except ValueError:  # a well-sealed box around a malformed share: that owner misbehaves
                raise RoundRefused(f"the shares from owner {v} are malformed") from None
        self._u2 = sorted(self._received)
        if len(self._u2) < self.quorum:
            raise RoundRefused(f"only {len(self._u2)} owners shared keys; at least {self.quorum} are needed")
        length = self.round.spec.length
        y = self.vector + masks.expand(self._self_seed, length)
        y += masks.pairwise(self.index, bytes(self._mask), bytes(self._mask.public_key),
                            {v: self._peers[v].mask_key for v in self._u2}, self.round.round_id, length)
        self.vector = np.zeros(0, dtype=np.uint64)  # no longer needed: do not keep the clear value around
        return y

    # -- 4 -------------------------------------------------------------------------------
    def consistency(self, survivors: Sequence[int]) -> bytes:
        with self._step("masked", "consistent"):
            return self._consistency(survivors)

    def _consistency(self, survivors: Sequence[int]) -> bytes:
        u3 = _indices(survivors)
        if not set(u3) <= set(self._u2) or self.index not in u3:
            raise RoundRefused("the survivors are not owners that shared keys with this one")
        if len(u3) < self.quorum:
            raise RoundRefused(f"only {len(u3)} owners' vectors arrived; at least {self.quorum} are needed")
        self._u3 = u3
        return self.identity.sign(self.survivors_message(u3))

    # -- 5 -------------------------------------------------------------------------------
    def unmask(self, survivors: Sequence[int], signatures: Mapping[int, bytes]) -> Dict[int, Tuple[str, bytes]]:
        with self._step("consistent", "done"):
            return self._unmask(survivors, signatures)

    def _unmask(self, survivors: Sequence[int], signatures: Mapping[int, bytes]) -> Dict[int, Tuple[str, bytes]]:
        if _indices(survivors) != self._u3:
            raise RoundRefused("the survivors differ from the list this owner signed")
        message = self.survivors_message(self._u3)
        valid = 0
        for v, sig in signatures.items():
            peer = self._peers.get(v)
            if peer is None or v not in self._u3 or not isinstance(sig, bytes):
                continue
            try:
                identity_mod.verify(peer.identity_key, message, sig)
            except Exception:
                continue
            valid += 1
        if valid < self.round.threshold:
            raise RoundRefused(f"only {valid} survivors signed this list of survivors; {self.round.threshold} must")
        out: Dict[int, Tuple[str, bytes]] = {}
        for v in self._u2:
            seed_share, key_share = self._received[v]
            # A survivor's self mask, or a dropped owner's mask key: never both for one owner.
            out[v] = ("seed", shamir.to_bytes(seed_share)) if v in self._u3 else ("key", shamir.to_bytes(key_share))
        self._received.clear()
        return out


def _indices(values: Sequence[Any]) -> List[int]:
    if not isinstance(values, (list, tuple)) or not all(type(v) is int for v in values) or len(set(values)) != len(values):
        raise RoundRefused("malformed list of owners")
    return sorted(values)


def verify_adverts(rnd: Round, adverts: Sequence[Mapping[str, Any]]) -> Dict[int, _Peer]:
    """Every advert, checked: a signature by the key whose fingerprint is at that position."""
    peers: Dict[int, _Peer] = {}
    for ad in adverts:
        try:
            v, pub, box_key, mask_key, sig = (ad[k] for k in ("index", "pub", "box", "mask", "sig"))
        except (KeyError, TypeError):
            raise RoundRefused("malformed key advert") from None
        if type(v) is not int or not 1 <= v <= len(rnd.participants) or v in peers:
            raise RoundRefused("a key advert for an unknown or repeated position")
        if not all(isinstance(b, bytes) and len(b) == 32 for b in (pub, box_key, mask_key)):
            raise RoundRefused("malformed key advert")
        if not (masks.usable(box_key) and masks.usable(mask_key)):
            raise RoundRefused(f"the key advert of owner {v} holds a degenerate key")
        try:
            if identity_mod.fingerprint(pub) != rnd.participants[v - 1]:
                raise RoundRefused(f"the key advert of owner {v} is signed by a key that is not theirs")
            identity_mod.verify(pub, rnd.transcript("advert", v, box_key, mask_key), sig)
        except RoundRefused:
            raise
        except Exception:
            raise RoundRefused(f"the key advert of owner {v} does not verify: forged or altered") from None
        peers[v] = _Peer(v, pub, box_key, mask_key)
    if len({p.mask_key for p in peers.values()}) != len(peers) or len({p.box_key for p in peers.values()}) != len(peers):
        raise RoundRefused("two owners advertised the same key")
    return peers
