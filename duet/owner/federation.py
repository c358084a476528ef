"""This owner's part in secure sums (duet.secagg): a contribution the scientist never sees alone.

A scientist running a secure sum across several owners asks each one, in order, through
`RequestKind.SECURE_SUM` round trips:

- `join`: who takes part (key fingerprints in order, this owner's position), the threshold, the
  vector's spec, and which object to contribute. The owner checks its own policy (`pin_federation`:
  the other owners it aggregates with, how many at least, and how many may collude with the
  scientist, which sets how high the threshold must be), the round id (never used before), the
  weight, the contribution's shapes and kinds and its memory budget, all from public facts; then
  asks for approval like any release (a "secure_sum" request, by hand or by rule) unless the value
  is the scientist's own, snapshots the contribution, and answers with its signed key advert.
  After approval nothing depends on the value: it always encodes (NaN as 0, infinities as +-clip).
- `share`, `masked`, `consistency`, `unmask`: the steps of `duet.secagg.Participant`, whose checks
  refuse what could unmask this owner's vector.

What leaves this owner is the masked vector (uniform on its own) and shares of masks, never the
value; the scientist learns the sum of the owners that stayed, and only when at least the
threshold (and this owner's `min_owners`) did. Each open round's snapshot (8 bytes a number) counts
against the scientist's memory budget until the round ends, is aborted or expires.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Deque, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import NotAllowed
from ..secagg import encoding
from ..secagg.participant import Participant, Round, RoundRefused, admit, default_colluders

if TYPE_CHECKING:
    from .host import ScientistConnection

log = logging.getLogger("duet.owner")

MAX_ROUNDS = 16  # open rounds per scientist
ROUND_LIFETIME = 3600.0  # seconds a round may stay open
ROUND_IDS_KEPT = 2 * ROUND_LIFETIME  # seconds a used round id is remembered (longer than any round lives)
ROUND_IDS_PER_SCIENTIST = 10_000  # round ids one scientist may use with one owner in that time


@dataclass(frozen=True)
class FederationPolicy:
    """Which secure sums this owner takes part in at all (beyond approving each one)."""

    pinned: Optional[FrozenSet[str]] = None  # the other owners' fingerprints it aggregates with; None: any
    min_owners: int = 2  # fewer owners than this (at any step) and the round ends, nothing revealed
    max_colluders: Optional[int] = None  # owners that may collude with the scientist; None: fewer than a third
    # Exact sums (no dp=): the scientist chooses what every owner contributes (a zero, or a value it
    # knows, or a weight that drowns the others), so an exact sum can be one owner's value. Only
    # with dp= is each contribution protected whatever the others are. Exact sums are opt-in.
    exact: bool = False

    def __post_init__(self) -> None:
        if self.max_colluders is not None and (type(self.max_colluders) is not int or self.max_colluders < 0):
            raise ValueError("max_colluders must be an int >= 0 (or None: fewer than a third of a round's owners)")

    def colluders(self, owners: int) -> int:
        """How many of a round's owners this owner assumes may collude with the scientist."""
        return default_colluders(owners) if self.max_colluders is None else self.max_colluders


class RoundIds:
    """Round ids this owner process took part in, so a round id runs once: a scientist reusing one
    (to count a survivor list's signatures from an earlier run) is refused at join.

    Ids are remembered as hashes with the owner's key, for `keep` seconds (longer than a round can
    live), at most `per_scientist` per scientist key and owner in that time: one that asks for
    more is refused until its old ids age out, and can block no one else."""

    def __init__(self, keep: float = ROUND_IDS_KEPT, per_scientist: int = ROUND_IDS_PER_SCIENTIST) -> None:
        self.keep = keep
        self.per_scientist = per_scientist
        self._lock = threading.Lock()
        self._seen: Dict[bytes, float] = {}
        self._by: Dict[Tuple[str, str], Deque[Tuple[float, bytes]]] = {}

    def claim(self, owner: str, scientist: str, round_id: bytes, now: Optional[float] = None) -> None:
        """RoundRefused if `owner` saw `round_id` within `keep` seconds, or `scientist` used too many."""
        key = hashlib.sha256(owner.encode() + b"\0" + round_id).digest()
        with self._lock:
            now = time.monotonic() if now is None else now
            self._age_out(now)
            if key in self._seen:
                raise RoundRefused("this round id was used before: a round runs once")
            used = self._by.setdefault((owner, scientist), deque())
            if len(used) >= self.per_scientist:
                raise RoundRefused(f"at most {self.per_scientist} secure sums per {self.keep / 3600:g} hours")
            self._seen[key] = now
            used.append((now, key))

    def __len__(self) -> int:
        return len(self._seen)

    def _age_out(self, now: float) -> None:
        for who in list(self._by):
            used = self._by[who]
            while used and now - used[0][0] > self.keep:
                self._seen.pop(used.popleft()[1], None)
            if not used:
                del self._by[who]


ROUND_IDS = RoundIds()  # this owner process's, for all its owners (each id hashed with the owner's key)


@dataclass
class _Open:
    """An open round: this owner's participant, when it opened, and the bytes it holds."""

    participant: Participant
    opened: float
    nbytes: int


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
            part = part.detach().cpu().resolve_conj().resolve_neg()
            arr = (part.double() if part.dtype in (torch.bfloat16, torch.float16) else part).numpy()
        elif isinstance(part, int) and not isinstance(part, bool):  # (a Python int: any size; saturate, never fail)
            arr = np.asarray(min(max(part, -2**63), 2**63 - 1), dtype=np.int64)
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

    def __init__(self, conn: "ScientistConnection", round_ids: RoundIds = ROUND_IDS) -> None:
        self.conn = conn
        self.round_ids = round_ids
        self.rounds: "OrderedDict[bytes, _Open]" = OrderedDict()  # round id -> its open round

    def handle(self, req_id: int, msg: Dict[str, Any]) -> None:
        step = msg.get("step")
        try:
            self.expire()
            if step == "join":
                self.conn.session.reply(req_id, self._join(msg))
                return
            participant = self._round(msg.get("round"))
            rid = participant.round.round_id
            try:
                reply = self._step(step, participant, msg)
            except Exception:
                self.close(rid)  # a refused or failed step ends the round for this owner
                raise
            self.conn.session.reply(req_id, reply)
        except RoundRefused as exc:
            log.info("secure sum step %r refused: %s", step, exc)
            self.conn.session.reply(req_id, error=NotAllowed(f"secure sum: {exc}"))

    def _step(self, step: Any, participant: Participant, msg: Dict[str, Any]) -> Any:
        """One step after joining; what goes back to the scientist."""
        rid = participant.round.round_id
        if step == "abort":
            self.close(rid)
            return None
        if step == "share":
            return participant.share_keys(_list_of_dicts(msg.get("adverts")))
        if step == "masked":
            return participant.masked_input(_list_of_dicts(msg.get("sealed"))).view(np.int64)
        if step == "consistency":
            return participant.consistency(msg.get("survivors"))  # type: ignore[arg-type]
        if step == "unmask":
            pairs = msg.get("signatures")
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and type(p[0]) is int
                                                      for p in pairs):
                raise RoundRefused("malformed signatures")
            shares = participant.unmask(msg.get("survivors"), {v: s for v, s in pairs})  # type: ignore[arg-type]
            self._audit(participant, "secure_sum_unmask", survivors=list(msg.get("survivors") or []))
            self.close(rid)
            return [[v, kind, share] for v, (kind, share) in shares.items()]
        raise NotAllowed(f"unknown secure-sum step {step!r}")

    def _round(self, round_id: Any) -> Participant:
        entry = self.rounds.get(round_id) if isinstance(round_id, bytes) else None
        if entry is None:
            raise RoundRefused("no such open round (finished, refused or expired)")
        return entry.participant

    def close(self, round_id: bytes) -> None:
        """The round is over for this owner: forget it and give its bytes back to the budget."""
        entry = self.rounds.pop(round_id, None)
        if entry is not None:
            self.conn.objects.hold(-entry.nbytes)

    def expire(self, now: Optional[float] = None) -> None:
        """Close rounds open longer than ROUND_LIFETIME (checked at every step)."""
        now = time.monotonic() if now is None else now
        for rid in [rid for rid, entry in self.rounds.items() if now - entry.opened > ROUND_LIFETIME]:
            self.close(rid)

    def _join(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        """Every check from public facts first (policy, round id, weight, shapes, budget), then the
        approval, then the snapshot: nothing after the approval fails or differs because of a value."""
        conn, owner = self.conn, self.conn.owner
        if len(self.rounds) >= MAX_ROUNDS:
            raise RoundRefused(f"at most {MAX_ROUNDS} secure sums may be open at once")
        round_id, participants, index, threshold = msg.get("round"), msg.get("participants"), msg.get("index"), msg.get("threshold")
        if not isinstance(round_id, bytes) or round_id in self.rounds or not isinstance(participants, list) \
                or not all(isinstance(p, str) for p in participants) or type(index) is not int or type(threshold) is not int:
            raise RoundRefused("malformed secure-sum request")
        weights = msg.get("weights")
        if not isinstance(weights, list) or len(weights) != len(participants) or not 1 <= index <= len(weights):
            raise RoundRefused("a secure sum names every owner's weight (weights: one per owner)")
        try:
            spec = encoding.Spec.from_wire(msg.get("spec"))
            weights = [encoding.check_weight(spec, w) for w in weights]
        except ValueError as exc:
            raise RoundRefused(str(exc)) from None
        weight = weights[index - 1]
        requested_dp = msg.get("dp")
        policy = owner.federation
        if requested_dp is None and not policy.exact:
            raise RoundRefused("this owner takes part in secure sums only with dp= (each contribution noised here): "
                               "in an exact sum the scientist chooses what every other owner contributes, so the "
                               "sum can be this owner's value alone (pin_federation(..., exact=True) allows it)")
        rnd = Round(round_id, tuple(participants), threshold, spec, tuple(weights),
                    float(requested_dp) if isinstance(requested_dp, (int, float)) and not isinstance(requested_dp, bool) else None)
        rnd.check()
        if policy.pinned is not None and not set(participants) - {owner.fingerprint} <= policy.pinned:
            raise RoundRefused("an owner taking part is not one this owner aggregates with (see pin_federation)")
        admit(rnd, owner.fingerprint, index, policy.min_owners, policy.colluders(len(participants)))
        ids = msg.get("objs") if msg.get("objs") is not None else msg.get("obj")
        objs = [conn._object(i) for i in (ids if isinstance(ids, list) else [ids])]
        if not objs or len(objs) > 64:
            raise RoundRefused("a contribution is 1 to 64 objects")
        if not all(o.shape_public for o in objs):
            raise RoundRefused("the contribution's shape depends on private values")
        value = [o.value for o in objs] if isinstance(ids, list) else objs[0].value
        try:
            encoding.check_parts(spec, contribution_parts(value, spec))  # metadata only, before approval
        except ValueError as exc:
            raise RoundRefused(str(exc)) from None
        epsilon = self._dp_epsilon(requested_dp, objs)
        requester = conn.requester.fingerprint if conn.requester is not None else ""
        self.round_ids.claim(owner.fingerprint, requester, round_id)
        nbytes = 8 * spec.length  # the encoded snapshot this round holds until it ends
        conn.objects.check_room(nbytes)
        conn.objects.hold(nbytes)
        try:
            participant = self._contribute(rnd, index, ids, objs, value, weight, epsilon, policy, msg)
            advert = participant.advertise()
        except BaseException:
            conn.objects.hold(-nbytes)
            raise
        self.rounds[round_id] = _Open(participant, time.monotonic(), nbytes)
        self._audit(participant, "secure_sum_join", assets=sorted(set().union(*(o.lineage for o in objs))),
                    participants=list(participants), threshold=threshold, weights=list(rnd.weights), dp_epsilon=epsilon)
        return advert

    def _contribute(self, rnd: Round, index: int, ids: Any, objs: List[Any], value: Any, weight: float,
                    epsilon: Optional[float], policy: FederationPolicy, msg: Dict[str, Any]) -> Participant:
        """Approval (unless the value is the scientist's own), then the snapshot, encoded whatever it holds."""
        conn, spec = self.conn, rnd.spec
        lineage = set().union(*(o.lineage for o in objs))
        ops: List[str] = []
        for o in objs:
            ops += [op for op in o.group.ops.labels() if op not in ops]
        min_owners = policy.min_owners
        if lineage:
            reason = msg.get("reason") if isinstance(msg.get("reason"), str) else ""
            from ..text import clean

            req = conn.await_approval({
                "kind": "secure_sum", "lineage": tuple(sorted(lineage)), "ops": tuple(ops),
                "type_name": f"secure sum of {spec.length} numbers", "numel": spec.length, "nbytes": 8 * spec.length,
                "reason": clean(reason, newlines=True), "participants": rnd.participants, "threshold": rnd.threshold,
                "weights": rnd.weights,
                "dp_epsilon": epsilon, "dp_mechanism": "each owner's own noise (discrete Laplace)" if epsilon else "",
            }, denied="the owner did not take part in this secure sum")
            if req.decided_rule is not None and req.decided_rule.min_owners:
                min_owners = max(min_owners, req.decided_rule.min_owners)
        if epsilon is not None:  # this owner's own noise: its value is protected even if the others collude
            noisy = self._noisy(objs, epsilon)
            value = noisy if isinstance(ids, list) else noisy[0]
        try:  # a snapshot, taken after the approval; only a change of public metadata meanwhile can fail here
            vector = encoding.encode(spec, contribution_parts(value, spec), weight)
        except ValueError as exc:
            raise RoundRefused(str(exc)) from None
        return Participant(conn.owner.identity, rnd, index, vector, min_owners=min_owners,
                           max_colluders=policy.colluders(len(rnd.participants)))

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
