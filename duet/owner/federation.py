"""This owner's part in secure sums (duet.secagg): a contribution the scientist never sees alone.

A scientist running a secure sum across several owners asks each one, in order, through
`RequestKind.SECURE_SUM` round trips:

- `join`: who takes part (key fingerprints in order, this owner's position), the threshold, the
  vector's spec, and which object to contribute. The owner checks its own policy (`pin_federation`:
  the other owners it aggregates with, and how many at least), asks for approval like any release
  (a "secure_sum" request, by hand or by rule) unless the value is the scientist's own, snapshots
  the contribution, and answers with its signed key advert.
- `share`, `masked`, `consistency`, `unmask`: the steps of `duet.secagg.Participant`, whose checks
  refuse what could unmask this owner's vector.

What leaves this owner is the masked vector (uniform on its own) and shares of masks, never the
value; the scientist learns the sum of the owners that stayed, and only when at least the
threshold (and this owner's `min_owners`) did.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Sequence

import numpy as np
import torch

from ..errors import NotAllowed
from ..secagg import encoding
from ..secagg.participant import Participant, Round, RoundRefused

if TYPE_CHECKING:
    from .host import ScientistConnection

log = logging.getLogger("duet.owner")

MAX_ROUNDS = 16  # open rounds per scientist
ROUND_LIFETIME = 3600.0  # seconds a round may stay open


@dataclass(frozen=True)
class FederationPolicy:
    """Which secure sums this owner takes part in at all (beyond approving each one)."""

    pinned: Optional[FrozenSet[str]] = None  # the other owners' fingerprints it aggregates with; None: any
    min_owners: int = 2  # fewer owners than this (at any step) and the round ends, nothing revealed


def contribution_parts(value: Any, spec: encoding.Spec) -> List[np.ndarray]:
    """The owner's value as the spec's parts, by name: a tensor or number ("value"), a model's or a
    dict's entries (by key), a list's items ("0", "1", ...)."""
    module = isinstance(value, torch.nn.Module)
    if module:
        table: Dict[str, Any] = dict(value.state_dict())
    elif isinstance(value, dict):
        table = {str(k): v for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        table = {str(i): v for i, v in enumerate(value)}
    else:
        table = {"value": value}
    parts = []
    for seg in spec.segments:
        if seg.name not in table:
            raise NotAllowed(f"the contribution has no part {seg.name!r}")
        part = table[seg.name]
        if isinstance(part, torch.Tensor):
            arr = part.detach().cpu().numpy()
        elif isinstance(part, (np.ndarray, np.generic, int, float, bool)) and not isinstance(part, str):
            arr = np.asarray(part)
        else:
            raise NotAllowed(f"part {seg.name!r} of the contribution is not numbers")
        if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f") == seg.integer:
            raise NotAllowed(f"part {seg.name!r} is not of the agreed kind (integers or floats)")
        parts.append(arr)
    if len(table) != len(spec.segments) and not module:  # (a model may have entries the scientist does not sum)
        raise NotAllowed("the contribution has parts the spec does not list")
    return parts


class SecureSums:
    """One scientist's open secure-sum rounds on this owner."""

    def __init__(self, conn: "ScientistConnection") -> None:
        self.conn = conn
        self.rounds: "OrderedDict[bytes, tuple]" = OrderedDict()  # round id -> (participant, opened at)

    def handle(self, req_id: int, msg: Dict[str, Any]) -> None:
        step = msg.get("step")
        try:
            if step == "join":
                self.conn.session.reply(req_id, self._join(msg))
                return
            participant = self._round(msg.get("round"))
            try:
                reply: Any = None
                if step == "abort":
                    self.rounds.pop(participant.round.round_id, None)
                elif step == "share":
                    reply = participant.share_keys(_list_of_dicts(msg.get("adverts")))
                elif step == "masked":
                    reply = participant.masked_input(_list_of_dicts(msg.get("sealed"))).view(np.int64)
                elif step == "consistency":
                    reply = participant.consistency(msg.get("survivors"))  # type: ignore[arg-type]
                elif step == "unmask":
                    pairs = msg.get("signatures")
                    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and type(p[0]) is int
                                                              for p in pairs):
                        raise RoundRefused("malformed signatures")
                    shares = participant.unmask(msg.get("survivors"), {v: s for v, s in pairs})  # type: ignore[arg-type]
                    reply = [[v, kind, share] for v, (kind, share) in shares.items()]
                    self._audit(participant, "secure_sum_unmask", survivors=list(msg.get("survivors") or []))
                    self.rounds.pop(participant.round.round_id, None)
                else:
                    raise NotAllowed(f"unknown secure-sum step {step!r}")
            except RoundRefused:
                self.rounds.pop(participant.round.round_id, None)  # a refused round is over for this owner
                raise
            self.conn.session.reply(req_id, reply)
        except RoundRefused as exc:
            log.info("secure sum step %r refused: %s", step, exc)
            self.conn.session.reply(req_id, error=NotAllowed(f"secure sum: {exc}"))

    def _round(self, round_id: Any) -> Participant:
        entry = self.rounds.get(round_id) if isinstance(round_id, bytes) else None
        if entry is None:
            raise RoundRefused("no such open round (finished, refused or expired)")
        return entry[0]

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [rid for rid, (_p, opened) in self.rounds.items() if now - opened > ROUND_LIFETIME]:
            del self.rounds[rid]

    def _join(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        conn, owner = self.conn, self.conn.owner
        self._expire()
        if len(self.rounds) >= MAX_ROUNDS:
            raise RoundRefused(f"at most {MAX_ROUNDS} secure sums may be open at once")
        round_id, participants, index = msg.get("round"), msg.get("participants"), msg.get("index")
        threshold, weight = msg.get("threshold"), msg.get("weight", 1)
        if not isinstance(round_id, bytes) or round_id in self.rounds or not isinstance(participants, list) \
                or not all(isinstance(p, str) for p in participants) or type(index) is not int or type(threshold) is not int:
            raise RoundRefused("malformed secure-sum request")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            raise RoundRefused("weight must be a finite number > 0")
        try:
            spec = encoding.Spec.from_wire(msg.get("spec"))
        except ValueError as exc:
            raise RoundRefused(str(exc)) from None
        rnd = Round(round_id, tuple(participants), threshold, spec)
        rnd.check()
        policy = owner.federation
        others = set(participants) - {owner.fingerprint}
        if policy.pinned is not None and not others <= policy.pinned:
            raise RoundRefused("an owner taking part is not one this owner aggregates with (see pin_federation)")
        if len(participants) < policy.min_owners:
            raise RoundRefused(f"only {len(participants)} owners take part; this owner requires at least {policy.min_owners}")
        ids = msg.get("objs") if msg.get("objs") is not None else msg.get("obj")
        objs = [conn._object(i) for i in (ids if isinstance(ids, list) else [ids])]
        if not objs or len(objs) > 64:
            raise RoundRefused("a contribution is 1 to 64 objects")
        if not all(o.shape_public for o in objs):
            raise RoundRefused("the contribution's shape depends on private values")
        value = [o.value for o in objs] if isinstance(ids, list) else objs[0].value
        lineage = set().union(*(o.lineage for o in objs))
        ops: List[str] = []
        for o in objs:
            ops += [op for op in o.group.ops.labels() if op not in ops]
        epsilon = self._dp_epsilon(msg.get("dp"), objs)
        min_owners = policy.min_owners
        if lineage:
            reason = msg.get("reason") if isinstance(msg.get("reason"), str) else ""
            from ..text import clean

            req = conn.await_approval({
                "kind": "secure_sum", "lineage": tuple(sorted(lineage)), "ops": tuple(ops),
                "type_name": f"secure sum of {spec.length} numbers", "numel": spec.length, "nbytes": 8 * spec.length,
                "reason": clean(reason, newlines=True), "participants": tuple(participants), "threshold": threshold,
                "dp_epsilon": epsilon, "dp_mechanism": "each owner's own noise (discrete Laplace)" if epsilon else "",
            }, denied="the owner did not take part in this secure sum")
            if req.decided_rule is not None and req.decided_rule.min_owners:
                min_owners = max(min_owners, req.decided_rule.min_owners)
        if epsilon is not None:  # this owner's own noise: its value is protected even if the others collude
            noisy = self._noisy(objs, epsilon)
            value = noisy if isinstance(ids, list) else noisy[0]
        parts = contribution_parts(value, spec)  # a snapshot, taken after the approval
        if weight != 1:
            if any(seg.integer for seg in spec.segments) and not float(weight).is_integer():
                raise RoundRefused("integer parts cannot be weighted by a fraction")
            parts = [p * weight for p in parts]
        try:
            vector = encoding.encode(spec, parts)
        except ValueError as exc:
            raise RoundRefused(str(exc)) from None
        participant = Participant(owner.identity, rnd, index, vector, min_owners=min_owners)
        advert = participant.advertise()
        self.rounds[round_id] = (participant, time.monotonic())
        self._audit(participant, "secure_sum_join", assets=sorted(lineage), participants=list(participants),
                    threshold=threshold)
        return advert

    def _dp_epsilon(self, requested: Any, objs: List[Any]) -> Optional[float]:
        """A secure sum with dp=epsilon: every contribution must be an aggregate the owner can bound."""
        if requested is None:
            return None
        from .privacy import facts, mechanisms
        from .privacy.ledger import check_epsilon

        if isinstance(requested, bool) or not isinstance(requested, (int, float)):
            raise RoundRefused("dp takes epsilon, a number > 0")
        try:
            epsilon = check_epsilon(requested)
            for o in objs:
                if not isinstance(o.dp, facts.Aggregate):
                    raise RoundRefused(f"a contribution with dp= must be an aggregate with declared bounds "
                                       f"({facts.describe(o.dp, o.dp_why).get('why')})")
                facts.check_sources(o.dp, self.conn.owner.store)
                mechanisms.plan(o.dp, epsilon)
                facts.check_row_wise(o.dp.rows)
        except (ValueError, LookupError, mechanisms.Unreleasable, facts.Refused) as exc:
            raise RoundRefused(str(exc)) from None
        return epsilon

    def _noisy(self, objs: List[Any], epsilon: float) -> List[Any]:
        """Each contribution released with this owner's own noise, charged to the scientist's budget here
        (epsilon split evenly among the contributions), before anything leaves, masked or not."""
        from .privacy import mechanisms
        from .privacy.ledger import Spend

        requester = self.conn.requester
        assert requester is not None
        share = epsilon / len(objs)
        reservation = self.conn.owner.privacy.ledger.reserve(requester.fingerprint, Spend.laplace(epsilon),
                                                             f"secure sum with noise ({len(objs)} part(s))")
        reservation.commit()  # what is computed from here may leave, masked: charged now
        return [mechanisms.release(o.dp, mechanisms.plan(o.dp, share)) for o in objs]

    def _audit(self, participant: Participant, event: str, **fields: Any) -> None:
        req = self.conn.requester
        self.conn.owner.audit.append(event, round=participant.round.round_id.hex(), scientist=req.name if req else "",
                                     fingerprint=req.fingerprint if req else "", **fields)


def _list_of_dicts(value: Any) -> Sequence[Dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RoundRefused("malformed secure-sum message")
    return value
