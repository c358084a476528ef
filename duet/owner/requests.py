"""The permission queue: what a scientist asks for, and the owner's decisions.

Requests are decided by the owner (in code, or by clicking in the panel), by an
owner-made rule, or by expiry. Rules match only on facts the owner controls:
kind, the asset names in the lineage, size, and the requester's key
fingerprint; never on names or reasons the scientist wrote.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..protocol import Status
from ..tables import html_table, human_bytes, text_table
from .audit import AuditLog
from .opchain import describe_ops

KINDS = ("join", "release", "compute", "secure_sum", "smpc")
PENDING, ACCEPTED, DENIED, EXPIRED, CANCELLED = Status.PENDING, Status.ACCEPTED, Status.DENIED, Status.EXPIRED, Status.CANCELLED


@dataclass(frozen=True)
class Requester:
    """Who asks: the scientist's self-chosen name (untrusted) and key fingerprint (verified)."""

    name: str
    fingerprint: str


@dataclass
class Request:
    """One decision the owner has to make."""

    id: int
    kind: str
    requester: Requester
    lineage: Tuple[str, ...] = ()
    ops: Tuple[str, ...] = ()
    type_name: str = ""
    shape: Optional[Tuple[int, ...]] = None
    dtype: Optional[str] = None
    numel: Optional[int] = None
    nbytes: Optional[int] = None
    reason: str = ""
    created: float = field(default_factory=time.time)
    expires: Optional[float] = None
    status: str = PENDING
    decided_by: str = ""
    deny_reason: str = ""
    amendments: int = 0  # new reasons the scientist gave while it waited (at most MAX_AMENDMENTS)
    decided_at: Optional[float] = None
    # A differentially private release: its epsilon and mechanism (None for an exact value), and
    # once sent, what the scientist is told of the charge.
    dp_epsilon: Optional[float] = None
    dp_mechanism: str = ""
    dp_charge: Optional[Dict[str, Any]] = field(default=None, repr=False)
    # A contribution to a secure sum: the other owners taking part (key fingerprints, in order) and
    # how many must stay for the sum to be unmasked.
    participants: Tuple[str, ...] = ()
    threshold: Optional[int] = None
    weights: Tuple[float, ...] = ()  # every owner's weight, in the participants' order (signed into the round)
    # A share in a secret-shared computation (kind "smpc"): the dealer's fingerprint and what each
    # other owner signed its vector is (assets and operations).
    dealer: str = ""
    computed_with: Tuple[str, ...] = ()
    # Keys of the other parties this owner has not pinned: one may be the scientist's own, which
    # would then read this owner's vector from its shares. No rule decides such a request.
    unpinned: Tuple[str, ...] = ()
    decided_rule: Optional["Rule"] = field(default=None, repr=False)  # the rule that decided it, if one did
    value: Any = field(default=None, repr=False)
    _queue: Optional["RequestQueue"] = field(default=None, repr=False)
    _on_decided: Optional[Callable[["Request"], None]] = field(default=None, repr=False)

    @property
    def pending(self) -> bool:
        return self.status == PENDING

    def accept(self) -> None:
        """Approve: for a release, the value goes to the scientist now."""
        self._require_queue().decide(self, ACCEPTED, by="owner")

    def deny(self, reason: str = "") -> None:
        """Refuse, with a reason the scientist will read."""
        self._require_queue().decide(self, DENIED, by="owner", reason=reason)

    def preview(self) -> Any:
        """The owner's own look at what would be released (never sent)."""
        return self.value

    def _require_queue(self) -> "RequestQueue":
        if self._queue is None:
            raise RuntimeError("this request is not in a queue")
        return self._queue

    def summary(self) -> Dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "scientist": self.requester.name,
            "fingerprint": self.requester.fingerprint,
            "assets": list(self.lineage),
            "ops": list(self.ops),
            "type": self.type_name,
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": self.dtype,
            "numel": self.numel,
            "nbytes": self.nbytes,
            "reason": self.reason,
            **({"dp_epsilon": self.dp_epsilon} if self.dp_epsilon is not None else {}),
            **({"participants": list(self.participants), "threshold": self.threshold, "weights": list(self.weights)}
               if self.participants else {}),
            **({"dealer": self.dealer, "computed_with": list(self.computed_with)} if self.kind == "smpc" else {}),
        }

    def _row(self) -> List[Any]:
        shape = "×".join(str(s) for s in self.shape) if self.shape is not None else ""
        return [
            self.id,
            self.kind + (f" (DP, ε {self.dp_epsilon:g})" if self.dp_epsilon is not None else ""),
            f"{self.requester.name} ({self.requester.fingerprint[:19]})",
            ", ".join(self.lineage),
            describe_ops(self.ops, width=120),
            " ".join(x for x in (self.type_name, shape, self.dtype or "", human_bytes(self.nbytes)) if x),
            f"“{self.reason}” (their words)" if self.reason else "",
            self.status + (f" by {self.decided_by}" if self.decided_by and self.decided_by != "owner" else ""),
        ]

    def __repr__(self) -> str:
        return text_table(REQUEST_HEADERS, [self._row()], title=f"Request #{self.id}")

    def _repr_html_(self) -> str:
        return html_table(REQUEST_HEADERS, [self._row()], title=f"Request #{self.id}")


MAX_AMENDMENTS = 10  # each is audited and redrawn: a scientist cannot grow the log or busy the view at will
REQUEST_HEADERS = ["id", "kind", "who", "assets", "operations", "what", "reason", "status"]


@dataclass
class Rule:
    """An owner-made auto-decision. Every given condition must hold; omitted ones match anything."""

    action: str
    kinds: Tuple[str, ...] = ("release",)
    datasets: Optional[Tuple[str, ...]] = None
    max_elements: Optional[int] = None
    scientist: Optional[str] = None
    reason: str = ""
    dp: Optional[bool] = None  # True: differentially private releases only; False: exact ones only
    min_owners: Optional[int] = None  # secure sums: at least this many owners take part
    peers: Optional[Tuple[str, ...]] = None  # secure sums: every other owner is one of these fingerprints

    def matches(self, req: Request) -> bool:
        if req.kind not in self.kinds or req.unpinned:
            return False
        if self.dp is not None and (req.dp_epsilon is not None) != self.dp:
            return False
        if self.min_owners is not None and (req.kind not in ("secure_sum", "smpc") or len(req.participants) < self.min_owners):
            return False
        if self.peers is not None and (req.kind not in ("secure_sum", "smpc")
                                       or not set(req.participants) | ({req.dealer} if req.dealer else set()) <= set(self.peers)):
            return False
        if self.datasets is not None and not set(req.lineage) <= set(self.datasets):
            return False
        if self.max_elements is not None and (req.numel is None or req.numel > self.max_elements):
            return False
        if self.scientist is not None and req.requester.fingerprint != self.scientist:
            return False
        return True

    def describe(self) -> str:
        parts = [f"{self.action} {'/'.join(self.kinds)}"]
        if self.dp is not None:
            parts.append("with dp= (within the scientist's budget)" if self.dp else "without dp=")
        if self.min_owners is not None:
            parts.append(f"with at least {self.min_owners} owners")
        if self.peers is not None:
            parts.append(f"among {len(self.peers)} known owners")
        if self.datasets is not None:
            parts.append(f"of {', '.join(self.datasets) or 'no assets'} only")
        if self.max_elements is not None:
            parts.append(f"up to {self.max_elements} elements")
        if self.scientist is not None:
            parts.append(f"from {self.scientist}")
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"<Rule: {self.describe()}>"


class RequestQueue:
    """Pending requests, decided ones, and the owner's rules. Safe to use from any thread."""

    def __init__(self, audit: AuditLog, default_expiry: Optional[float] = 24 * 3600,
                 clock: Callable[[], float] = time.time) -> None:
        self.audit = audit
        self.default_expiry = default_expiry
        # Wall-clock seconds for created, expires and decided_at, and what expire_due() compares
        # them with; injectable so expiry can be tested without waiting.
        self.clock = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._requests: Dict[int, Request] = {}
        self._rules: List[Rule] = []
        self._next_id = 1
        self._listeners: List[Callable[[], None]] = []
        self.own_fingerprint = ""  # the owner's key: a secure-sum rule's peers always include it

    # -- creation and decision -------------------------------------------------
    def submit(self, req_fields: Dict[str, Any], on_decided: Callable[[Request], None]) -> Request:
        """Queue a new request; an owner rule may decide it at once."""
        with self._lock:
            req = Request(id=self._next_id, **{"created": self.clock(), **req_fields})
            self._next_id += 1
            if req.expires is None and self.default_expiry is not None:
                req.expires = req.created + self.default_expiry
            req._queue = self
            req._on_decided = on_decided
            self._requests[req.id] = req
            rule = next((r for r in self._rules if r.matches(req)), None)
        self.audit.append("request", **req.summary())
        if rule is not None:
            status = ACCEPTED if rule.action == "accept" else DENIED
            req.decided_rule = rule
            self.decide(req, status, by=f"rule: {rule.describe()}", reason=rule.reason)
        else:
            self._notify()
        return req

    def decide(self, req: Request, status: str, by: str, reason: str = "") -> None:
        """A request's one transition: pending -> accepted, denied, expired or cancelled, once."""
        if status not in Status.DECIDED:
            raise ValueError(f"a request can be decided as {', '.join(Status.DECIDED)}, not {status!r}")
        with self._lock:
            if req.status != PENDING:
                raise ValueError(f"request #{req.id} was already {req.status}")
            req.status = status
            req.decided_by = by
            req.deny_reason = str(reason) if status != ACCEPTED else ""
            req.decided_at = self.clock()
            self._changed.notify_all()
        self.audit.append(
            "decision", request=req.id, kind=req.kind, decision=status, by=by, reason=req.deny_reason,
            scientist=req.requester.name, fingerprint=req.requester.fingerprint, assets=list(req.lineage),
        )
        callback = req._on_decided
        if callback is not None:
            callback(req)
        if status != ACCEPTED:
            req.value = None
        self._notify()

    def amend_reason(self, req: Request, reason: str) -> None:
        """The scientist asked again with a new reason while the request waits: show the new one."""
        with self._lock:
            if req.status != PENDING or req.reason == reason or req.amendments >= MAX_AMENDMENTS:
                return
            old, req.reason = req.reason, reason
            req.amendments += 1
        self.audit.append("reason", request=req.id, before=old, after=reason, fingerprint=req.requester.fingerprint)
        self._notify()

    def expire_due(self, now: Optional[float] = None) -> int:
        """Deny requests past their expiry; returns how many."""
        now = self.clock() if now is None else now
        due = [r for r in self.pending if r.expires is not None and r.expires <= now]
        for req in due:
            try:
                self.decide(req, EXPIRED, by="expiry", reason="the request expired before the owner decided")
            except ValueError:
                pass
        return len(due)

    # -- rules -----------------------------------------------------------------
    def add_handler(
        self,
        action: str = "accept",
        datasets: Optional[Sequence[str]] = None,
        kind: str | Sequence[str] = "release",
        max_elements: Optional[int] = None,
        scientist: Optional[str] = None,
        reason: str = "",
        dp: Optional[bool] = None,
        secure_sum: bool = False,
        min_owners: Optional[int] = None,
        peers: Optional[Sequence[str]] = None,
    ) -> Rule:
        """Decide future (and pending) requests automatically.

        `datasets`: every asset in the request's lineage must be one of these.
        `scientist`: a key fingerprint, as shown in the queue.
        `dp`: True matches only differentially private releases (`.get(dp=epsilon)`, each already
        charged to the scientist's budget, so `add_handler(action="accept", dp=True)` sends them
        at once); False only exact ones; None both.
        `secure_sum=True`: contributions to secure sums (the kind "secure_sum"); `min_owners`: only
        when at least this many owners take part; `peers`: only when every owner taking part is one
        of these key fingerprints (this owner's own is added).
        `kind="smpc"`: shares in secret-shared computations (`duet.smpc`); `peers` then also covers
        the dealer, and `min_owners` counts the owners computing.
        """
        if action not in ("accept", "deny"):
            raise ValueError("action must be 'accept' or 'deny'")
        kinds = ("secure_sum",) if secure_sum else ((kind,) if isinstance(kind, str) else tuple(kind))
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"unknown request kind {k!r}; kinds are {', '.join(KINDS)}")
        if max_elements is not None and (not isinstance(max_elements, int) or max_elements < 0):
            raise ValueError("max_elements must be a non-negative int")
        if dp is not None and not isinstance(dp, bool):
            raise ValueError("dp must be True, False or None")
        if min_owners is not None and (not isinstance(min_owners, int) or isinstance(min_owners, bool) or min_owners < 2):
            raise ValueError("min_owners must be an int >= 2")
        if peers is not None and (isinstance(peers, str) or not all(isinstance(p, str) and p.startswith("SHA256:") for p in peers)):
            raise ValueError("peers must be key fingerprints (\"SHA256:...\"), as shown in the queue")
        rule = Rule(
            action=action,
            kinds=kinds,
            datasets=tuple(datasets) if datasets is not None else None,
            max_elements=max_elements,
            scientist=scientist,
            reason=reason,
            dp=dp,
            min_owners=min_owners,
            peers=tuple(peers) + ((self.own_fingerprint,) if self.own_fingerprint else ()) if peers is not None else None,
        )
        with self._lock:
            self._rules.append(rule)
        self.audit.append("rule_added", rule=rule.describe())
        for req in self.pending:
            if rule.matches(req):
                req.decided_rule = rule
                try:
                    self.decide(req, ACCEPTED if action == "accept" else DENIED, by=f"rule: {rule.describe()}", reason=reason)
                except ValueError:
                    pass
        self._notify()
        return rule

    def remove_handler(self, rule: Rule) -> None:
        with self._lock:
            self._rules.remove(rule)
        self.audit.append("rule_removed", rule=rule.describe())
        self._notify()

    @property
    def rules(self) -> List[Rule]:
        with self._lock:
            return list(self._rules)

    # -- views -----------------------------------------------------------------
    @property
    def pending(self) -> List[Request]:
        with self._lock:
            return [r for r in self._requests.values() if r.status == PENDING]

    @property
    def history(self) -> List[Request]:
        with self._lock:
            return [r for r in self._requests.values() if r.status != PENDING]

    def get(self, request_id: int) -> Request:
        with self._lock:
            return self._requests[request_id]

    def wait_pending(self, timeout: float = 30.0, kind: Optional[str] = None) -> Request:
        """Block until a request is pending (optionally of a kind); for scripts and tests."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [r for r in self._requests.values() if r.status == PENDING and (kind is None or r.kind == kind)]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no pending {kind or ''} request arrived within {timeout} s".replace("  ", " "))
                self._changed.wait(left)

    def wait_changed(self, timeout: float) -> None:
        """Block until anything in the queue changes, or the timeout passes."""
        with self._lock:
            self._changed.wait(timeout)

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call back (no arguments, any thread) whenever requests or rules change."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        with self._lock:
            self._changed.notify_all()
        for cb in list(self._listeners):
            try:
                cb()
            except Exception:  # a broken listener must not break decisions
                pass

    def __len__(self) -> int:
        return len(self.pending)

    def __iter__(self) -> Iterator[Request]:
        return iter(self.pending)

    def __getitem__(self, index: int) -> Request:
        return self.pending[index]

    def _rows(self) -> List[List[Any]]:
        return [r._row() for r in self.pending]

    def __repr__(self) -> str:
        text = text_table(REQUEST_HEADERS, self._rows(), title=f"Pending requests ({len(self)})")
        if self._rules:
            text += "\nRules: " + "; ".join(r.describe() for r in self.rules)
        return text

    def _repr_html_(self) -> str:
        out = html_table(REQUEST_HEADERS, self._rows(), title=f"Pending requests ({len(self)})")
        if self._rules:
            import html

            out += "<p>Rules: " + html.escape("; ".join(r.describe() for r in self.rules)) + "</p>"
        return out
