"""Noise for differentially private releases: OpenDP's mechanisms on exact integers, never hand-written.

Neighbouring datasets differ in one row (one slice along the unit axis), replaced by any other
values within the declared bounds; the number of rows is public, as every shape in Duet is. So
the sensitivity of a sum is the width of each element's range, summed over one row.

- Sums, counts and means: the rows are computed again from the published asset
  (`facts.evaluate`), every element is clamped to its bounds, put on a grid of 2^k (1 for
  integers) and summed exactly in int64. OpenDP's discrete Laplace mechanism (`make_laplace` on
  i64 with the L1 distance) adds noise scaled to that sum's sensitivity in grid steps. There is
  no floating-point noise, so the attacks on naive floating-point Laplace (Mironov 2012) do not
  apply, and no floating-point sum, so neither do those on float sums.
- Histograms: exact counts per public bin, the same discrete Laplace (replacing a row moves each
  of its elements from one bin to another: two counts change per element).
- Quantiles: OpenDP's `make_private_quantile` (an exponential mechanism over public candidates).

`plan` decides everything (mechanism, grid, sensitivity, scale) from declared facts and epsilon
alone, before anything is computed: the charge and the noise never depend on the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict

import numpy as np
import torch

from .facts import Aggregate, Rows, evaluate

GRID_BITS = 20  # floats are rounded to 2^-20 of the noise scale: far below the noise
MAX_EXACT = 2.0 ** 50  # |an exact sum| stays below this, so int64 and float64 both hold it exactly
MAX_BINS = 10_000
MAX_CANDIDATES = 10_000


class Unreleasable(ValueError):
    """This aggregate cannot be released with noise (why is in the message; nothing was charged)."""


@dataclass(frozen=True)
class Plan:
    """How one release is made, decided from declared facts and epsilon alone."""

    mechanism: str
    epsilon: float
    grid: float  # values are rounded to multiples of this before the exact sum
    sensitivity: int  # L1, in grid steps (quantile: rows, 1)
    scale: float  # noise scale in grid steps (quantile: OpenDP's scale)
    unit: float  # one grid step in the released value's units (grid * |affine scale| / count)

    def public(self) -> Dict[str, Any]:
        """What the scientist is told with the value: all of it follows from declarations."""
        out: Dict[str, Any] = {"epsilon": self.epsilon, "mechanism": self.mechanism}
        if self.mechanism.startswith("discrete Laplace"):
            out["sensitivity"] = self.sensitivity * self.unit
            out["noise_scale"] = self.scale * self.unit
            out["noise_std"] = math.sqrt(2.0) * self.scale * self.unit
        return out

    def describe(self) -> str:
        p = self.public()
        if "noise_std" in p:
            return f"{self.mechanism}, epsilon {self.epsilon:g}, noise std ≈ {p['noise_std']:.4g}"
        return f"{self.mechanism}, epsilon {self.epsilon:g}"


def _opendp() -> Any:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


def plan(fact: Aggregate, epsilon: float) -> Plan:
    """The mechanism for releasing `fact` at `epsilon`; Unreleasable if it cannot be made."""
    if not isinstance(fact, Aggregate):
        raise Unreleasable("only an aggregate over the rows can be released with noise")
    rows = fact.rows
    if fact.kind == "quantile":
        return _quantile_plan(fact, epsilon)
    if fact.kind == "histogram":
        edges = fact.edges
        if edges is None or edges.ndim != 1 or not 2 <= edges.size <= MAX_BINS + 1 or not np.all(np.isfinite(edges)) \
                or not np.all(np.diff(edges) > 0):
            raise Unreleasable(f"histogram edges must be 2 to {MAX_BINS + 1} increasing finite numbers")
        sens = 2 * rows.slice_size
        return Plan("discrete Laplace (histogram)", epsilon, 1.0, sens, _scale(sens, epsilon), 1.0)
    if fact.kind == "mean" and fact.count == 0:
        raise Unreleasable("a mean of no values")
    if fact.kind == "count_nonzero":
        width, integral, reach = np.ones_like(rows.lo), True, 1.0
    else:
        lo, hi = _clamp_range(fact)
        width, integral = hi - lo, rows.integral
        reach = float(np.max(np.maximum(np.abs(lo), np.abs(hi)), initial=0.0))
    per_row = float(np.sum(width))  # how far one row can move the sum (L1), in the value's units
    if integral or per_row == 0:
        grid = 1.0
    else:  # 2^-GRID_BITS of the noise scale (per_row / epsilon), in logs: no underflow for tiny bounds
        grid = 2.0 ** max(math.floor(math.log2(per_row) - math.log2(epsilon)) - GRID_BITS, -1000)
    if reach > 0:  # bounds must be exact on the grid: |bound| / grid stays within float64's integers
        grid = max(grid, 2.0 ** (math.ceil(math.log2(reach)) - 52))
    if fact.kind == "count_nonzero":
        sens = rows.slice_size
    else:
        lo, hi = _clamp_range(fact)
        sens = int(np.sum(np.ceil(hi / grid) - np.floor(lo / grid)))
    # Each element is summed as its distance from its lower bound, in grid steps (0 ... its width),
    # so the exact sum fits whatever the offset; the grid depends on declared facts and epsilon only.
    if rows.rows * max(sens, 1) >= MAX_EXACT:
        raise Unreleasable("too many rows for an exact sum at these bounds and epsilon; narrow the bounds (clamp)")
    unit = grid * abs(fact.scale) / (fact.count if fact.kind == "mean" else 1)
    return Plan("discrete Laplace", epsilon, grid, sens, _scale(sens, epsilon), unit)


def _clamp_range(fact: Aggregate) -> tuple:
    rows = fact.rows
    if fact.kind == "nansum":  # a missing value counts as 0
        return np.minimum(rows.lo, 0.0), np.maximum(rows.hi, 0.0)
    return rows.lo, rows.hi


def _scale(sensitivity: int, epsilon: float) -> float:
    """The smallest scale OpenDP certifies at epsilon for this L1 sensitivity (0 when nothing varies)."""
    if sensitivity == 0:
        return 0.0
    dp = _opendp()
    scale = sensitivity / epsilon
    for _ in range(64):
        meas = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"), scale=scale)
        if meas.map(sensitivity) <= epsilon:
            return scale
        scale = math.nextafter(scale, math.inf) * (1 + 2.0 ** -40)
    raise Unreleasable("no noise scale meets this epsilon")  # pragma: no cover - OpenDP's map is d_in / scale


def _laplace(values: np.ndarray, plan: Plan) -> np.ndarray:
    """OpenDP's discrete Laplace noise added to exact integers, certified by OpenDP's privacy map."""
    return _laplace_unchecked(values, plan, check=True)


def _laplace_unchecked(values: np.ndarray, plan: Plan, check: bool = False) -> np.ndarray:
    flat = [int(v) for v in values.reshape(-1)]
    if plan.scale == 0.0 or not flat:
        return values.astype(np.int64)
    dp = _opendp()
    meas = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"), scale=plan.scale)
    if check and not meas.map(plan.sensitivity) <= plan.epsilon:
        raise Unreleasable("the noise does not meet this epsilon")  # pragma: no cover - plan() picked the scale
    return np.asarray(meas(flat), dtype=np.int64).reshape(values.shape)


def rows_value(rows: Rows) -> np.ndarray:
    """The rows computed again from the published asset, as float64 (never the scientist's object)."""
    value = evaluate(rows.step)
    arr = value.detach().to(torch.float64).numpy() if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float64)
    if tuple(arr.shape) != rows.shape:
        raise Unreleasable("the recomputed value does not have the recorded shape")  # pragma: no cover - a bug guard
    return arr


def release(fact: Aggregate, plan: Plan) -> Any:
    """The noisy value, computed again from the published asset, in the type, dtype and shape of the
    fact's form (which the same calls made on public exemplars gave)."""
    rows = fact.rows
    live = fact.form
    values = rows_value(rows)
    if fact.kind == "quantile":
        return _like(live, np.asarray(_quantile(fact, plan, values)))
    total = exact_total(fact, plan, values)
    if fact.kind == "histogram":
        assert fact.edges is not None and isinstance(live, tuple)
        return _like(live[0], _laplace(total, plan)), _like(live[1], fact.edges)
    noisy = _laplace(total, plan).astype(np.float64) * plan.grid + _offset(fact, plan)
    if fact.kind == "mean":
        noisy = noisy / fact.count
    noisy = noisy * fact.scale + fact.shift
    return _like(live, noisy)


def _offset(fact: Aggregate, plan: Plan) -> np.ndarray:
    """What the lower bounds add to each output coordinate (public: declared bounds and shapes)."""
    if fact.kind == "count_nonzero":
        return np.zeros(())
    lo, _hi = _clamp_range(fact)
    steps = np.floor(lo / plan.grid) * plan.grid
    full = tuple(fact.rows.rows if i == fact.rows.axis else s for i, s in enumerate(lo.shape))
    return np.sum(np.broadcast_to(steps, full), axis=fact.dims)


def exact_total(fact: Aggregate, plan: Plan, values: np.ndarray) -> np.ndarray:
    """The exact integers the noise is added to: sums on the grid (each element clamped to its
    bounds, then rounded) or a histogram's counts.

    Whatever the values, replacing one row moves this (L1) by at most `plan.sensitivity`: the
    noise is scaled for that bound, and the property tests hold it to it.
    """
    rows = fact.rows
    if fact.kind == "histogram":
        assert fact.edges is not None
        clamped = np.clip(np.clip(np.nan_to_num(values, nan=0.0), rows.lo, rows.hi), fact.edges[0], fact.edges[-1])
        return np.histogram(clamped.reshape(-1), bins=fact.edges)[0].astype(np.int64)
    if fact.kind == "count_nonzero":
        ints = (values != 0).astype(np.int64)
    else:
        lo, hi = _clamp_range(fact)
        clamped = np.clip(np.nan_to_num(values, nan=0.0), lo, hi)
        low, high = np.floor(lo / plan.grid), np.ceil(hi / plan.grid)
        ints = (np.clip(np.rint(clamped / plan.grid), low, high) - low).astype(np.int64)  # 0 ... width, per element
    return np.asarray(ints.sum(axis=fact.dims, dtype=np.int64))


def _like(live: Any, arr: np.ndarray) -> Any:
    """A released array in the type, dtype and shape the scientist's exact value has (all public)."""
    arr = np.asarray(arr)
    if isinstance(live, torch.Tensor):
        return torch.as_tensor(arr.reshape(tuple(live.shape))).to(live.dtype)
    if isinstance(live, np.ndarray):
        return arr.reshape(live.shape).astype(live.dtype)
    if isinstance(live, np.generic):
        return live.dtype.type(arr.reshape(()).item())
    if isinstance(live, bool):
        raise Unreleasable("a boolean cannot carry a noisy value")
    if isinstance(live, int):
        return int(round(float(arr.reshape(()).item())))
    if isinstance(live, float):
        return float(arr.reshape(()).item())
    raise Unreleasable(f"a {type(live).__name__} cannot carry a noisy value")


# -- quantiles ----------------------------------------------------------------------------------
REPLACED_ROW = 2  # replacing one row is one removal and one addition: symmetric distance 2


def _quantile_measurement(fact: Aggregate, scale: float) -> Any:
    dp = _opendp()
    assert fact.candidates is not None
    return dp.m.make_private_quantile(
        dp.vector_domain(dp.atom_domain(T=float, nan=False), size=fact.rows.rows), dp.symmetric_distance(),
        dp.max_divergence(), candidates=[float(c) for c in fact.candidates], alpha=fact.alpha, scale=scale)


def _quantile_plan(fact: Aggregate, epsilon: float) -> Plan:
    c = fact.candidates
    if c is None or c.ndim != 1 or not 2 <= c.size <= MAX_CANDIDATES or not np.all(np.isfinite(c)) or not np.all(np.diff(c) > 0):
        raise Unreleasable(f"quantile candidates must be 2 to {MAX_CANDIDATES} increasing finite numbers")
    if not 0.0 <= fact.alpha <= 1.0:
        raise Unreleasable("q must be between 0 and 1")
    dp = _opendp()
    scale = dp.binary_search_param(lambda s: _quantile_measurement(fact, s), d_in=REPLACED_ROW, d_out=epsilon, T=float)
    return Plan("exponential mechanism (quantile over candidates)", epsilon, 1.0, REPLACED_ROW, float(scale), 1.0)


def _quantile(fact: Aggregate, plan: Plan, values: np.ndarray) -> float:
    rows = fact.rows
    clamped = np.clip(np.nan_to_num(values, nan=0.0), rows.lo, rows.hi).reshape(-1)
    meas = _quantile_measurement(fact, plan.scale)
    assert meas.map(REPLACED_ROW) <= plan.epsilon * (1 + 1e-9)
    return float(meas([float(v) for v in clamped]))
