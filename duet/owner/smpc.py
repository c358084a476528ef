"""This owner's part in secret-shared computations (duet.sharing): a vector of its own is split
into shares that go, sealed, to other owners, and only the result reaches the scientist.

A scientist running `duet.smpc.dot(xa, xb)` (or a sum, a mean, a correlation) asks each owner,
through `RequestKind.SMPC` round trips with a "step":

- `describe`: the owner signs what its vector is (the assets it derives from, the operations),
  from public facts, so the other owners see it in their approval.
- `join`: the terms (operation, the owners' fingerprints and descriptions, the dealer, the
  length, the fixed-point step, each owner's bound). The owner takes part only after
  `pin_federation(exact=True)`: a result is an exact value of a function the scientist chooses,
  and the other operand is whatever the scientist had the other owner compute (its signed
  description shows how) from keys the scientist names (`peers=[...]` pins them; an unpinned key
  could be the scientist's own, and then so are its "data", the dealer's triples included). It
  checks that policy, refuses a computation where another owner's vector is the scientist's own
  values (a one-hot vector would make a dot product one entry), then asks for approval like any
  release (a "smpc" request, by hand or by rule, showing every operation the other owner signed
  and which keys are not pinned) unless the vector is the scientist's own, and snapshots it,
  encoded whatever it holds (clipped to the bound, NaN as 0). The dealer (`"role": "dealer"`)
  holds no data: it joins without approval, and its part is audited.
- `deal`, `open`, `finish`, `abort`: the steps of `duet.sharing.party`.

What leaves this owner: shares and openings sealed to other owners (uniform on their own), and its
share of the result (uniform on its own; the scientist adds the owners' shares to get the result).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import numpy as np
import torch

from ..errors import NotAllowed
from ..sharing import ring
from ..sharing.party import Dealer, Job, JobRefused, Party, describe_message

if TYPE_CHECKING:
    from .host import ScientistConnection

log = logging.getLogger("duet.owner")

MAX_JOBS = 16  # open computations per scientist
JOB_LIFETIME = 3600.0  # seconds a computation may stay open
WORDS_HELD = 6  # uint64 words per number a party holds at most (its shares, a triple, openings)
MAX_DESCRIBED = 200  # assets and distinct operations a description carries (all of them, or refused)

OP_TEXT = {"dot": "a dot product of this vector with another owner's", "sum": "a sum of this vector with other owners'"}


@dataclass
class _Open:
    party: Union[Party, Dealer]
    opened: float
    nbytes: int


def vector_of(value: Any) -> np.ndarray:
    """The numbers of a tensor or array, flattened, as float64 (what gets encoded)."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.layout != torch.strided:
            raise NotAllowed("a shared computation takes real, dense numbers")
        return value.detach().cpu().resolve_neg().to(torch.float64).reshape(-1).numpy()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value.astype(np.float64).reshape(-1)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return np.array([float(value)])
    raise NotAllowed("a shared computation takes a tensor, an array or a number")


class SharedComputations:
    """One scientist's open secret-shared computations on this owner."""

    def __init__(self, conn: "ScientistConnection") -> None:
        self.conn = conn
        self.jobs: "OrderedDict[bytes, _Open]" = OrderedDict()
        self.used: "OrderedDict[bytes, None]" = OrderedDict()  # job ids this connection has joined (each runs once)

    def handle(self, req_id: int, msg: Dict[str, Any]) -> None:
        step = msg.get("step")
        try:
            self.expire()
            if step == "describe":
                reply: Any = self._describe(msg)
            elif step == "join":
                reply = self._join(msg)
            else:
                job_id = msg.get("job")
                entry = self.jobs.get(job_id) if isinstance(job_id, bytes) else None
                if entry is None:
                    raise JobRefused("no such open computation (finished, refused or expired)")
                try:
                    reply = self._step(step, entry.party, msg)
                except Exception:
                    self.close(entry.party.job.job_id)
                    raise
            self.conn.session.reply(req_id, reply)
        except JobRefused as exc:
            log.info("shared computation step %r refused: %s", step, exc)
            self.conn.session.reply(req_id, error=NotAllowed(f"shared computation: {exc}"))

    def _step(self, step: Any, party: Union[Party, Dealer], msg: Dict[str, Any]) -> Any:
        job_id = party.job.job_id
        if step == "abort":
            self.close(job_id)
            return None
        if step == "deal":
            out = party.deal(_list_of_dicts(msg.get("adverts")))
            if isinstance(party, Dealer):
                self._audit(party, "smpc_dealt")
                self.close(job_id)
            return out
        if not isinstance(party, Party):
            raise JobRefused(f"the dealer has no step {step!r}")
        if step == "open":
            out = party.open(_list_of_dicts(msg.get("sealed")))
            if party.job.op == "sum":
                return self._result(party, out)
            return out
        if step == "finish":
            return self._result(party, party.finish(_list_of_dicts(msg.get("sealed"))))
        raise NotAllowed(f"unknown shared-computation step {step!r}")

    def _result(self, party: Party, share: np.ndarray) -> np.ndarray:
        self._audit(party, "smpc_result")
        self.close(party.job.job_id)
        return share.view(np.int64)

    def close(self, job_id: bytes) -> None:
        entry = self.jobs.pop(job_id, None)
        if entry is not None:
            self.conn.objects.hold(-entry.nbytes)

    def expire(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        for job_id in [j for j, e in self.jobs.items() if now - e.opened > JOB_LIFETIME]:
            self.close(job_id)

    # -- describe and join ------------------------------------------------------------------
    def _operand(self, msg: Dict[str, Any]) -> Any:
        obj = self.conn._object(msg.get("obj"))
        if not obj.shape_public:
            raise JobRefused("the vector's shape depends on private values")
        return obj

    def _describe(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        job_id, op, index = msg.get("job"), msg.get("op"), msg.get("index")
        if not isinstance(job_id, bytes) or not isinstance(op, str) or type(index) is not int:
            raise JobRefused("malformed request")
        obj = self._operand(msg)
        length = int(vector_of_meta(obj.value))
        lineage, ops = sorted(obj.lineage), list(obj.group.ops.labels())
        if len(lineage) + len(ops) > MAX_DESCRIBED:
            raise JobRefused(f"a vector of more than {MAX_DESCRIBED} assets and distinct operations cannot be "
                             "described in full to the other owners")
        identity = self.conn.owner.identity
        return {"index": index, "pub": identity.public_key, "lineage": lineage, "ops": ops, "length": length,
                "sig": identity.sign(describe_message(job_id, op, index, lineage, ops))}

    def _join(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        conn, owner = self.conn, self.conn.owner
        if len(self.jobs) >= MAX_JOBS:
            raise JobRefused(f"at most {MAX_JOBS} shared computations may be open at once")
        job = Job.from_wire(msg.get("terms"))  # checks the terms and every owner's signed description
        if job.job_id in self.used or job.job_id in self.jobs:
            raise JobRefused("this computation was joined before: a computation runs once")
        policy = owner.federation
        others = set(job.participants) - {owner.fingerprint} | ({job.dealer} if job.dealer else set())
        if policy.pinned is not None and not others <= policy.pinned:
            raise JobRefused("an owner or the dealer is not one this owner computes with (see pin_federation)")
        nbytes = 8 * (job.parties + WORDS_HELD) * job.length  # a share from every owner, a triple, openings
        if msg.get("role") == "dealer":
            dealer = Dealer(owner.identity, job)
            conn.objects.check_room(nbytes)
            conn.objects.hold(nbytes)
            self._remember(job, dealer, nbytes)
            self._audit(dealer, "smpc_dealer_join", op=job.op, participants=list(job.participants), length=job.length)
            return dealer.advertise()
        if not policy.exact:
            raise JobRefused("this owner takes part in shared computations only after pin_federation(exact=True): "
                             "their results are exact values of a function the scientist chooses, with operands "
                             "the scientist names (pin the other owners and dealers too: peers=[...])")
        index = msg.get("index")
        if type(index) is not int or not 1 <= index <= job.parties or job.participants[index - 1] != owner.fingerprint:
            raise JobRefused("this owner is not the party at that position")
        obj = self._operand(msg)
        mine = job.descriptions[[d.index for d in job.descriptions].index(index)]
        if vector_of_meta(obj.value) != job.length or tuple(sorted(obj.lineage)) != mine.lineage \
                or tuple(obj.group.ops.labels()) != mine.ops:
            raise JobRefused("the vector is not the one this owner described")
        if any(not d.lineage for d in job.descriptions if d.index != index):
            raise JobRefused("another owner's vector is the scientist's own values, so the result could be any "
                             "function of this owner's vector the scientist chose")
        conn.objects.check_room(nbytes)
        if obj.lineage:
            self._approve(job, index, obj, msg)
        try:  # a snapshot, after the approval; encoding never fails whatever the values are
            vector = ring.encode(vector_of(obj.value), job.frac_bits, job.bounds[index - 1])
        except NotAllowed as exc:
            raise JobRefused(str(exc)) from None
        conn.objects.hold(nbytes)
        party = Party(owner.identity, job, index, vector)
        self._remember(job, party, nbytes)
        self._audit(party, "smpc_join", op=job.op, assets=sorted(obj.lineage), participants=list(job.participants),
                    dealer=job.dealer, length=job.length, bound=job.bounds[index - 1])
        return party.advertise()

    def _approve(self, job: Job, index: int, obj: Any, msg: Dict[str, Any]) -> None:
        from ..text import clean

        reason = msg.get("reason") if isinstance(msg.get("reason"), str) else ""
        pinned = self.conn.owner.federation.pinned

        def known(fingerprint: str) -> str:
            return "" if pinned is not None and fingerprint in pinned else " [a key you have not pinned: anyone may hold it]"

        # Every operation the other owner signed (the last 50 distinct ones), cleaned: the scientist
        # wrote them through that owner, and they tell whether the vector is still that owner's data.
        others = [clean(f"owner {d.index}{known(job.participants[d.index - 1])}: {', '.join(d.lineage)}"
                        + (f" after {', '.join(d.ops)}" if d.ops else ""), limit=8000)
                  for d in job.descriptions if d.index != index]
        if job.dealer:
            others.append(clean(f"dealer{known(job.dealer)}"))
        parties = [p for p in job.participants if p != self.conn.owner.fingerprint] + ([job.dealer] if job.dealer else [])
        unpinned = tuple(p for p in parties if pinned is None or p not in pinned)
        numel = job.length if unpinned or not job.reduce else 1  # (with a key it holds, the scientist reads it all)
        what = OP_TEXT[job.op] + (" (elementwise)" if not job.reduce else "")
        self.conn.await_approval({
            "kind": "smpc", "lineage": tuple(sorted(obj.lineage)), "ops": tuple(obj.group.ops.labels()),
            "type_name": f"{what}: {job.length} numbers, each clipped to ±{job.bounds[index - 1]:g}",
            "numel": numel, "nbytes": 8 * numel,
            "reason": clean(reason, newlines=True), "participants": job.participants, "dealer": job.dealer,
            "computed_with": tuple(others), "unpinned": unpinned,
        }, denied="the owner did not take part in this shared computation")

    def _remember(self, job: Job, party: Union[Party, Dealer], nbytes: int) -> None:
        self.used[job.job_id] = None
        while len(self.used) > 10_000:
            self.used.popitem(last=False)
        self.jobs[job.job_id] = _Open(party, time.monotonic(), nbytes)

    def _audit(self, party: Union[Party, Dealer], event: str, **fields: Any) -> None:
        req = self.conn.requester
        self.conn.owner.audit.append(event, job=party.job.job_id.hex(), scientist=req.name if req else "",
                                     fingerprint=req.fingerprint if req else "", **fields)


def vector_of_meta(value: Any) -> int:
    """How many numbers a value holds, from its shape only."""
    if isinstance(value, torch.Tensor):
        return int(value.numel())
    if isinstance(value, np.ndarray):
        return int(value.size)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 1
    raise JobRefused("a shared computation takes a tensor, an array or a number")


def _list_of_dicts(value: Any) -> List[Dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise JobRefused("malformed shared-computation message")
    return value
