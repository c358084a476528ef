"""Statistics a scientist asks for by name (`scientist.dp.histogram`, `scientist.dp.quantile`).

Each computes the exact value on the owner, like any action: its pointer is private, and
`.get(dp=epsilon)` releases a noisy version computed again from the published asset
(`duet.owner.privacy.mechanisms`). Arguments are public constants chosen by the scientist: bin
edges and quantile candidates never come from the data.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np
import torch

from .mechanisms import MAX_BINS, MAX_CANDIDATES


def _increasing(values: Sequence[float], what: str, limit: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or not 2 <= arr.size <= limit or not np.all(np.isfinite(arr)) or not np.all(np.diff(arr) > 0):
        raise ValueError(f"{what} must be 2 to {limit} increasing finite numbers")
    return arr


def _check_input(x: Any) -> None:
    if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.dtype in _INTS):
        return
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
        return
    raise TypeError("a histogram or quantile takes a tensor or an array of numbers")


_INTS = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def histogram(x: Any, edges: Sequence[float]) -> Tuple[Any, Any]:
    """Counts of x's elements per bin; values beyond the outer edges count in the outer bins.

    Tensor operations only (no value is read back into Python), so the shadow run predicts the
    result's shape and nothing here can steer what is written.
    """
    _check_input(x)
    e = _increasing(edges, "bin edges", MAX_BINS + 1)
    if isinstance(x, np.ndarray):
        return np.histogram(np.clip(x.astype(np.float64).reshape(-1), e[0], e[-1]), bins=e)[0].astype(np.int64), e
    te = torch.tensor(e.tolist(), dtype=torch.float64, device=x.device)  # meta in a shadow run, like the input
    v = x.detach().to(torch.float64).reshape(-1).clamp(float(e[0]), float(e[-1]))
    idx = torch.bucketize(v, te[1:-1], right=True)
    counts = torch.zeros(len(e) - 1, dtype=torch.int64, device=v.device).scatter_add_(0, idx, torch.ones_like(idx))
    return counts, te


def quantile(x: Any, q: float, candidates: Sequence[float]) -> Any:
    """The exact q-quantile of x's elements, interpolated linearly (its noisy release picks one of `candidates`)."""
    _check_input(x)
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1:
        raise ValueError("q must be a number between 0 and 1")
    _increasing(candidates, "candidates", MAX_CANDIDATES)
    if isinstance(x, np.ndarray):
        return np.float64(np.quantile(x.astype(np.float64).reshape(-1), q))
    v = x.detach().to(torch.float64).reshape(-1).sort().values
    n = v.shape[0]
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    pos = q * (n - 1)
    low = int(pos)
    high = min(low + 1, n - 1)
    return v[low] + (v[high] - v[low]) * (pos - low)
