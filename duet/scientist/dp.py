"""The scientist's differential privacy: `scientist.dp` (statistics, training) and `scientist.privacy`.

A differentially private release needs no human on the owner's side when the owner has a rule for
it (`add_handler(action="accept", dp=True)`); it is charged to your privacy budget, which the owner
sets per identity key. `pointer.get(dp=epsilon)` works on any aggregate the owner can bound (a sum,
mean or count over the rows of an asset with declared bounds); the statistics here are the ones
that need arguments of their own.
"""
from __future__ import annotations

import concurrent.futures
import html
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from ..errors import NotAllowed, RequestTimeout
from ..protocol import RequestKind
from ..tables import text_table

if TYPE_CHECKING:
    from .client import Scientist
    from .pointer import Pointer
    from .requests import RequestHandle

HISTOGRAM = "duet.owner.privacy.queries.histogram"
QUANTILE = "duet.owner.privacy.queries.quantile"
DEFAULT_CANDIDATES = 101


class DPQuery:
    """A statistic computed exactly on the owner, released with noise: `.get()` charges epsilon."""

    def __init__(self, pointer: "Pointer", epsilon: float, what: str) -> None:
        self.pointer = pointer  # the exact value's pointer (private: its exact release needs approval)
        self.epsilon = float(epsilon)
        self.what = what

    def request(self, reason: str = "") -> "RequestHandle":
        return self.pointer.request(reason, dp=self.epsilon)

    def get(self, reason: str = "", timeout: Optional[float] = None) -> Any:
        """The noisy value (a new noisy value, and a new charge, each time)."""
        return self.pointer.get(reason, timeout, dp=self.epsilon)

    def __repr__(self) -> str:
        return f"<DP {self.what}, epsilon {self.epsilon:g}: .get() releases it>"


class DPNamespace:
    """`scientist.dp`: statistics with a noisy release, and DP training on the owner."""

    def __init__(self, client: "Scientist") -> None:
        self._client = client
        self.last_training: Dict[str, Any] = {}  # what the latest DP training cost: epsilon, delta, steps, ...

    def _bounds(self, x: "Pointer") -> List[float]:
        info = x.meta().get("dp") or {}
        bounds = info.get("bounds")
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise NotAllowed(f"no declared bounds reach this value ({info.get('why') or 'unknown'}); pass range=(lo, hi)")
        return [float(bounds[0]), float(bounds[1])]

    def histogram(self, x: "Pointer", bins: Any = 10, range: Optional[Sequence[float]] = None, *,  # noqa: A002 (numpy's name)
                  epsilon: float) -> DPQuery:
        """Counts per bin of x's values, with discrete Laplace noise; `.get()` returns (counts, edges).

        `bins`: a number of equal bins over `range` (default: x's declared bounds), or the edges
        themselves. Values beyond the outer edges count in the outer bins.
        """
        if isinstance(bins, int) and not isinstance(bins, bool):
            if not 1 <= bins <= 10_000:
                raise ValueError("bins must be between 1 and 10000")
            lo, hi = (float(range[0]), float(range[1])) if range is not None else tuple(self._bounds(x))
            if not lo < hi:
                raise ValueError("range must be (lo, hi) with lo < hi")
            edges = [lo + (hi - lo) * i / bins for i in _range(bins + 1)]
        else:
            edges = [float(e) for e in bins]
        ptr = self._client._call("func", HISTOGRAM, [x, edges], {})
        return DPQuery(ptr, _epsilon(epsilon), f"histogram of {x._label} ({len(edges) - 1} bins)")

    def quantile(self, x: "Pointer", q: float, *, epsilon: float, candidates: Optional[Sequence[float]] = None) -> DPQuery:
        """The q-quantile of x's values (one per row), chosen among `candidates` by OpenDP's
        exponential mechanism; default: 101 evenly spaced values over x's declared bounds."""
        if candidates is None:
            lo, hi = self._bounds(x)
            candidates = [lo + (hi - lo) * i / (DEFAULT_CANDIDATES - 1) for i in _range(DEFAULT_CANDIDATES)]
        ptr = self._client._call("func", QUANTILE, [x, float(q), [float(c) for c in candidates]], {})
        return DPQuery(ptr, _epsilon(epsilon), f"{q:g}-quantile of {x._label}")

    def train(self, model: "Pointer", optimizer: "Pointer", dataset: str, *, epochs: int = 1, batch_size: int = 64,
              noise_multiplier: Optional[float] = None, target_epsilon: Optional[float] = None, max_grad_norm: float = 1.0,
              loss: str = "nll_loss", timeout: Optional[float] = None, progress: bool = True) -> "Pointer":
        """Train a copy of a model you sent on the owner's dataset with DP-SGD (Opacus); returns its pointer.

        The copy is a differentially private release: `.get()` needs no approval. The owner charges
        the whole run to your budget first (`BudgetExceeded` otherwise) and picks examples by
        Poisson sampling at rate batch_size / dataset size. Give `noise_multiplier` or
        `target_epsilon` (this run's cost at the budget's delta). `loss`: "nll_loss" (for a model
        ending in log_softmax) or "cross_entropy". Progress shows steps, never losses.
        """
        from ..protocol import RequestKind
        from .models import ModelPointer

        client = self._client
        rid = client._new_rid()
        msg: Dict[str, Any] = {"kind": RequestKind.DP_TRAIN, "model": model.id, "optimizer": optimizer.id, "name": dataset,
                               "rid": rid, "epochs": epochs, "batch_size": batch_size, "max_grad_norm": max_grad_norm,
                               "loss": loss}
        if noise_multiplier is not None:
            msg["noise_multiplier"] = noise_multiplier
        if target_epsilon is not None:
            msg["target_epsilon"] = target_epsilon
        client._flush_frees()
        fut = client.session.request(msg)
        req_id = fut.request_id  # type: ignore[attr-defined]
        bar: Any = None

        def on_progress(done: int, total: int) -> None:
            nonlocal bar
            if not progress:
                return
            if bar is None:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, unit="step", desc=f"DP training on {dataset}", leave=False)
            bar.update(done - bar.n)

        client._progress[req_id] = on_progress
        try:
            info = fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RequestTimeout(f"DP training did not finish within {timeout} s; it goes on on the owner") from None
        finally:
            client._progress.pop(req_id, None)
            if bar is not None:
                bar.close()
        self.last_training = info if isinstance(info, dict) else {}
        label = f"DP-trained {model._label}"
        if isinstance(model, ModelPointer):
            return model._stand_in(client, rid, label)
        from .pointer import Pointer

        return Pointer(client, rid, label, kind="Module")

    def __repr__(self) -> str:
        return "<scientist.dp: histogram(x, bins, epsilon=), quantile(x, q, epsilon=), train(...); pointer.get(dp=epsilon)>"


_range = range  # (histogram's argument is named like numpy's)


def _epsilon(epsilon: Any) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError("epsilon must be a number > 0")
    return float(epsilon)


class PrivacyView:
    """What you have spent of your privacy budget with this owner, and each release."""

    def __init__(self, summary: Dict[str, Any]) -> None:
        self.summary = summary

    @property
    def budget(self) -> float:
        return float(self.summary.get("budget_epsilon") or 0.0)

    @property
    def spent(self) -> float:
        return float(self.summary.get("spent_epsilon") or 0.0)

    @property
    def left(self) -> float:
        return float(self.summary.get("left_epsilon") or 0.0)

    @property
    def releases(self) -> List[Dict[str, Any]]:
        r = self.summary.get("releases")
        return list(r) if isinstance(r, list) else []

    def _head(self) -> str:
        if not self.budget:
            return "No privacy budget: the owner offers no differentially private releases to you"
        delta = self.summary.get("budget_delta") or 0
        return (f"Privacy budget: epsilon {self.budget:g}{f', delta {delta:g}' if delta else ''}; "
                f"spent {self.spent:.4g}, left {self.left:.4g}")

    def _rows(self) -> List[List[Any]]:
        return [[str(r.get("what", "")), str(r.get("charge", "")), str(r.get("state", ""))] for r in self.releases]

    def __repr__(self) -> str:
        if not self.releases:
            return self._head()
        return self._head() + "\n" + text_table(["release", "charge", "state"], self._rows())

    def _repr_html_(self) -> str:
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self._rows())
        table = f"<table><tr><th>release</th><th>charge</th><th>state</th></tr>{rows}</table>" if rows else ""
        return f"<p>{html.escape(self._head())}</p>{table}"


def privacy_of(client: "Scientist", timeout: float) -> PrivacyView:
    summary = client.session.call({"kind": RequestKind.PRIVACY}, timeout, "your privacy budget")
    return PrivacyView(summary if isinstance(summary, dict) else {})
