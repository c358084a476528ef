"""Statistics across owners who each hold some columns of the same rows, computed on secret
shares (duet.sharing): the scientist learns the result, no owner sees another's values.

    a, b, c = duet.join(code_hospital), duet.join(code_insurer), duet.join(code_dealer)
    fed = duet.Federation([a, b], dealer=c)       # c deals the random triples; it holds no data
    xa, xb = fed[0].store["lab_value"], fed[1].store["claims"]
    r = duet.smpc.dot(xa, xb, bounds=(200, 5e4))  # sum of xa[i] * xb[i]; each value clipped to its bound
    r.get(reason="joint statistic")               # each owner approves its part; the scientist gets the result
    duet.smpc.correlation(xa, xb).get()           # Pearson's r, without either owner's mean or spread
    duet.smpc.sum([xa, xb], bound=5e4).get()      # and mean, add (elementwise), linear

The dealer must not collude with any owner (it could give that owner the other's values); one that
colludes with the scientist learns nothing more than the result. Numbers are fixed point: each
value is rounded to a step of 2^-frac_bits (the largest step that keeps the result inside the ring,
chosen from the public length and bounds, at most 2^-16); `r.error` bounds the difference from the
exact result that rounding can make.
"""
from __future__ import annotations

import concurrent.futures
import math
import secrets
import time
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import DuetError, NotAllowed
from ..protocol import RequestKind
from ..sharing import ring
from ..sharing.party import Description, Job, JobRefused

if TYPE_CHECKING:
    from .client import Scientist
    from .pointer import Pointer

STEP_TIMEOUT = 60.0
_DEALERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


class SharedComputationFailed(DuetError):
    """An owner or the dealer refused or failed; the others were told to stop, nothing was revealed."""


def register_dealer(members: Sequence["Scientist"], dealer: "Scientist") -> None:
    """`dealer` deals for computations between these sessions' owners (`Federation(dealer=...)`)."""
    for s in members:
        _DEALERS[s] = dealer


def _dealer_for(sessions: Sequence["Scientist"], dealer: Optional["Scientist"]) -> "Scientist":
    if dealer is None:
        found = {id(_DEALERS.get(s)): _DEALERS.get(s) for s in sessions}
        dealer = next(iter(found.values())) if len(found) == 1 else None
        if dealer is None:
            raise ValueError("a product of two owners' values needs a dealer: a session with a third owner that "
                             "colludes with neither (dealer=, or duet.Federation([...], dealer=...))")
    prints = [s.owner_fingerprint for s in sessions]
    if dealer.owner_fingerprint is None or dealer.owner_fingerprint in prints:
        raise ValueError("the dealer must be a third owner, none of those whose values are used")
    return dealer


def _pick_frac_bits(fits: Any) -> int:
    for f in range(ring.FRAC_BITS, ring.MIN_FRAC_BITS - 1, -1):
        if fits(f):
            return f
    raise ValueError("the result could overflow 64 bits even with a coarse fixed-point step: use smaller bounds")


class SharedResult:
    """A computation on secret shares, run by `.get()`."""

    def __init__(self, op: str, pointers: Sequence["Pointer"], bounds: Sequence[float], reduce: bool,
                 dealer: Optional["Scientist"], frac_bits: Optional[int], finish: Any, label: str) -> None:
        self.op, self.pointers, self.reduce, self.label = op, list(pointers), reduce, label
        self.sessions = [p._client for p in self.pointers]
        prints = [s.owner_fingerprint for s in self.sessions]
        if None in prints or len(set(prints)) != len(prints):
            raise ValueError("each value must be on a different owner (a shared computation is across owners)")
        if len(bounds) != len(self.pointers) or not all(isinstance(b, (int, float)) and math.isfinite(b) and b > 0
                                                        for b in bounds):
            raise ValueError("bounds: one finite number > 0 per value (each value is clipped to [-bound, bound])")
        self.bounds = tuple(float(b) for b in bounds)
        self.dealer = _dealer_for(self.sessions, dealer) if op == "dot" else None
        self.length = _length(self.pointers)
        terms = self.length if reduce else 1
        if op == "dot":
            def fits(f: int) -> bool:
                return ring.fits_product(terms, self.bounds[0], self.bounds[1], f)
        else:
            def fits(f: int) -> bool:
                return ring.fits_sum(terms * len(self.bounds), max(self.bounds), f)
        self.frac_bits = ring.check_frac_bits(frac_bits) if frac_bits is not None else _pick_frac_bits(fits)
        if not fits(self.frac_bits):
            raise ValueError(f"with frac_bits={self.frac_bits} the result could overflow 64 bits: use fewer")
        self._finish = finish
        self._error_scale = 1.0  # a mean or a correlation divides the total by the length
        self.seconds: Optional[float] = None

    @property
    def error(self) -> float:
        """How far from the exact result the fixed-point rounding can take it (each number, for a
        result by row)."""
        terms = self.length if self.reduce else 1
        if self.op == "dot":
            return self._error_scale * ring.product_error(terms, self.bounds[0], self.bounds[1], self.frac_bits)
        return self._error_scale * ring.sum_error(terms * len(self.bounds), self.frac_bits)

    def __repr__(self) -> str:
        owners = ", ".join(s.owner_name or "?" for s in self.sessions)
        return (f"<{self.label} on secret shares: {self.length} numbers across {owners}; "
                f"step 2^-{self.frac_bits}{'' if self.seconds is None else f', ran in {self.seconds:.2f} s'}>")

    def get(self, reason: str = "", timeout: Optional[float] = None) -> Any:
        """Run it: every owner approves its part (by hand or by rule; `timeout` for that, default
        300 s); the result, or SharedComputationFailed if an owner refused (nothing revealed)."""
        start = time.monotonic()
        total = _run(self, reason, timeout or 300.0)
        self.seconds = time.monotonic() - start
        return self._finish(total)


def _length(pointers: Sequence["Pointer"]) -> int:
    lengths = set()
    for p in pointers:
        meta = p.meta()
        if meta.get("metadata_private") or (meta.get("type") in ("Tensor", "ndarray") and meta.get("shape") is None):
            raise NotAllowed(f"{p!r}: its shape depends on private values")
        if meta.get("type") in ("Tensor", "ndarray"):
            lengths.add(int(np.prod(meta["shape"], dtype=np.int64)) if meta["shape"] else 1)
        elif meta.get("type") in ("int", "float"):
            lengths.add(1)
        else:
            raise NotAllowed(f"{p!r} is a {meta.get('type')}; a shared computation takes tensors, arrays or numbers")
    if len(lengths) != 1:
        raise ValueError(f"the values must hold as many numbers each (they are the same rows): {sorted(lengths)}")
    return lengths.pop()


def _request(s: "Scientist", msg: Dict[str, Any]) -> "concurrent.futures.Future[Any]":
    s._flush_frees()
    return s.session.request({"kind": RequestKind.SMPC, **msg})


def _gather(futures: Dict[int, "concurrent.futures.Future[Any]"], timeout: float, names: Dict[int, str]) -> Dict[int, Any]:
    deadline = time.monotonic() + timeout
    out, errors = {}, []
    for k, fut in futures.items():
        try:
            out[k] = fut.result(max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            errors.append(f"{names[k]}: no answer within {timeout:g} s")
        except Exception as exc:
            errors.append(f"{names[k]}: {exc}")
    if errors:
        raise SharedComputationFailed("; ".join(errors))
    return out


def _run(job_spec: SharedResult, reason: str, join_timeout: float) -> np.ndarray:
    owners = job_spec.sessions
    parties: Dict[int, "Scientist"] = {k: s for k, s in enumerate(owners, start=1)}
    if job_spec.dealer is not None:
        parties[0] = job_spec.dealer
    names = {k: (s.owner_name or "owner") + (" (dealer)" if k == 0 else "") for k, s in parties.items()}
    job_id = secrets.token_bytes(16)
    described = _gather({k: _request(s, {"step": "describe", "job": job_id, "op": job_spec.op, "index": k,
                                         "obj": job_spec.pointers[k - 1].id}) for k, s in enumerate(owners, 1)},
                        STEP_TIMEOUT, names)
    try:
        descriptions = tuple(Description.from_wire(described[k]) for k in sorted(described))
    except JobRefused as exc:
        raise SharedComputationFailed(str(exc)) from None
    job = Job(job_id, job_spec.op, tuple(s.owner_fingerprint or "" for s in owners),
              job_spec.dealer.owner_fingerprint or "" if job_spec.dealer else "", job_spec.length, job_spec.frac_bits,
              job_spec.bounds, job_spec.reduce, descriptions)
    job.check()
    joined: List[int] = []
    asked: List[int] = []
    try:
        futures = {k: _request(s, {"step": "join", "terms": job.to_wire(), "index": k, "reason": reason,
                                   "obj": job_spec.pointers[k - 1].id}) for k, s in enumerate(owners, 1)}
        if job_spec.dealer is not None:
            futures[0] = _request(job_spec.dealer, {"step": "join", "terms": job.to_wire(), "role": "dealer"})
        asked = list(futures)
        try:
            adverts = _gather(futures, join_timeout, names)
        finally:  # who joined must hear of an abort, whoever failed
            joined = [k for k, f in futures.items() if f.done() and not f.cancelled() and f.exception() is None]
        ads = [adverts[k] for k in sorted(adverts)]
        dealt = _gather({k: _request(s, {"step": "deal", "job": job_id, "adverts": ads}) for k, s in parties.items()},
                        STEP_TIMEOUT, names)
        joined = [k for k in joined if k != 0]  # the dealer is done once it has dealt
        inbox = _route(dealt)
        opened = _gather({k: _request(owners[k - 1], {"step": "open", "job": job_id, "sealed": inbox.get(k, [])})
                          for k in range(1, len(owners) + 1)}, STEP_TIMEOUT, names)
        if job.op == "dot":
            inbox = _route(opened)
            opened = _gather({k: _request(owners[k - 1], {"step": "finish", "job": job_id, "sealed": inbox.get(k, [])})
                              for k in range(1, len(owners) + 1)}, STEP_TIMEOUT, names)
        joined = asked = []
        shares = [np.asarray(opened[k]).view(np.uint64) for k in sorted(opened)]
        if not all(isinstance(s, np.ndarray) and s.shape == shares[0].shape for s in shares):
            raise SharedComputationFailed("an owner's result share is malformed")
        return ring.decode(ring.combine(shares), job.scale_bits)
    finally:
        # Everyone asked hears of it: one still deciding joins later and then reads the abort (a
        # scientist's requests run in order on the owner). Only those who joined are waited for.
        _abort([parties[k] for k in joined], [parties[k] for k in asked if k not in joined], job_id)


def _abort(joined: Sequence["Scientist"], pending: Sequence["Scientist"], job_id: bytes) -> None:
    """Tell those asked to forget the computation, and wait (briefly) until those who joined have."""
    futures = []
    for s in list(joined) + list(pending):
        try:
            fut = _request(s, {"step": "abort", "job": job_id})
        except Exception:  # (a lost session: its computations expire there)
            continue
        if s in joined:
            futures.append(fut)
    concurrent.futures.wait(futures, timeout=10.0)


def _route(replies: Dict[int, Any]) -> Dict[int, List[Dict[str, Any]]]:
    inbox: Dict[int, List[Dict[str, Any]]] = {}
    for items in replies.values():
        if not isinstance(items, list):
            raise SharedComputationFailed("a party answered with something other than sealed messages")
        for item in items:
            to = item.get("to") if isinstance(item, dict) else None
            if type(to) is not int:
                raise SharedComputationFailed("a sealed message without an addressee")
            inbox.setdefault(to, []).append(item)
    return inbox


def _bounds(bounds: Any, count: int) -> Tuple[float, ...]:
    if bounds is None:
        raise ValueError("bounds= is needed: each value is clipped to [-bound, bound], and the bounds decide the "
                         "fixed-point step (one number for all, or one per value)")
    if isinstance(bounds, (int, float)):
        return (float(bounds),) * count
    return tuple(bounds)


# -- the computations --------------------------------------------------------------------------
def dot(a: "Pointer", b: "Pointer", bounds: Any = None, dealer: Optional["Scientist"] = None,
        frac_bits: Optional[int] = None) -> SharedResult:
    """sum(a[i] * b[i]) for a on one owner and b on another (the same rows): a number."""
    return SharedResult("dot", [a, b], _bounds(bounds, 2), True, dealer, frac_bits, lambda t: float(t[0]), "dot product")


def multiply(a: "Pointer", b: "Pointer", bounds: Any = None, dealer: Optional["Scientist"] = None,
             frac_bits: Optional[int] = None) -> SharedResult:
    """a[i] * b[i] for each row: a float64 tensor."""
    return SharedResult("dot", [a, b], _bounds(bounds, 2), False, dealer, frac_bits, torch.from_numpy, "product")


def sum(values: Sequence["Pointer"], bound: Any = None, frac_bits: Optional[int] = None) -> SharedResult:  # noqa: A001
    """The total of every owner's values: a number."""
    return SharedResult("sum", values, _bounds(bound, len(values)), True, None, frac_bits, lambda t: float(t[0]), "sum")


def mean(values: Sequence["Pointer"], bound: Any = None, frac_bits: Optional[int] = None) -> SharedResult:
    """The mean over rows of the owners' values added row by row: a number."""
    result = SharedResult("sum", values, _bounds(bound, len(values)), True, None, frac_bits, None, "mean")
    result._finish = lambda t: float(t[0]) / result.length
    result._error_scale = 1.0 / result.length
    return result


def add(values: Sequence["Pointer"], bound: Any = None, frac_bits: Optional[int] = None) -> SharedResult:
    """The owners' values added row by row: a float64 tensor."""
    return SharedResult("sum", values, _bounds(bound, len(values)), False, None, frac_bits, torch.from_numpy, "sum by row")


def linear(parts: Sequence[Tuple["Pointer", Any]], bias: float = 0.0, bound: Any = None,
           frac_bits: Optional[int] = None) -> SharedResult:
    """A linear model's output on features split across owners: for each owner, (its features X,
    n rows by d columns, the model's weights for those columns, d numbers); each owner computes
    X @ w on its own side, and the parts are added on shares. `bound`: of each owner's part."""
    partials = [x.__matmul__(torch.as_tensor(w, dtype=torch.float64).to(_dtype_of(x))) for x, w in parts]
    result = SharedResult("sum", partials, _bounds(bound, len(partials)), False, None, frac_bits, None, "linear model")
    result._finish = lambda t: torch.from_numpy(t) + float(bias)
    return result


def _dtype_of(x: "Pointer") -> torch.dtype:
    dtype = str(x.meta().get("dtype") or "float32")
    return getattr(torch, dtype.replace("torch.", ""), torch.float64)


def correlation(a: "Pointer", b: "Pointer", dealer: Optional["Scientist"] = None) -> SharedResult:
    """Pearson's r of a (on one owner) and b (on another), rows matched: each owner standardizes
    its own values (mean 0, variance 1) on its side, and the product of the two is computed on
    shares, so neither mean nor spread leaves. |z| <= sqrt(n) always, so no value is clipped."""
    n = _length([a, b])
    za, zb = _standardized(a), _standardized(b)
    bound = math.sqrt(n)
    result = SharedResult("dot", [za, zb], (bound, bound), True, dealer, None, None, "correlation")
    result._finish = lambda t: float(np.clip(t[0] / n, -1.0, 1.0))
    result._error_scale = 1.0 / n
    return result


def _standardized(x: "Pointer") -> "Pointer":
    """(x - mean) / population standard deviation, on the owner's side (a constant column stays 0)."""
    xd = x.double()
    centered = xd - xd.mean()
    spread = centered.pow(2).mean().sqrt()
    return centered / spread.clamp(min=1e-300)
