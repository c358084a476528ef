"""The privacy ledger: per scientist identity, a budget and every spend, composed and kept on disk.

Why each rule:
- Keyed by the scientist's identity key fingerprint, so leaving and joining again resets nothing.
- Reserve, then commit or refund: the budget check and the reservation happen under one lock, so
  concurrent requests can never overspend together. A reservation counts as spent until refunded;
  one left open by a crash stays spent (when in doubt, charge).
- Append-only JSON lines, each flushed and fsync'd before the spend it records is used, so a
  restarted owner reads back exactly the ledger it had.
- Composition by Google's dp-accounting: pure-epsilon spends (discrete Laplace) add up (basic
  composition, exact); once an approximate spend (DP-SGD) is in, everything is composed as privacy
  loss distributions at the budget's delta. Spends are composed in a canonical order, so the charge
  of a set of queries never depends on the order they came in.
- The unit of privacy is one row, replaced: the number of rows is public (Duet shows shapes).
"""
from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ...errors import BudgetExceeded

DEFAULT_KEY = "*"  # the budget of every scientist without one of their own
# What may be spent, per spend: a release asking more is refused as a mistake, not charged.
MAX_EPSILON_PER_SPEND = 10.0
_SLACK = 1e-9  # float rounding in sums of epsilons


@dataclass(frozen=True)
class Budget:
    """Total epsilon (and delta, for approximate spends) one scientist identity may spend."""

    epsilon: float
    delta: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError("epsilon must be a finite number >= 0")
        if not (isinstance(self.delta, (int, float)) and 0 <= self.delta < 1):
            raise ValueError("delta must be a number in [0, 1)")


@dataclass(frozen=True)
class Spend:
    """One charge: a pure-epsilon release, or a DP-SGD run (Poisson-sampled Gaussian steps)."""

    kind: str  # "laplace" or "dpsgd"
    epsilon: float = 0.0  # laplace: the release's epsilon
    sampling_rate: float = 0.0  # dpsgd
    noise_multiplier: float = 0.0  # dpsgd
    steps: int = 0  # dpsgd

    @staticmethod
    def laplace(epsilon: float) -> "Spend":
        check_epsilon(epsilon)
        return Spend("laplace", epsilon=float(epsilon))

    @staticmethod
    def dpsgd(sampling_rate: float, noise_multiplier: float, steps: int) -> "Spend":
        if not (0 < sampling_rate <= 1):
            raise ValueError("sampling_rate must be in (0, 1]")
        if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise ValueError("noise_multiplier must be a finite number > 0")
        if not (isinstance(steps, int) and steps > 0):
            raise ValueError("steps must be an int > 0")
        return Spend("dpsgd", sampling_rate=float(sampling_rate), noise_multiplier=float(noise_multiplier), steps=steps)

    @property
    def pure(self) -> bool:
        return self.kind == "laplace"

    def to_json(self) -> Dict[str, Any]:
        return {"kind": self.kind, "epsilon": self.epsilon, "sampling_rate": self.sampling_rate,
                "noise_multiplier": self.noise_multiplier, "steps": self.steps}

    @staticmethod
    def from_json(d: Dict[str, Any]) -> "Spend":
        return Spend(str(d["kind"]), float(d.get("epsilon", 0.0)), float(d.get("sampling_rate", 0.0)),
                     float(d.get("noise_multiplier", 0.0)), int(d.get("steps", 0)))

    def describe(self) -> str:
        if self.pure:
            return f"epsilon {self.epsilon:g}"
        return f"DP-SGD: {self.steps} steps, sampling rate {self.sampling_rate:.4g}, noise multiplier {self.noise_multiplier:g}"


def check_epsilon(epsilon: Any) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError("epsilon must be a finite number > 0")
    if epsilon > MAX_EPSILON_PER_SPEND:
        raise ValueError(f"epsilon {epsilon:g} is more than {MAX_EPSILON_PER_SPEND:g} for one release; "
                         "such a release protects almost nothing")
    return float(epsilon)


def compose(spends: Iterable[Spend], delta: float) -> Tuple[float, float]:
    """(epsilon, delta) of all these spends together; pure spends alone compose exactly to (sum, 0).

    Neighbouring datasets differ in one row, replaced (the row count is public, as Duet shows
    shapes): dp-accounting's privacy loss distributions with the REPLACE_ONE relation, a pure
    epsilon spend taken as the worst epsilon-DP mechanism (`from_privacy_parameters`) and a DP-SGD
    run as a Poisson-subsampled Gaussian composed over its steps.
    """
    ordered = sorted(spends, key=lambda s: (s.kind, s.epsilon, s.sampling_rate, s.noise_multiplier, s.steps))
    if all(s.pure for s in ordered):
        return math.fsum(s.epsilon for s in ordered), 0.0
    if delta <= 0:
        return math.inf, 0.0  # an approximate spend needs a budget with delta > 0
    return _compose_approximate(tuple(ordered), float(delta))


@functools.lru_cache(maxsize=256)
def _compose_approximate(ordered: Tuple[Spend, ...], delta: float) -> Tuple[float, float]:
    """Privacy loss distributions are slow to build: the same spends are composed once (views ask often)."""
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import common, privacy_loss_distribution as pld

    total: Any = None
    for s in ordered:
        if s.pure:
            part = pld.from_privacy_parameters(common.DifferentialPrivacyParameters(s.epsilon, 0.0))
        else:
            part = pld.from_gaussian_mechanism(s.noise_multiplier, sampling_prob=s.sampling_rate,
                                               neighboring_relation=NeighboringRelation.REPLACE_ONE).self_compose(s.steps)
        total = part if total is None else total.compose(part)
    return float(total.get_epsilon_for_delta(delta)), delta


@dataclass
class Entry:
    """One reservation as the ledger keeps it."""

    id: str
    scientist: str
    spend: Spend
    what: str
    at: float
    state: str = "reserved"  # reserved (counts as spent), committed, refunded


@dataclass
class Reservation:
    """A reserved spend: commit once the noisy value exists, refund if nothing was computed."""

    ledger: "Ledger"
    entry: Entry
    _done: bool = field(default=False, repr=False)

    @property
    def spend(self) -> Spend:
        return self.entry.spend

    def commit(self) -> None:
        if not self._done:
            self._done = True
            self.ledger._close(self.entry, "committed")

    def refund(self) -> None:
        if not self._done:
            self._done = True
            self.ledger._close(self.entry, "refunded")


class Ledger:
    """Budgets per scientist identity and every spend, persisted append-only (None: in memory)."""

    def __init__(self, path: Optional[Path | str], audit: Any = None) -> None:
        self.path = Path(path) if path is not None else None
        self.audit = audit
        self._lock = threading.Lock()
        self._budgets: Dict[str, Budget] = {}
        self._entries: Dict[str, Entry] = {}
        self.listeners: List[Any] = []  # called (no arguments) after every change
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._load()

    # -- budgets -------------------------------------------------------------------------
    def set_budget(self, scientist: str, budget: Budget) -> None:
        with self._lock:
            self._budgets[scientist] = budget
        if self.audit is not None:
            self.audit.append("dp_budget", scientist=scientist, epsilon=budget.epsilon, delta=budget.delta)
        self._notify()

    def budget_of(self, scientist: str) -> Optional[Budget]:
        with self._lock:
            return self._budgets.get(scientist) or self._budgets.get(DEFAULT_KEY)

    # -- spends --------------------------------------------------------------------------
    def spends_of(self, scientist: str) -> List[Entry]:
        with self._lock:
            return [e for e in self._entries.values() if e.scientist == scientist and e.state != "refunded"]

    def spent(self, scientist: str) -> Tuple[float, float]:
        """(epsilon, delta) spent so far by one identity, reservations included."""
        budget = self.budget_of(scientist)
        return compose([e.spend for e in self.spends_of(scientist)], budget.delta if budget else 0.0)

    def left(self, scientist: str) -> float:
        budget = self.budget_of(scientist)
        if budget is None:
            return 0.0
        return max(0.0, budget.epsilon - self.spent(scientist)[0])

    def scientists(self) -> List[str]:
        with self._lock:
            keys = {e.scientist for e in self._entries.values()} | set(self._budgets)
        return sorted(keys - {DEFAULT_KEY})

    def reserve(self, scientist: str, spend: Spend, what: str) -> Reservation:
        """Reserve a spend, or raise BudgetExceeded; nothing is charged on refusal."""
        with self._lock:
            budget = self._budgets.get(scientist) or self._budgets.get(DEFAULT_KEY)
            if budget is None:
                raise BudgetExceeded("the owner has set no privacy budget for you: "
                                     "differentially private releases are not offered")
            current = [e.spend for e in self._entries.values() if e.scientist == scientist and e.state != "refunded"]
            if not spend.pure and budget.delta <= 0:
                raise BudgetExceeded(f"{spend.describe()} is approximate DP: it needs a budget with delta > 0, "
                                     "and yours has none")
            eps_now, _ = compose(current, budget.delta)
            eps_after, _ = compose(current + [spend], budget.delta)
            if eps_after > budget.epsilon + _SLACK:
                raise BudgetExceeded(
                    f"this release ({spend.describe()}) would bring your privacy spend to epsilon "
                    f"{eps_after:.4g}, over your budget of {budget.epsilon:g}"
                    f"{f' (delta {budget.delta:g})' if budget.delta else ''}; {max(0.0, budget.epsilon - eps_now):.4g} is left")
            entry = Entry(id=uuid.uuid4().hex, scientist=scientist, spend=spend, what=what, at=time.time())
            self._write({"op": "reserve", "id": entry.id, "scientist": scientist, "spend": spend.to_json(),
                         "what": what, "at": entry.at})
            self._entries[entry.id] = entry
        if self.audit is not None:
            self.audit.append("dp_charge", scientist=scientist, spend=spend.describe(), what=what, id=entry.id)
        self._notify()
        return Reservation(self, entry)

    def _close(self, entry: Entry, state: str) -> None:
        with self._lock:
            self._write({"op": state, "id": entry.id})
            entry.state = state
        if self.audit is not None and state == "refunded":
            self.audit.append("dp_refund", scientist=entry.scientist, id=entry.id, what=entry.what)
        self._notify()

    def _notify(self) -> None:
        for cb in list(self.listeners):
            try:
                cb()
            except Exception:  # a broken view must not break a spend
                pass

    # -- disk ------------------------------------------------------------------------------
    def _write(self, record: Dict[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps(record, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _load(self) -> None:
        assert self.path is not None
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if rec["op"] == "reserve":
                    self._entries[rec["id"]] = Entry(rec["id"], rec["scientist"], Spend.from_json(rec["spend"]),
                                                     str(rec.get("what", "")), float(rec.get("at", 0.0)))
                elif rec["op"] in ("committed", "refunded") and rec["id"] in self._entries:
                    self._entries[rec["id"]].state = rec["op"]
            except (ValueError, KeyError, TypeError) as exc:
                if n == len(lines) - 1 or all(not rest.strip() for rest in lines[n + 1:]):
                    continue  # a last line cut short by a crash: the write it began never finished
                raise ValueError(f"{self.path}: line {n + 1} is not a ledger record ({exc}); "
                                 "refusing to start with a ledger that cannot be read") from None
