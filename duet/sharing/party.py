"""One party's side of a secret-shared computation, as a state machine that refuses what it
does not expect. Semi-honest parties; the scientist relays every message and can read none.

Two computations (`Job.op`), on vectors of a public length with public bounds:

- "sum": each owner's vector is split into additive shares, one sealed to each other owner; an
  owner's share of the result is the sum of the shares it holds. The scientist adds the owners'
  result shares and learns the sum (of everything, or elementwise), nothing else.
- "dot": two owners, one vector each, and a dealer (a third party) who makes a Beaver triple
  (u, v, w = u * v elementwise) and seals one share of each to each owner. Each owner shares its
  vector with the other, opens e = x - u and f = y - v to the other (sealed; uniform, since u and v
  are), and computes its share of x * y as w_k + e v_k + f u_k (+ e f for the first owner), summed.
  The first owner also sends the second a random r that one adds and the other subtracts, so a
  result share alone is uniform even to someone who knows the dealer's triple.

Steps, each called once and in order, with what the scientist relays:

1. `advertise()`: a fresh X25519 key, signed with the party's long-term Ed25519 identity over the
   job (its id, the operation, every owner's fingerprint in order, the dealer's, the length, the
   fixed-point step, the bounds, and every owner's signed description of its vector).
2. `deal(adverts)`: every advert is checked (signature, fingerprint at that position, same job);
   then shares (an owner) or triples (the dealer) are sealed to each other party (crypto_box).
3. `open(sealed)`: the shares addressed to this owner are opened. For a sum, its result share
   goes back to the scientist; for a dot product, e_k and f_k go sealed to the other owner.
4. `finish(sealed)` (dot product): the other owner's e and f are opened; the result share goes
   back to the scientist.

What each party learns: an owner, uniform shares and e, f (uniform); the dealer, nothing (it
receives nothing); the scientist, sealed boxes and the result shares, whose sum is the result.
A dealer that colludes with an owner gives it u (or v), and e = x - u then is the other owner's
vector: the dealer must be trusted not to collude with any owner. One that colludes with the
scientist learns nothing more than the result (the boxes are sealed, r hides the result shares),
but a dealer that lies (w != u v) makes the result wrong without anyone noticing: semi-honest.
"""
from __future__ import annotations

import hashlib
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import msgpack
import nacl.exceptions
import nacl.public
import numpy as np

from .. import identity as identity_mod
from . import ring

JOB_ID_BYTES = 16
MAX_OWNERS = 16
OPS = ("sum", "dot")
_FINGERPRINT = re.compile(r"SHA256(:[0-9a-f]{4}){8}")
_TAG = b"duet-smpc-v1"


class JobRefused(ValueError):
    """This party will not go on with the computation; the message says why (it carries no data)."""


@dataclass(frozen=True)
class Description:
    """What an owner says its vector is, signed: the assets it derives from and the operations."""

    index: int
    public_key: bytes
    lineage: Tuple[str, ...]
    ops: Tuple[str, ...]
    signature: bytes

    def to_wire(self) -> Dict[str, Any]:
        return {"index": self.index, "pub": self.public_key, "lineage": list(self.lineage), "ops": list(self.ops),
                "sig": self.signature}

    @staticmethod
    def from_wire(raw: Any) -> "Description":
        try:
            index, pub, lineage, ops, sig = (raw[k] for k in ("index", "pub", "lineage", "ops", "sig"))
        except (KeyError, TypeError):
            raise JobRefused("malformed description") from None
        if type(index) is not int or not isinstance(pub, bytes) or not isinstance(sig, bytes) \
                or not isinstance(lineage, list) or not isinstance(ops, list) \
                or not all(isinstance(s, str) and len(s) <= 200 for s in lineage + ops) or len(lineage) + len(ops) > 200:
            raise JobRefused("malformed description")
        return Description(index, pub, tuple(lineage), tuple(ops), sig)


def describe_message(job_id: bytes, op: str, index: int, lineage: Sequence[str], ops: Sequence[str]) -> bytes:
    """What an owner signs about its vector (before the job's other terms are fixed)."""
    return msgpack.packb([_TAG, "describe", job_id, op, index, list(lineage), list(ops)], use_bin_type=True)


@dataclass(frozen=True)
class Job:
    """What every party of a computation agrees on, and signs."""

    job_id: bytes
    op: str
    participants: Tuple[str, ...]  # the owners' key fingerprints; owner i (1-based) is participants[i - 1]
    dealer: str  # the dealer's key fingerprint (a dot product), "" for a sum
    length: int
    frac_bits: int
    bounds: Tuple[float, ...]  # |value| <= bound for each owner's vector (values beyond are clipped)
    reduce: bool  # True: the result is one number (the total); False: a vector of `length`
    descriptions: Tuple[Description, ...] = ()

    @property
    def scale_bits(self) -> int:
        return 2 * self.frac_bits if self.op == "dot" else self.frac_bits

    @property
    def parties(self) -> int:
        return len(self.participants)

    def check(self) -> None:
        """JobRefused unless the terms are well formed and the result fits the ring (public facts only)."""
        n = self.parties
        if not isinstance(self.job_id, bytes) or len(self.job_id) != JOB_ID_BYTES:
            raise JobRefused("malformed job id")
        if self.op not in OPS:
            raise JobRefused(f"unknown operation {self.op!r}")
        if not 2 <= n <= MAX_OWNERS or len(set(self.participants)) != n \
                or not all(isinstance(p, str) and _FINGERPRINT.fullmatch(p) for p in self.participants):
            raise JobRefused(f"a computation needs 2 to {MAX_OWNERS} distinct owners, by key fingerprint")
        if self.op == "dot":
            if n != 2:
                raise JobRefused("a dot product is between two owners' vectors")
            if not _FINGERPRINT.fullmatch(self.dealer or "") or self.dealer in self.participants:
                raise JobRefused("a dot product needs a dealer who is none of the owners")
        elif self.dealer:
            raise JobRefused("a sum needs no dealer")
        if type(self.length) is not int or not 1 <= self.length <= ring.MAX_LENGTH:
            raise JobRefused(f"a vector of 1 to {ring.MAX_LENGTH} numbers")
        try:
            ring.check_frac_bits(self.frac_bits)
        except ValueError as exc:
            raise JobRefused(str(exc)) from None
        if len(self.bounds) != n or not all(isinstance(b, float) and math.isfinite(b) and b > 0 for b in self.bounds):
            raise JobRefused("one bound > 0 per owner")
        if not all(1 <= ring.encoded_bound(b, self.frac_bits) < 2.0 ** 62 for b in self.bounds):
            raise JobRefused("each bound must be at least one fixed-point step and encode in 62 bits")
        terms = self.length if self.reduce else 1
        if self.op == "dot":
            ok = ring.fits_product(terms, self.bounds[0], self.bounds[1], self.frac_bits)
        else:
            ok = ring.fits_sum(terms * n, max(self.bounds), self.frac_bits)
        if not ok:
            raise JobRefused("the result could overflow the ring with these bounds: use smaller bounds or frac_bits")

    def transcript(self, what: str, *fields: Any) -> bytes:
        described = [[d.index, d.public_key, list(d.lineage), list(d.ops), d.signature] for d in self.descriptions]
        return msgpack.packb([_TAG, what, self.job_id, self.op, list(self.participants), self.dealer, self.length,
                              self.frac_bits, list(self.bounds), self.reduce, described, *fields], use_bin_type=True)

    def digest(self) -> bytes:
        return hashlib.sha256(self.transcript("job")).digest()

    def to_wire(self) -> Dict[str, Any]:
        return {"job": self.job_id, "op": self.op, "participants": list(self.participants), "dealer": self.dealer,
                "length": self.length, "frac_bits": self.frac_bits, "bounds": list(self.bounds), "reduce": self.reduce,
                "descriptions": [d.to_wire() for d in self.descriptions]}

    @staticmethod
    def from_wire(raw: Any) -> "Job":
        if not isinstance(raw, dict):
            raise JobRefused("malformed job")
        participants, bounds, descriptions = raw.get("participants"), raw.get("bounds"), raw.get("descriptions")
        if not isinstance(participants, list) or not isinstance(bounds, list) or not isinstance(descriptions, list) \
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds) \
                or not isinstance(raw.get("dealer"), str) or type(raw.get("reduce")) is not bool:
            raise JobRefused("malformed job")
        job = Job(raw.get("job"), raw.get("op"), tuple(participants), raw["dealer"], raw.get("length"),  # type: ignore[arg-type]
                  raw.get("frac_bits"), tuple(float(b) for b in bounds), raw["reduce"],  # type: ignore[arg-type]
                  tuple(Description.from_wire(d) for d in descriptions))
        job.check()
        job.verify_descriptions()
        return job

    def verify_descriptions(self) -> None:
        """Every owner's description, signed by the key whose fingerprint is at its position."""
        if sorted(d.index for d in self.descriptions) != list(range(1, self.parties + 1)):
            raise JobRefused("every owner describes its vector once")
        for d in self.descriptions:
            try:
                if identity_mod.fingerprint(d.public_key) != self.participants[d.index - 1]:
                    raise JobRefused(f"owner {d.index}'s description is signed by a key that is not theirs")
                identity_mod.verify(d.public_key, describe_message(self.job_id, self.op, d.index, d.lineage, d.ops),
                                    d.signature)
            except JobRefused:
                raise
            except Exception:
                raise JobRefused(f"owner {d.index}'s description does not verify: forged or altered") from None


@dataclass
class _Peer:
    index: int
    box_key: bytes


class _Base:
    """What owners and the dealer share: a fresh box key, adverts, sealing."""

    job: Job
    index: int  # 0: the dealer; 1..n: the owners
    stage: str

    def _init_keys(self, identity: Any) -> None:
        self.identity = identity
        self._box = nacl.public.PrivateKey.generate()
        self._peers: Dict[int, _Peer] = {}

    @contextmanager
    def _step(self, expected: str, then: str) -> Iterator[None]:
        if self.stage != expected:
            raise JobRefused(f"this step comes after {expected!r}; the computation is at {self.stage!r}")
        self.stage = "refused"
        yield
        self.stage = then

    def advertise(self) -> Dict[str, Any]:
        with self._step("new", "advertised"):
            box_pk = bytes(self._box.public_key)
            sig = self.identity.sign(self.job.transcript("advert", self.index, box_pk))
            return {"index": self.index, "pub": self.identity.public_key, "box": box_pk, "sig": sig}

    def _take_adverts(self, adverts: Sequence[Mapping[str, Any]]) -> None:
        peers = verify_adverts(self.job, adverts)
        mine = peers.get(self.index)
        if mine is None or mine.box_key != bytes(self._box.public_key):
            raise JobRefused("this party's own advert was not relayed as it was sent")
        self._peers = peers

    def _seal(self, to: int, kind: str, arrays: Sequence[np.ndarray]) -> Dict[str, Any]:
        box = nacl.public.Box(self._box, nacl.public.PublicKey(self._peers[to].box_key))
        plain = msgpack.packb([_TAG, self.job.job_id, kind, self.index, to, [np.ascontiguousarray(a, np.uint64).tobytes()
                                                                            for a in arrays]], use_bin_type=True)
        return {"from": self.index, "to": to, "ct": bytes(box.encrypt(plain))}

    def _open(self, item: Mapping[str, Any], kind: str, count: int, sizes: Sequence[int]) -> Tuple[int, List[np.ndarray]]:
        sender, ct = item.get("from") if isinstance(item, Mapping) else None, item.get("ct") if isinstance(item, Mapping) else None
        peer = self._peers.get(sender) if type(sender) is int and sender != self.index else None
        if peer is None or not isinstance(ct, bytes):
            raise JobRefused("a sealed message from an unknown party")
        try:
            plain = nacl.public.Box(self._box, nacl.public.PublicKey(peer.box_key)).decrypt(ct)
            tag, job_id, got_kind, frm, to, parts = msgpack.unpackb(plain, raw=False)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise JobRefused(f"a message from party {sender} does not open: it was not sealed by that party") from None
        if tag != _TAG or job_id != self.job.job_id or got_kind != kind or frm != sender or to != self.index:
            raise JobRefused(f"a message from party {sender} belongs to another computation or step")
        if not isinstance(parts, list) or len(parts) != count or \
                not all(isinstance(p, bytes) and len(p) == 8 * n for p, n in zip(parts, sizes)):
            raise JobRefused(f"a message from party {sender} is malformed")
        return sender, [np.frombuffer(p, dtype=np.uint64).copy() for p in parts]


class Dealer(_Base):
    """The dealer of a dot product: makes a Beaver triple and seals each owner its shares."""

    def __init__(self, identity: Any, job: Job) -> None:
        job.check()
        if job.op != "dot" or identity.fingerprint != job.dealer:
            raise JobRefused("this party is not the dealer of that computation")
        self.job, self.index, self.stage = job, 0, "new"
        self._init_keys(identity)

    def deal(self, adverts: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        with self._step("advertised", "done"):
            self._take_adverts(adverts)
            if set(self._peers) != {0, 1, 2}:
                raise JobRefused("every party must advertise a key")
            n = self.job.length
            u, v = ring.uniform(n), ring.uniform(n)
            w = u * v  # (uint64: modulo 2^64)
            us, vs, ws = ring.split(u, 2), ring.split(v, 2), ring.split(w, 2)
            return [self._seal(k, "triple", [us[k - 1], vs[k - 1], ws[k - 1]]) for k in (1, 2)]


@dataclass
class Party(_Base):
    """Owner `index` of a computation; `vector` is its value, already encoded (uint64, `length`)."""

    identity: Any
    job: Job
    index: int
    vector: np.ndarray
    stage: str = field(default="new")

    def __post_init__(self) -> None:
        self.job.check()
        if not 1 <= self.index <= self.job.parties or self.job.participants[self.index - 1] != self.identity.fingerprint:
            raise JobRefused("this owner is not the party at that position")
        if self.vector.dtype != np.uint64 or self.vector.shape != (self.job.length,):
            raise JobRefused("the vector does not match the agreed length")
        self._init_keys(self.identity)
        self._held: Dict[int, np.ndarray] = {}  # whose vector -> this owner's share of it
        self._mask: Optional[np.ndarray] = None  # the result share's offset (dot product): +r or -r
        self._triple: Tuple[np.ndarray, ...] = ()
        self._opened: Tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.uint64), np.zeros(0, np.uint64))

    def _others(self) -> List[int]:
        return [k for k in range(1, self.job.parties + 1) if k != self.index]

    def deal(self, adverts: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        with self._step("advertised", "dealt"):
            self._take_adverts(adverts)
            if set(self._peers) != set(range(0 if self.job.op == "dot" else 1, self.job.parties + 1)):
                raise JobRefused("every party must advertise a key")
            shares = ring.split(self.vector, self.job.parties)
            self.vector = np.zeros(0, dtype=np.uint64)  # no longer needed: do not keep the clear value around
            self._held[self.index] = shares[0]
            out = []
            for k, share in zip(self._others(), shares[1:]):
                arrays = [share]
                if self.job.op == "dot" and self.index == 1:
                    r = ring.uniform(self._result_length())
                    self._mask = r
                    arrays.append(r)
                out.append(self._seal(k, "share", arrays))
            return out

    def _result_length(self) -> int:
        return 1 if self.job.reduce else self.job.length

    def open(self, sealed: Sequence[Mapping[str, Any]]) -> Any:
        """A sum: this owner's result share. A dot product: e and f, sealed to the other owner."""
        with self._step("dealt", "done" if self.job.op == "sum" else "opened"):
            return self._open_all(sealed)

    def _open_all(self, sealed: Sequence[Mapping[str, Any]]) -> Any:
        n, dot = self.job.length, self.job.op == "dot"
        expected = set(self._others()) | ({0} if dot else set())
        if not isinstance(sealed, (list, tuple)) or len(sealed) != len(expected):
            raise JobRefused("the shares of every other party are needed, once each")
        for item in sealed:
            frm = item.get("from") if isinstance(item, Mapping) else None
            if frm not in expected or (frm in self._held and frm != 0) or (frm == 0 and self._triple):
                raise JobRefused("malformed or repeated shares")
            if frm == 0:
                self._triple = tuple(self._open(item, "triple", 3, [n, n, n])[1])
                continue
            extra = dot and frm == 1  # the first owner's r comes with its share
            sizes = [n, self._result_length()] if extra else [n]
            _, parts = self._open(item, "share", len(sizes), sizes)
            self._held[frm] = parts[0]
            if extra:
                self._mask = (np.zeros_like(parts[1]) - parts[1])  # the second owner subtracts r
        if not dot:
            total = ring.combine([self._held[k] for k in sorted(self._held)])
            self._held.clear()
            return _reduced(total, self.job.reduce)
        u, v, _w = self._triple
        e_k, f_k = self._held[1] - u, self._held[2] - v
        self._opened = (e_k, f_k)
        return [self._seal(self._others()[0], "open", [e_k, f_k])]

    def finish(self, sealed: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """A dot product: the other owner's e and f; this owner's share of the result."""
        with self._step("opened", "done"):
            n = self.job.length
            if not isinstance(sealed, (list, tuple)) or len(sealed) != 1:
                raise JobRefused("the other owner's opening is needed, once")
            _, (e_o, f_o) = self._open(sealed[0], "open", 2, [n, n])
            e, f = self._opened[0] + e_o, self._opened[1] + f_o
            u, v, w = self._triple
            z = w + e * v + f * u
            if self.index == 1:
                z += e * f
            self._held.clear()
            self._triple = ()
            out = _reduced(z, self.job.reduce)
            if self._mask is None or self._mask.shape != out.shape:
                raise JobRefused("the first owner's offset never arrived")
            return out + self._mask


def _reduced(values: np.ndarray, reduce: bool) -> np.ndarray:
    if not reduce:
        return values
    return np.array([values.sum(dtype=np.uint64)], dtype=np.uint64)  # (uint64 sums wrap: modulo 2^64)


def verify_adverts(job: Job, adverts: Sequence[Mapping[str, Any]]) -> Dict[int, _Peer]:
    """Every advert, checked: a signature over this job by the key whose fingerprint is at that position."""
    peers: Dict[int, _Peer] = {}
    if not isinstance(adverts, (list, tuple)):
        raise JobRefused("malformed key adverts")
    for ad in adverts:
        try:
            v, pub, box_key, sig = (ad[k] for k in ("index", "pub", "box", "sig"))
        except (KeyError, TypeError):
            raise JobRefused("malformed key advert") from None
        lowest = 0 if job.op == "dot" else 1
        if type(v) is not int or not lowest <= v <= job.parties or v in peers:
            raise JobRefused("a key advert for an unknown or repeated position")
        if not all(isinstance(b, bytes) and len(b) == 32 for b in (pub, box_key)) or not isinstance(sig, bytes):
            raise JobRefused("malformed key advert")
        expected = job.dealer if v == 0 else job.participants[v - 1]
        try:
            if identity_mod.fingerprint(pub) != expected:
                raise JobRefused(f"the key advert of party {v} is signed by a key that is not theirs")
            identity_mod.verify(pub, job.transcript("advert", v, box_key), sig)
        except JobRefused:
            raise
        except Exception:
            raise JobRefused(f"the key advert of party {v} does not verify: forged or altered") from None
        peers[v] = _Peer(v, box_key)
    if len({p.box_key for p in peers.values()}) != len(peers):
        raise JobRefused("two parties advertised the same key")
    return peers
