"""One scientist, several owners: statistics and training across them, with secure aggregation.

    a, b, c = duet.join(code_a), duet.join(code_b), duet.join(code_c)
    fed = duet.Federation([a, b, c], min_owners=3)
    counts = fed.map(lambda s: s.store["ages"].sum())   # one pointer per owner
    fed.secure_sum(counts).get(reason="cohort size")     # only the sum reaches the scientist
    model = fed.train(Net(), loader="mnist-train", rounds=5)   # FedAvg, updates summed securely

A secure sum runs the protocol of `duet.secagg` (Bonawitz et al. 2017) with this scientist as
the relay that cannot read: each owner approves its contribution (by hand or by rule), masks it,
and the masks cancel only in the sum. Owners that drop out after sharing their keys are recovered
from the others' shares while at least the threshold remain; below it, the round fails and
nothing is learned. The result says which owners it covers.
"""
from __future__ import annotations

import concurrent.futures
import copy
import logging
import secrets
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import DuetError, NotAllowed
from ..protocol import RequestKind
from ..secagg import encoding
from ..secagg.aggregate import RoundFailed, unmask_total
from ..secagg.participant import Round, smallest_threshold, verify_adverts

if TYPE_CHECKING:
    from .client import Scientist
    from .pointer import Pointer

log = logging.getLogger("duet.scientist")

STEP_TIMEOUT = 60.0  # seconds an owner has for each step after joining; later, it counts as dropped


class SecureSumFailed(DuetError):
    """Too few owners stayed for the sum to be unmasked (nothing about any one owner was learned)."""


@dataclass
class _Form:
    """How the summed vector turns back into what the scientist asked for."""

    kind: str  # tensor, ndarray, number, state_dict, list
    spec: encoding.Spec
    dtypes: List[Any]
    keys: List[str] = field(default_factory=list)  # state_dict: the scientist's own key for each part


@dataclass
class RoundReport:
    """What one secure sum covered and cost."""

    owners: List[str]  # names of the owners whose values are in the sum
    dropped: List[str]  # owners that took part but are not in the sum
    seconds: float
    bytes_per_owner: int  # roughly what each owner sent: key advert, sealed shares, masked vector, shares


class SecureSum:
    """A secure sum across a federation's owners; `.get()` runs it and returns the sum."""

    def __init__(self, fed: "Federation", values: Sequence[Any], weights: Optional[Sequence[float]], clip: Optional[float],
                 scale_bits: Optional[int], dp: Optional[float] = None) -> None:
        if len(values) != len(fed):
            raise ValueError(f"one value per owner: {len(fed)} owners, {len(values)} values")
        self.fed = fed
        self.values = list(values)
        self.weights = list(weights) if weights is not None else [1.0] * len(values)
        if len(self.weights) != len(values) or not all(isinstance(w, (int, float)) and w > 0 for w in self.weights):
            raise ValueError("weights: one number > 0 per owner")
        forms = [_form_of(v, clip, scale_bits) for v in self.values]
        for i, f in enumerate(forms[1:], start=2):
            if f.spec != forms[0].spec:
                raise ValueError(f"owner {i}'s value does not have the shape and kind of owner 1's")
        self.form = forms[0]
        self.report: Optional[RoundReport] = None
        if dp is not None and (isinstance(dp, bool) or not isinstance(dp, (int, float)) or not dp > 0):
            raise ValueError("dp= takes epsilon, a number > 0")
        self.dp = float(dp) if dp is not None else None

    def __repr__(self) -> str:
        state = "not run yet" if self.report is None else f"covers {', '.join(self.report.owners)}"
        return f"<secure sum of {self.form.spec.length} numbers across {len(self.fed)} owners: {state}>"

    def get(self, reason: str = "", timeout: Optional[float] = None) -> Any:
        """Run the secure sum; the sum of the owners that stayed, in the form of one owner's value.

        `timeout`: how long to wait for the owners to approve their contributions (default 300 s).
        """
        total, report = self.fed._run(self.values, self.weights, self.form.spec, reason, timeout or 300.0, self.dp)
        self.report = report
        if report.dropped:
            warnings.warn(f"the secure sum covers {len(report.owners)} of {len(report.owners) + len(report.dropped)} "
                          f"owners: {', '.join(report.dropped)} dropped out", stacklevel=2)
        return _decode(self.form, total)


def _form_of(value: Any, clip: Optional[float], scale_bits: Optional[int]) -> _Form:
    """The spec of one owner's value, from public metadata (shapes and dtypes) only."""
    from .models import ModelPointer
    from .pointer import Pointer

    segments: List[encoding.Segment] = []
    dtypes: List[Any] = []
    keys: List[str] = []
    if isinstance(value, ModelPointer):
        inverse = value._keymap
        state = value._template.state_dict()
        for owner_key, mine in inverse.items():
            t = state.get(mine)
            if t is None:
                continue
            segments.append(encoding.Segment(owner_key, tuple(t.shape), not t.is_floating_point()))
            dtypes.append(t.dtype)
            keys.append(mine)
        kind = "state_dict"
    elif isinstance(value, Pointer):
        seg, dtype, kind = _segment_of(value, "value")
        segments.append(seg)
        dtypes.append(dtype)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Pointer) for v in value):
        for i, v in enumerate(value):
            seg, dtype, _k = _segment_of(v, str(i))
            segments.append(seg)
            dtypes.append(dtype)
        kind = "list"
    else:
        raise TypeError("a secure sum takes, per owner, a pointer, a list of pointers or a model sent with send()")
    spec = encoding.Spec(tuple(segments), encoding.DEFAULT_SCALE_BITS if scale_bits is None else int(scale_bits),
                         2.0**30 if clip is None else float(clip))
    return _Form(kind, spec, dtypes, keys)


def _segment_of(ptr: "Pointer", name: str) -> Tuple[encoding.Segment, Any, str]:
    meta = ptr.meta()
    if meta.get("metadata_private"):
        raise NotAllowed(f"{ptr!r}: its shape depends on private values, so it cannot be summed securely")
    kind, dtype = meta.get("type"), meta.get("dtype")
    if kind in ("Tensor", "ndarray"):
        integer = not (str(dtype).startswith("float"))
        return encoding.Segment(name, tuple(meta.get("shape") or ()), integer), (kind, dtype), kind.lower()
    if kind in ("int", "float", "bool"):
        return encoding.Segment(name, (), kind != "float"), (kind, None), "number"
    raise NotAllowed(f"{ptr!r} is a {kind}; a secure sum takes tensors, arrays, numbers or models")


def _decode(form: _Form, total: np.ndarray) -> Any:
    parts = encoding.decode(form.spec, total)
    out: List[Any] = []
    for part, dtype in zip(parts, form.dtypes):
        if isinstance(dtype, torch.dtype):
            out.append(torch.from_numpy(np.array(part)).to(dtype))  # (np.array keeps 0-d; ascontiguousarray would not)
        elif isinstance(dtype, tuple) and dtype[0] == "Tensor":
            out.append(torch.from_numpy(np.array(part)).to(getattr(torch, str(dtype[1]))))
        elif isinstance(dtype, tuple) and dtype[0] == "ndarray":
            out.append(part.astype(np.dtype(str(dtype[1]))))
        elif isinstance(dtype, tuple) and dtype[0] in ("int", "bool"):
            out.append(int(part))
        else:
            out.append(float(part))
    if form.kind == "state_dict":
        return dict(zip(form.keys, out))
    if form.kind == "list":
        return out
    return out[0]


class Federation:
    """One scientist's sessions with several owners (each a `duet.join`)."""

    def __init__(self, scientists: Sequence["Scientist"], min_owners: Optional[int] = None,
                 threshold: Optional[int] = None, step_timeout: float = STEP_TIMEOUT,
                 on_step: Optional[Callable[[str, List[int]], None]] = None,
                 dealer: Optional["Scientist"] = None) -> None:
        """`threshold`: how many owners must stay for a sum to be unmasked. The default is the
        smallest t with 2t > n + c for c = (n - 1) // 3, fewer than a third of the n owners
        colluding with a scientist (2 of 2 or 3, 3 of 4, 4 of 5, 5 of 7), and at least min_owners:
        what every owner requires by default (`pin_federation(max_colluders=...)`), since below it
        owners colluding with a scientist could sign two stories about who survived and unmask
        everyone. `on_step(step, owners)` is called after each step of a secure sum with the
        owners (1-based positions) still in it, for progress displays. `dealer`: a session with
        a third owner that deals the random triples of products on secret shares (`duet.smpc`)
        and colludes with none of these owners."""
        self.scientists = list(scientists)
        self.on_step = on_step
        n = len(self.scientists)
        if n < 2:
            raise ValueError("a federation needs at least two owners")
        prints = [s.owner_fingerprint for s in self.scientists]
        if None in prints or len(set(prints)) != n:
            raise ValueError("a federation needs distinct owners, each joined")
        self.min_owners = max(2, min_owners or 2)
        if self.min_owners > n:
            raise ValueError(f"min_owners={self.min_owners} but only {n} owners")
        self.threshold = threshold if threshold is not None else max(smallest_threshold(n), self.min_owners)
        if not n // 2 < self.threshold <= n:
            raise ValueError("the threshold must be more than half of the owners and at most all of them")
        self.step_timeout = step_timeout
        self.history: List[Dict[str, Any]] = []  # per training round: seconds, accuracy, bytes
        self.dealer = dealer
        if dealer is not None:
            if dealer.owner_fingerprint is None or dealer.owner_fingerprint in prints:
                raise ValueError("the dealer must be a joined session with a third owner, none of the federation's")
            from .smpc import register_dealer

            register_dealer(self.scientists, dealer)

    def __len__(self) -> int:
        return len(self.scientists)

    def __getitem__(self, i: int) -> "Scientist":
        return self.scientists[i]

    def __iter__(self) -> Any:
        return iter(self.scientists)

    @property
    def owners(self) -> List[Tuple[str, str]]:
        """(name, key fingerprint) of each owner, in order."""
        return [(s.owner_name or "", s.owner_fingerprint or "") for s in self.scientists]

    def __repr__(self) -> str:
        names = ", ".join(f"{n} ({fp[:19]})" for n, fp in self.owners)
        return f"<Federation of {len(self)} owners: {names}; threshold {self.threshold}, min_owners {self.min_owners}>"

    def map(self, fn: Callable[["Scientist"], Any]) -> List[Any]:
        """fn applied to each owner's session: typically one pointer per owner."""
        return [fn(s) for s in self.scientists]

    def secure_sum(self, values: Sequence[Any], weights: Optional[Sequence[float]] = None, clip: Optional[float] = None,
                   scale_bits: Optional[int] = None, dp: Optional[float] = None) -> SecureSum:
        """The sum of one value per owner, which no one sees alone; `.get(reason=...)` runs it.

        Floats are summed as fixed point with `scale_bits` fractional bits (default 24), after
        clipping to [-clip, clip] (default 2^30); integers exactly. `weights` multiply each owner's
        value on the owner first (a weighted average's numerator); an owner refuses a weight whose
        product with clip is not finite. After weighting, NaN counts as 0 and +-infinity (an
        overflowing product too) as +-clip, silently: an owner that failed, or answered otherwise,
        on such a value would tell you something about its value alone, so no error says so. `dp=epsilon`: each owner adds
        its own differentially private noise to its value (an aggregate over an asset with declared
        bounds) and charges epsilon to your budget with it, so the sum reveals no one's row even to
        a scientist colluding with the other owners; the sum carries every owner's noise.
        """
        return SecureSum(self, values, weights, clip, scale_bits, dp)

    def secure_mean(self, values: Sequence[Any], counts: Sequence[Any], reason: str = "",
                    timeout: Optional[float] = None) -> Any:
        """Σ values / Σ counts, where both sums are secure (counts may be private pointers too)."""
        total = self.secure_sum([[v, c] for v, c in zip(values, counts)]).get(reason=reason, timeout=timeout)
        value, count = total
        return value / count

    # -- the protocol ------------------------------------------------------------------------
    def _request(self, s: "Scientist", msg: Dict[str, Any]) -> "concurrent.futures.Future[Any]":
        s._flush_frees()
        return s.session.request({"kind": RequestKind.SECURE_SUM, **msg})

    def _gather(self, futures: Dict[int, "concurrent.futures.Future[Any]"], timeout: float,
                errors: Dict[int, BaseException]) -> Dict[int, Any]:
        """Replies by owner index; an owner that fails or misses the deadline is left out (dropped)."""
        deadline = time.monotonic() + timeout
        out = {}
        for v, fut in futures.items():
            try:
                out[v] = fut.result(max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                errors[v] = TimeoutError(f"no answer within {timeout:g} s")
            except Exception as exc:
                errors[v] = exc
        return out

    def _run(self, values: List[Any], weights: List[float], spec: encoding.Spec, reason: str,
             join_timeout: float, dp: Optional[float] = None) -> Tuple[np.ndarray, RoundReport]:
        start = time.monotonic()
        n = len(self.scientists)
        rnd = Round(secrets.token_bytes(16), tuple(s.owner_fingerprint or "" for s in self.scientists), self.threshold, spec,
                    tuple(float(w) for w in weights), float(dp) if dp is not None else None)
        rnd.check()
        rid = rnd.round_id
        errors: Dict[int, BaseException] = {}
        sent = {v: 0 for v in range(1, n + 1)}

        def owner(v: int) -> "Scientist":
            return self.scientists[v - 1]

        def enough(stage: str, alive: Sequence[int]) -> None:
            if self.on_step is not None:
                self.on_step(stage, list(alive))
            if len(alive) < max(self.threshold, self.min_owners):
                self._abort(rid, alive)
                why = "; ".join(f"{owner(v).owner_name}: {e}" for v, e in sorted(errors.items()))
                raise SecureSumFailed(f"the secure sum failed at {stage}: only {len(alive)} of {n} owners went on "
                                      f"({max(self.threshold, self.min_owners)} needed); nothing was revealed. {why}")

        joins = {}
        for v in range(1, n + 1):
            value = values[v - 1]
            which: Dict[str, Any] = {"objs": [p.id for p in value]} if isinstance(value, (list, tuple)) else {"obj": value.id}
            joins[v] = self._request(owner(v), {"step": "join", "round": rid, "participants": list(rnd.participants),
                                                "index": v, "threshold": self.threshold, "spec": spec.to_wire(),
                                                "weight": weights[v - 1], "weights": list(weights), "reason": reason, **which,
                                                **({"dp": dp} if dp is not None else {})})
        adverts = self._gather(joins, join_timeout, errors)
        try:
            verify_adverts(rnd, list(adverts.values()))  # (each owner checks them again; this names a forger early)
        except ValueError as exc:
            self._abort(rid, list(adverts))
            raise SecureSumFailed(f"the secure sum failed: {exc}") from None
        for v, ad in adverts.items():
            sent[v] += 200
        u1 = sorted(adverts)
        enough("joining", u1)
        sealed = self._gather({v: self._request(owner(v), {"step": "share", "round": rid, "adverts": list(adverts.values())})
                               for v in u1}, self.step_timeout, errors)
        u2 = sorted(sealed)
        enough("sharing keys", u2)
        inbox: Dict[int, List[Dict[str, Any]]] = {v: [] for v in u2}
        for frm in u2:
            for item in sealed[frm]:
                sent[frm] += len(item.get("ct", b""))
                if item.get("to") in inbox:
                    inbox[item["to"]].append({"from": frm, "ct": item["ct"]})
        masked_raw = self._gather({v: self._request(owner(v), {"step": "masked", "round": rid, "sealed": inbox[v]})
                                   for v in u2}, self.step_timeout, errors)
        masked = {v: np.asarray(y).view(np.uint64) for v, y in masked_raw.items()
                  if isinstance(y, np.ndarray) and y.dtype == np.int64 and y.shape == (spec.length,)}
        for v in masked:
            sent[v] += 8 * spec.length
        u3 = sorted(masked)
        enough("masking", u3)
        sigs = self._gather({v: self._request(owner(v), {"step": "consistency", "round": rid, "survivors": u3})
                             for v in u3}, self.step_timeout, errors)
        enough("the consistency check", sorted(sigs))
        pairs = [[v, s] for v, s in sigs.items()]
        replies_raw = self._gather({v: self._request(owner(v), {"step": "unmask", "round": rid, "survivors": u3,
                                                                "signatures": pairs}) for v in u3},
                                   self.step_timeout, errors)
        replies = {u: {int(v): (str(kind), share) for v, kind, share in reply} for u, reply in replies_raw.items()}
        for u, reply in replies.items():
            sent[u] += 70 * len(reply)
        enough("unmasking", sorted(replies))
        mask_keys = {v: ad["mask"] for v, ad in adverts.items()}
        try:
            total = unmask_total(rnd, mask_keys, masked, replies, u2)
        except RoundFailed as exc:
            raise SecureSumFailed(f"the secure sum failed while unmasking: {exc}") from None
        report = RoundReport(owners=[owner(v).owner_name or f"owner {v}" for v in u3],
                             dropped=[owner(v).owner_name or f"owner {v}" for v in range(1, n + 1) if v not in u3],
                             seconds=time.monotonic() - start,
                             bytes_per_owner=int(sum(sent[v] for v in u3) / max(len(u3), 1)))
        for v, err in errors.items():
            log.warning("owner %s left the secure sum: %s", owner(v).owner_name, err)
        return total, report

    def _abort(self, round_id: bytes, alive: Sequence[int]) -> None:
        """Tell owners still in a failed round that it is over (they would forget it within the hour anyway)."""
        for v in alive:
            try:
                self._request(self.scientists[v - 1], {"step": "abort", "round": round_id})
            except Exception:
                pass

    # -- federated averaging -----------------------------------------------------------------
    def train(self, model: torch.nn.Module, loader: str, rounds: int = 5, local_epochs: int = 1, lr: float = 0.01,
              momentum: float = 0.0, batch_size: int = 64, secure: bool = True, seed: int = 0,
              reason: str = "federated averaging", test: Optional[Callable[[torch.nn.Module], float]] = None,
              progress: bool = True, timeout: Optional[float] = None) -> torch.nn.Module:
        """FedAvg: each round, every owner trains a copy of the global model on its `loader` dataset for
        `local_epochs` (SGD, a plan, one message per batch), and the updates are averaged weighted by
        each owner's dataset size, through a secure sum (`secure=False`: each owner releases its
        weights, for comparison). Returns the trained global model; `self.history` has per-round
        figures (and `test(model)` of the global model, if given).
        """
        from .plan import plan

        global_model = copy.deepcopy(model)

        @plan
        def step(m: Any, opt: Any, x: Any, y: Any) -> Any:
            opt.zero_grad()
            loss = torch.nn.functional.nll_loss(m(x), y)
            loss.backward()
            opt.step()
            return loss

        for r in range(1, rounds + 1):
            start = time.monotonic()
            remotes: List[Any] = [None] * len(self)
            sizes: List[int] = [0] * len(self)
            failures: List[BaseException] = []

            # Sent one after another: tracing a module is not safe from several threads at once.
            sent = [s.send(global_model) for s in self.scientists]

            def local(k: int) -> None:
                try:
                    s = self.scientists[k]
                    remote = sent[k]
                    opt = s.torch.optim.SGD(remote.parameters(), lr=lr, momentum=momentum)
                    batches = s.loader(loader, batch_size=batch_size, shuffle=True, seed=seed * 1000 + r, progress=False)
                    for _epoch in range(local_epochs):
                        for x, y in batches:
                            step(remote, opt, x, y)
                    s.ping(timeout=timeout or 3600.0)  # every batch has run
                    remotes[k], sizes[k] = remote, batches.size
                except BaseException as exc:  # reported below, for the owner it concerns
                    failures.append(exc)

            threads = [threading.Thread(target=local, args=(k,), name=f"duet-fedavg-{k}") for k in range(len(self))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if failures:
                raise failures[0]
            trained_at = time.monotonic()
            total_n = float(sum(sizes))
            if secure:
                agg = self.secure_sum(remotes, weights=[float(n) for n in sizes])
                summed = agg.get(reason=f"{reason}, round {r}", timeout=timeout)
                avg = {k: (v.double() / total_n).to(v.dtype) if v.is_floating_point() else v for k, v in summed.items()}
                report = agg.report
            else:
                states = [rm.get(reason=f"{reason}, round {r}", timeout=timeout or 300.0).state_dict() for rm in remotes]
                avg = {k: (sum(st[k].double() * n for st, n in zip(states, sizes)) / total_n).to(states[0][k].dtype)
                       if states[0][k].is_floating_point() else states[0][k] for k in states[0]}
                report = None
            global_model.load_state_dict(avg)
            entry: Dict[str, Any] = {"round": r, "seconds": time.monotonic() - start, "train_seconds": trained_at - start,
                                     "aggregate_seconds": time.monotonic() - trained_at, "secure": secure}
            if report is not None:
                entry.update(bytes_per_owner=report.bytes_per_owner, owners=report.owners, dropped=report.dropped)
            if test is not None:
                entry["test"] = test(global_model)
            self.history.append(entry)
            if progress:
                acc = f", test {entry['test']:.4f}" if "test" in entry else ""
                print(f"round {r}/{rounds}: {entry['seconds']:.1f} s{acc}", flush=True)
        return global_model
