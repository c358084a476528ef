"""What is known of a value from what the owner declared, never from the data: DP sensitivity.

A published tensor or array may declare bounds for each element of one row, and which axis
indexes the privacy unit (axis 0, one person per row, by default). A value computed from it keeps
a *fact* for as long as every step is one this module understands:

- `Rows`: a row-wise function of one asset. Slice i along `axis` depends only on the asset's slice
  i; every element lies in [lo, hi], from interval arithmetic on the declared bounds and public
  constants; it may hold NaN or not. It records how to compute itself again from the asset.
- `Aggregate`: a sum, nansum, mean or count of `Rows` over the unit axis (and maybe other axes),
  then a public affine map; or a histogram or a quantile. Its sensitivity follows from the
  bounds alone.

Neighbouring datasets differ in one slice along the unit axis (one row), replaced by any values
within the declared bounds; the number of rows is public, as every shape in Duet is. Two things
make the sensitivity hold whatever the bounds arithmetic gets wrong by a rounding: a release is
computed again from the published asset by replaying the recorded steps (never from the
scientist's object, which later writes may have changed), and every element is clamped to its
bounds before the exact integer sum (`duet.owner.privacy.mechanisms`). Only steps that keep slices
apart are recorded: elementwise functions, public constants that do not vary along the unit axis,
other rows of the same asset, basic indexing that keeps the unit axis whole, and reductions over
other axes. A constant that differs from row to row is refused, and so is selecting rows by
position: both would make the release depend on where a person's row sits, which is not a
declared fact.

Facts are dropped when their object is written in place (`ObjectTable.taint`), so a replay never
silently differs from what the pointer holds; anything this module does not know drops them too
(when in doubt, no fact), with the reason kept for the error a `dp=` release then raises.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ...wire import Ref

MAX_BOUND = 1e12  # larger declared bounds would leave too few bits for an exact integer sum
_UNARY_MONOTONE = frozenset("""
floor ceil round trunc rint fix sqrt exp expm1 exp2 log log2 log10 log1p sigmoid tanh relu clamp clamp_min
clamp_max neg pos sign float double long int short to astype nan_to_num deg2rad rad2deg
""".split())
_UNARY_EVEN = frozenset({"abs", "square"})
_PREDICATES = frozenset({"isnan", "isfinite", "isinf", "isposinf", "isneginf", "signbit"})
_COMPARISONS = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})
_LOGICAL = frozenset({"and", "or", "xor"})
_ARITH = frozenset({"add", "sub", "mul", "div"})
_EXTREMA = frozenset({"maximum", "minimum", "fmax", "fmin"})
_REDUCTIONS = frozenset({"sum", "nansum", "mean", "count_nonzero"})
_CASTS = frozenset({"float", "double", "to", "astype", "item"})
_SYNONYMS = {
    "absolute": "abs", "negative": "neg", "positive": "pos", "subtract": "sub", "multiply": "mul",
    "divide": "div", "true_divide": "div", "truediv": "div", "power": "pow", "clip": "clamp",
    "greater": "gt", "greater_equal": "ge", "less": "lt", "less_equal": "le", "equal": "eq",
    "not_equal": "ne", "and_": "and", "or_": "or", "logical_and": "and", "logical_or": "or",
    "logical_xor": "xor", "logical_not": "not", "invert": "not", "bitwise_not": "not",
    "bitwise_and": "and", "bitwise_or": "or", "bitwise_xor": "xor",
}
# Dotted prefixes whose last part is taken as the operation's name (never numpy.linalg.norm & co).
_PREFIXES = ("torch.", "numpy.", "operator.", "torch.nn.functional.")


# -- declared facts --------------------------------------------------------------------------
@dataclass(frozen=True)
class Declared:
    """What the owner declared of an asset: bounds of each element of one slice, and the unit axis."""

    lo: np.ndarray  # float64, the shape of one slice (the asset's shape with `axis` set to 1)
    hi: np.ndarray
    axis: int
    rows: int  # slices along the axis (public: the asset's shape)
    missing: bool = False  # values may be NaN (declared by the owner, checked against the data)

    def public(self) -> Dict[str, Any]:
        """What the listing shows: the bounds and the unit axis are the owner's declaration, not data."""
        return {"axis": self.axis, "lo": self.lo.reshape(-1).tolist(), "hi": self.hi.reshape(-1).tolist(),
                "slice_shape": list(self.lo.shape), "missing": self.missing}


def declare(value: Any, bounds: Any, axis: int = 0, missing: bool = False) -> Declared:
    """Check an owner's declaration against the value; ValueError (for the owner) if it does not hold.

    `bounds` is `(lo, hi)` with numbers or arrays broadcastable to one slice, or a list of
    `(lo, hi)` pairs, one per element of a slice's last axis (per column of a table). Values must
    be finite and within the bounds. `missing=True` declares that floating-point values may be NaN
    (missing entries); it is a public declaration, so without it NaN is refused.
    """
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().numpy()
    elif isinstance(value, np.ndarray):
        data = value
    else:
        raise TypeError("bounds can be declared for a tensor or an array (publish a table as an array, df.to_numpy())")
    if data.dtype.kind not in "biuf":
        raise TypeError(f"bounds need numbers; this value has dtype {data.dtype}")
    if data.ndim == 0:
        raise ValueError("bounds need at least one axis of rows")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -data.ndim <= axis < data.ndim:
        raise ValueError(f"privacy_axis must be an axis of this {data.ndim}-d value")
    axis %= data.ndim
    slice_shape = tuple(1 if i == axis else s for i, s in enumerate(data.shape))
    lo, hi = _bound_arrays(bounds, slice_shape)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("bounds must be finite numbers")
    if np.any(lo > hi):
        raise ValueError("each lower bound must be at most its upper bound")
    if np.any(np.abs(lo) > MAX_BOUND) or np.any(np.abs(hi) > MAX_BOUND):
        raise ValueError(f"bounds beyond ±{MAX_BOUND:g} are not supported; rescale the data")
    values = data.astype(np.float64, copy=False)
    if np.any(np.isinf(values)):
        raise ValueError("the value holds infinities; replace them before declaring bounds")
    present = ~np.isnan(values)
    if not missing and not np.all(present):
        raise ValueError("the value holds NaN (missing entries): declare missing=True (scientists are told that values "
                         "may be missing) or fill them first")
    if missing and data.dtype.kind != "f":
        raise ValueError("missing=True is for floating-point values (integers cannot be NaN)")
    outside = present & ((values < lo) | (values > hi))
    if np.any(outside):
        raise ValueError(f"{int(outside.sum())} value(s) lie outside the declared bounds; "
                         "clip the data first (for example np.clip) or widen the bounds")
    return Declared(lo=lo, hi=hi, axis=axis, rows=int(data.shape[axis]), missing=bool(missing))


def _bound_arrays(bounds: Any, slice_shape: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    if isinstance(bounds, (list, tuple)) and len(bounds) and all(isinstance(b, (list, tuple)) and len(b) == 2 for b in bounds) \
            and not (len(bounds) == 2 and all(_is_number(x) for x in bounds)):
        lo = np.array([float(b[0]) for b in bounds], dtype=np.float64)
        hi = np.array([float(b[1]) for b in bounds], dtype=np.float64)
    elif isinstance(bounds, (list, tuple)) and len(bounds) == 2:
        lo = np.asarray(bounds[0], dtype=np.float64)
        hi = np.asarray(bounds[1], dtype=np.float64)
    else:
        raise ValueError("bounds must be (lo, hi), or a list of (lo, hi) pairs, one per column")
    try:
        return (np.ascontiguousarray(np.broadcast_to(lo, slice_shape)),
                np.ascontiguousarray(np.broadcast_to(hi, slice_shape)))
    except ValueError:
        raise ValueError(f"bounds of shape {lo.shape} do not fit one slice of shape {slice_shape}") from None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


# -- recorded steps ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Step:
    """One recorded operation: `run(*args, **kwargs)`, where Step arguments are evaluated first."""

    run: Callable[..., Any]
    args: Tuple[Any, ...] = ()
    kwargs: Tuple[Tuple[str, Any], ...] = ()


def evaluate(step: Step, memo: Optional[Dict[int, Any]] = None) -> Any:
    """Compute a recorded value again (each shared step once)."""
    memo = {} if memo is None else memo
    key = id(step)
    if key not in memo:
        args = [evaluate(a, memo) if isinstance(a, Step) else a for a in step.args]
        kwargs = {k: evaluate(v, memo) if isinstance(v, Step) else v for k, v in step.kwargs}
        memo[key] = step.run(*args, **kwargs)
    return memo[key]


def _method(name: str) -> Callable[..., Any]:
    def call(receiver: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(receiver, name)(*args, **kwargs)

    call.__name__ = name
    return call


@dataclass(frozen=True, eq=False)
class SourceStep(Step):
    """Where a replay starts: the published asset."""

    asset: Any = field(default=None, repr=False)


def source_step(asset: Any) -> Step:
    """Read the published value afresh (a copy: replayed steps never touch the asset itself)."""

    def read() -> Any:
        v = asset.value
        return v.detach().clone() if isinstance(v, torch.Tensor) else np.array(v, copy=True)

    return SourceStep(read, asset=asset)


def _sources(step: Step, found: Dict[int, "SourceStep"]) -> Dict[int, "SourceStep"]:
    if isinstance(step, SourceStep):
        found[id(step)] = step
    for a in list(step.args) + [v for _k, v in step.kwargs]:
        if isinstance(a, Step):
            _sources(a, found)
    return found


def check_row_wise(rows: "Rows") -> None:
    """Defence in depth, before any release: replay the recorded steps on made-up data within the
    declared bounds, then with one row replaced; only that row's slice may change. Uses declared
    facts only (never the data), so the outcome is public; Refused if a step mixes rows that the
    rules above took for row-wise."""
    sources = list(_sources(rows.step, {}).values())
    if not sources or any(s.asset is not rows.asset for s in sources):
        raise Refused("the recorded steps do not start from this value's asset")
    declared = rows.asset.privacy
    value = rows.asset.value
    shape = tuple(int(d) for d in value.shape)
    n = shape[declared.axis]
    if n < 2:
        return
    rng = np.random.default_rng(0)
    lo = np.broadcast_to(declared.lo, shape)
    hi = np.broadcast_to(declared.hi, shape)
    base = lo + (hi - lo) * rng.random(shape)
    integral = not (value.is_floating_point() if isinstance(value, torch.Tensor) else value.dtype.kind == "f")
    if integral:
        base = np.clip(np.rint(base), np.ceil(lo), np.floor(hi))

    def as_asset(arr: np.ndarray) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.from_numpy(np.array(arr)).to(value.dtype)
        return np.array(arr).astype(value.dtype)

    def replay(arr: np.ndarray) -> np.ndarray:
        memo: Dict[int, Any] = {key: as_asset(arr) for key in (id(s) for s in sources)}
        out = evaluate(rows.step, memo)
        return out.detach().to(torch.float64).numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float64)

    with np.errstate(all="ignore"):
        before = replay(base)
        if tuple(before.shape) != rows.shape:
            raise Refused("the recorded steps do not give the recorded shape")
        for j in sorted({0, n // 2, n - 1}):
            other = base.copy()
            index = [slice(None)] * len(shape)
            index[declared.axis] = j
            fresh = lo + (hi - lo) * rng.random(shape)
            other[tuple(index)] = (np.clip(np.rint(fresh), np.ceil(lo), np.floor(hi)) if integral else fresh)[tuple(index)]
            after = replay(other)
            keep = np.ones(rows.rows, dtype=bool)
            keep[j] = False
            if not np.array_equal(np.compress(keep, before, axis=rows.axis), np.compress(keep, after, axis=rows.axis),
                                  equal_nan=True):
                raise Refused("the recorded steps let one row change others (a step mixes rows)")


# -- facts ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Rows:
    """A row-wise function of one asset, with bounds for each element of a slice."""

    asset: Any = field(repr=False)  # the store's Asset (identity: rows of two different assets never combine)
    axis: int
    shape: Tuple[int, ...]
    lo: np.ndarray  # float64, the shape of one slice (size 1 on `axis`)
    hi: np.ndarray
    nan: bool  # may hold NaN
    integral: bool  # holds integers only
    step: Step
    ops: Tuple[str, ...]
    # Zeros of one slice's shape and dtype, tensor or array as the value is: the same calls made on
    # it give each result's type, dtype and shape from public facts alone (never from the data).
    exemplar: Any

    @property
    def is_torch(self) -> bool:
        return isinstance(self.exemplar, torch.Tensor)

    @property
    def rows(self) -> int:
        return self.shape[self.axis]

    @property
    def slice_size(self) -> int:
        return int(self.lo.size)


@dataclass(frozen=True, eq=False)
class Aggregate:
    """An aggregate over the unit axis, then `value * scale + shift`; its sensitivity is from `rows`."""

    rows: Rows
    kind: str  # sum, nansum, mean, count_nonzero, histogram, quantile
    dims: Tuple[int, ...]  # axes of rows.shape summed over (the unit axis among them)
    scale: float = 1.0
    shift: float = 0.0
    edges: Optional[np.ndarray] = None  # histogram
    alpha: float = 0.5  # quantile
    candidates: Optional[np.ndarray] = None  # quantile
    ops: Tuple[str, ...] = ()
    form: Any = None  # a zero value of the released type, dtype and shape, made from the exemplar

    @property
    def count(self) -> int:
        """How many elements each output coordinate sums (a mean divides by it)."""
        return int(np.prod([self.rows.shape[d] for d in self.dims])) if self.dims else 1


Fact = Union[Rows, Aggregate]


def from_asset(asset: Any, declared: Declared) -> Rows:
    """The fact of a scientist's copy of a published asset with declared bounds."""
    value = asset.value
    if isinstance(value, torch.Tensor):
        floating = value.is_floating_point()
        exemplar: Any = torch.zeros(declared.lo.shape, dtype=value.dtype)
    else:
        floating = value.dtype.kind == "f"
        exemplar = np.zeros(declared.lo.shape, dtype=value.dtype)
    return Rows(asset=asset, axis=declared.axis, shape=tuple(int(s) for s in value.shape), lo=declared.lo, hi=declared.hi,
                nan=declared.missing, integral=not floating, step=source_step(asset), ops=(asset.name,), exemplar=exemplar)


def describe(fact: Optional[Fact], why: str) -> Dict[str, Any]:
    """What the scientist may know of a value's fact: all derived from declarations and public steps."""
    if fact is None:
        return {"available": False, "why": why or "no declared bounds reach this value"}
    rows = fact.rows if isinstance(fact, Aggregate) else fact
    bounds = [float(np.min(rows.lo)), float(np.max(rows.hi))] if rows.lo.size else None
    out: Dict[str, Any] = {"available": isinstance(fact, Aggregate), "asset": rows.asset.name,
                           "bounds": bounds, "may_be_nan": rows.nan}
    if isinstance(fact, Aggregate):
        out.update(kind=fact.kind)
    else:
        out["why"] = "a row-wise value: aggregate it over the rows (sum, mean, count, histogram, quantile) to release it with dp="
    return out


# -- deriving the fact of an action's result ---------------------------------------------------
class Refused(Exception):
    """This step keeps no fact; the message says why (shown when a dp= release is refused)."""


@dataclass(frozen=True)
class Arg:
    """One argument of an action, as facts see it."""

    fact: Optional[Fact]
    const: Any = None  # a public value (snapshotted), when fact is None

    @property
    def rows(self) -> Optional[Rows]:
        return self.fact if isinstance(self.fact, Rows) else None


_CONST_SCALARS = (type(None), bool, int, float, slice, type(Ellipsis), torch.dtype, np.dtype, str, np.number, np.bool_)


def derive(kind: str, name: str, pos: List[Arg], kw: Dict[str, Arg], fn: Any) -> Tuple[Optional[Fact], str]:
    """The fact of an action's result, or (None, why not). Called only when an input has a fact.

    Decided from public facts alone: the declared bounds, the public constants, and the same
    call made on bounds and on exemplars; never from the data or the live result.
    """
    try:
        op = canonical(kind, name)
        if op is None:
            raise Refused(f"{name} has no rule for bounds")
        label = (("dp." + name.rsplit(".", 1)[1]) if name.startswith("duet.owner.privacy.queries.") else name) \
            if kind == "func" else f".{name}"
        if ("inplace" in kw and kw["inplace"].const) or ("copy" in kw and kw["copy"].const is False):
            raise Refused(f"{label} in place keeps no bounds: use the version that returns a new value")
        call = _caller(kind, name, fn)
        if op == "getitem" and len(pos) == 2 and pos[0].rows is not None and pos[1].fact is None:
            _index(pos[0].rows, pos[1].const)  # refuse row selection before trying it on one row
        result = _on_exemplars(call, pos, kw, label)
        if any(isinstance(a.fact, Aggregate) for a in pos + list(kw.values())):
            return _on_aggregate(op, label, pos, kw, result), ""
        return _on_rows(op, kind, label, call, pos, kw, result), ""
    except Refused as exc:
        return None, str(exc)


def _on_exemplars(call: Callable[..., Any], pos: List[Arg], kw: Dict[str, Arg], label: str) -> Any:
    """The call made on zeros of the public shapes and dtypes: what the result's form will be."""

    def stand_in(a: Arg) -> Any:
        if isinstance(a.fact, Rows):
            return a.fact.exemplar.clone() if isinstance(a.fact.exemplar, torch.Tensor) else a.fact.exemplar.copy()
        if isinstance(a.fact, Aggregate):
            form = a.fact.form
            return form.clone() if isinstance(form, torch.Tensor) else (form.copy() if isinstance(form, np.ndarray) else form)
        return a.const

    with np.errstate(all="ignore"):
        try:
            return call(*[stand_in(a) for a in pos], **{k: stand_in(a) for k, a in kw.items()})
        except Exception as exc:
            raise Refused(f"{label} could not be followed ({type(exc).__name__})") from None


def canonical(kind: str, name: str) -> Optional[str]:
    """The operation's name with numpy's, torch's and Python's spellings made one."""
    if kind == "func":
        if name.startswith("duet.owner.privacy.queries."):
            return name.rsplit(".", 1)[1]
        if not any(name.startswith(p) and "." not in name[len(p):] for p in _PREFIXES):
            return None
        base = name.rsplit(".", 1)[1]
    elif kind == "method":
        base = name
    else:
        return None
    return _SYNONYMS.get(base, base)


def const_arg(value: Any) -> Arg:
    """A literal argument: plain numbers, dtypes, slices and lists or tuples of them are public constants.

    Frozen (deep-copied) here: the recorded step must replay exactly what the fact was derived
    from, so no object the scientist can still reach (a remote list changed later) may sit in it.
    """
    if _plain(value):
        return Arg(None, copy.deepcopy(value))
    raise Refused("an argument is neither a public constant nor a value with declared bounds")


def _plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _CONST_SCALARS):
        return True
    if isinstance(value, (tuple, list)) and depth < 4 and len(value) <= 20_001:
        return all(_plain(v, depth + 1) for v in value)
    return False


def public_arg(value: Any) -> Arg:
    """A public object (no lineage) used as a constant: snapshotted, so later changes to it do not matter."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.layout != torch.strided:
            raise Refused("a complex or sparse constant")
        return Arg(None, value.detach().clone())
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise Refused(f"a constant of dtype {value.dtype}")
        return Arg(None, value.copy())
    return const_arg(value)


def argument(value: Any, lookup: Callable[[int], Tuple[Optional[Fact], bool, Any]]) -> Arg:
    """One argument of an action as facts see it (Refused when it rules a fact out).

    `lookup(id)` gives a remote object's fact, whether it is private, and its value.
    """
    if isinstance(value, Ref):
        fact, private, live = lookup(value.id)
        if fact is not None:
            return Arg(fact)
        if private:
            raise Refused("it combines a private value that has no declared bounds")
        return public_arg(live)
    return const_arg(value)


# -- rows --------------------------------------------------------------------------------------
_IDENTITY = frozenset({"cpu", "contiguous", "clone", "detach", "copy"})
# Integers in, integers out (with integral constants): the exact-sum grid can then be 1.
_KEEPS_INTEGRAL = frozenset({"neg", "pos", "abs", "square", "pow", "clamp", "clamp_min", "clamp_max", "add", "sub", "mul",
                             "maximum", "minimum", "fmax", "fmin", "relu", "sign", "nan_to_num", "float", "double", "to",
                             "astype", "where", "sum", "nansum"}) | _IDENTITY
_MAKES_INTEGRAL = frozenset({"floor", "ceil", "rint", "fix", "trunc", "long", "int", "short", "count_nonzero"})


def _on_rows(op: str, kind: str, label: str, call: Callable[..., Any], pos: List[Arg], kw: Dict[str, Arg], result: Any) -> Fact:
    rows_args = [a.rows for a in pos + list(kw.values()) if a.rows is not None]
    first = rows_args[0]
    for other in rows_args[1:]:
        if other.asset is not first.asset:
            raise Refused(f"{label} combines rows of two assets ({first.asset.name}, {other.asset.name}); "
                           "their rows need not be the same people")
        if other.axis != first.axis or len(other.shape) != len(first.shape) or other.rows != first.rows:
            raise Refused(f"{label} combines values whose rows do not line up")
    for a in pos + list(kw.values()):
        if a.fact is None:
            _check_const_axis(a.const, first)
    step = Step(call, tuple(a.rows.step if a.rows is not None else a.const for a in pos),
                tuple((k, a.rows.step if a.rows is not None else a.const) for k, a in kw.items()))
    ops = tuple(dict.fromkeys(sum((r.ops for r in rows_args), ()) + (label,)))
    consts_integral = all(_integral_const(a.const) for a in pos + list(kw.values()) if a.fact is None)

    if op in _REDUCTIONS or op in ("histogram", "quantile"):
        return _reduction(op, label, pos, kw, step, ops, result)
    if op == "getitem":
        if len(pos) != 2 or pos[0].rows is None or pos[1].fact is not None or kw:
            raise Refused("indexing with a value that is not a plain constant")
        return _getitem(pos[0].rows, pos[1].const, step, ops, result)
    if op == "where":
        return _where(kind, pos, kw, first, step, ops, result, label)
    if op in _COMPARISONS or op in _PREDICATES:
        return _boolean(first, step, ops, result)
    if op in _LOGICAL or op == "not":
        if _dtype_kind(result) != "b" or any(a.rows is not None and not _is_bool_rows(a.rows) for a in pos):
            raise Refused(f"{label} on values that are not booleans")
        return _boolean(first, step, ops, result)
    if len(rows_args) > 1:
        if (op not in _ARITH and op not in _EXTREMA) or len(pos) != 2 or kw or pos[0].rows is None or pos[1].rows is None:
            raise Refused(f"{label} of two row-wise values has no rule for bounds")
        ra, rb = pos[0].rows, pos[1].rows
        lo, hi = _interval_binary(op, ra.lo, ra.hi, rb.lo, rb.hi, label)
        return _made(first, step, ops, result, lo, hi, nan=ra.nan or rb.nan,
                     integral=ra.integral and rb.integral and op != "div")

    # One row-wise operand; every other argument is a public constant.
    idx = next((i for i, a in enumerate(pos) if a.rows is not None), None)
    if idx is None:
        raise Refused(f"{label}: the value with bounds is passed by keyword")
    unary = op in _UNARY_MONOTONE or op in _UNARY_EVEN or op in _IDENTITY
    if not unary and op not in _ARITH and op not in _EXTREMA and op != "pow":
        raise Refused(f"{label} has no rule for bounds")
    if unary and idx != 0:
        raise Refused(f"{label}: the value with bounds is not the first argument")
    integral = (first.integral and consts_integral and op in _KEEPS_INTEGRAL) or op in _MAKES_INTEGRAL \
        or (op == "round" and len(pos) == 1 and not kw)
    if op in _UNARY_EVEN or (op == "pow" and idx == 0 and _even_power(pos, kw)):
        lo, hi = _interval_even(op, first.lo, first.hi, _power_of(pos, kw) if op == "pow" else None)
        return _made(first, step, ops, result, lo, hi, nan=first.nan, integral=integral)
    if op == "pow":
        _check_power(pos, kw, first, idx)
        integral = integral and idx == 0
    if op == "div" and idx != 0 and np.any((first.lo <= 0) & (first.hi >= 0)):
        raise Refused(f"{label} divides by a value whose bounds include 0")
    if op in _UNARY_MONOTONE and _dtype_kind(result) in "iu" and not _fits(first, result):
        raise Refused(f"{label}: values within the bounds would wrap around in {_np_dtype(result)}")
    lo, hi = _monotone(call, pos, kw, idx, first, (first.lo, first.hi))
    nan = first.nan
    if op == "nan_to_num":
        if first.nan:  # what a missing value becomes, found by the same call
            fill, _ = _monotone(call, pos, kw, idx, first, (np.full_like(first.lo, np.nan),) * 2)
            lo, hi = np.fmin(lo, fill), np.fmax(hi, fill)
        nan = False
    return _made(first, step, ops, result, lo, hi, nan=nan, integral=integral)


def _caller(kind: str, name: str, fn: Any) -> Callable[..., Any]:
    if kind == "method":
        return _method(name)
    return fn


def _dtype_kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool:
            return "b"
        return "f" if value.is_floating_point() else ("c" if value.is_complex() else "i")
    if isinstance(value, (np.ndarray, np.generic)):
        return value.dtype.kind
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int):
        return "i"
    if isinstance(value, float):
        return "f"
    return "?"


def _fits(rows: Rows, result: Any) -> bool:
    """Whether every value within the bounds keeps its integer part in the result's integer dtype."""
    info = np.iinfo(_np_dtype(result))
    return float(np.min(rows.lo, initial=0.0)) >= info.min and float(np.max(rows.hi, initial=0.0)) <= info.max


def _is_bool_rows(rows: Rows) -> bool:
    return rows.integral and float(np.min(rows.lo, initial=0.0)) >= 0 and float(np.max(rows.hi, initial=1.0)) <= 1


def _integral_const(c: Any) -> bool:
    if c is None or isinstance(c, (bool, str, torch.dtype, np.dtype, slice)):
        return True
    if isinstance(c, (int, np.integer)):
        return True
    if isinstance(c, (float, np.floating)):
        return float(c).is_integer()
    if isinstance(c, torch.Tensor):
        return not c.is_floating_point() or bool(torch.all(c == torch.round(c)))
    if isinstance(c, np.ndarray):
        return c.dtype.kind in "biu" or bool(np.all(c == np.round(c)))
    return False


def _check_const_axis(const: Any, rows: Rows) -> None:
    """A constant may not vary along the unit axis: each row would meet a different constant."""
    shape = getattr(const, "shape", None)
    if shape is None or not hasattr(const, "ndim"):
        return
    ndim = len(rows.shape)
    if const.ndim > ndim:
        raise Refused("a constant with more axes than the value would move the rows")
    covered = rows.axis - (ndim - const.ndim)
    if covered >= 0 and const.shape[covered] != 1:
        raise Refused("a constant that differs from row to row (removing one row would shift the rows after it)")


def _kw_or_pos(pos: List[Arg], kw: Dict[str, Arg], key: str, index: int, default: Any) -> Any:
    if key in kw:
        return kw[key].const
    if len(pos) > index and pos[index].fact is None:
        return pos[index].const
    return default


def _as_float64(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def _monotone(call: Callable[..., Any], pos: List[Arg], kw: Dict[str, Arg], idx: int, rows: Rows,
              bounds: Tuple[np.ndarray, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Apply the very same call to the lower and the upper bounds; for a function monotone in the
    row-wise operand (either way), the two results bracket every possible value."""
    outs = []
    for bound in bounds:
        value = torch.from_numpy(np.array(bound, dtype=np.float64)) if rows.is_torch else bound
        args = [value if i == idx else a.const for i, a in enumerate(pos)]
        kwargs = {k: a.const for k, a in kw.items()}
        with np.errstate(all="ignore"):
            try:
                outs.append(_as_float64(call(*args, **kwargs)))
            except Exception as exc:
                raise Refused(f"bounds could not be carried through ({type(exc).__name__})") from None
    return np.fmin(outs[0], outs[1]), np.fmax(outs[0], outs[1])


def _power_of(pos: List[Arg], kw: Dict[str, Arg]) -> Any:
    return _kw_or_pos(pos, kw, "exponent", 1, None)


def _even_power(pos: List[Arg], kw: Dict[str, Arg]) -> bool:
    if not pos or pos[0].rows is None:
        return False
    k = _power_of(pos, kw)
    return _is_number(k) and float(k).is_integer() and float(k) >= 0 and int(k) % 2 == 0


def _check_power(pos: List[Arg], kw: Dict[str, Arg], rows: Rows, idx: int) -> None:
    if idx == 0:
        k = _power_of(pos, kw)
        if not _is_number(k):
            raise Refused("a power whose exponent is not a number")
        k = float(k)
        if k.is_integer() and k >= 0:
            return  # odd powers are monotone
        if k > 0 and float(np.min(rows.lo, initial=0.0)) >= 0:
            return
        if k < 0 and float(np.min(rows.lo, initial=1.0)) > 0:
            return
        raise Refused("a fractional or negative power of a value whose bounds include 0 or negatives")
    base = pos[0].const
    if not _is_number(base) or float(base) <= 0:
        raise Refused("a power with a row-wise exponent needs a positive base")


def _interval_even(op: str, lo: np.ndarray, hi: np.ndarray, power: Any) -> Tuple[np.ndarray, np.ndarray]:
    def f(x: np.ndarray) -> np.ndarray:
        if op == "abs":
            return np.abs(x)
        k = 2 if op == "square" else int(power)
        return np.power(x, k)

    flo, fhi = f(lo), f(hi)
    new_hi = np.maximum(flo, fhi)
    new_lo = np.where(lo >= 0, flo, np.where(hi <= 0, fhi, 0.0))
    if op == "pow" and int(power) == 0:
        new_lo = new_hi = np.ones_like(lo)
    return new_lo, new_hi


def _interval_binary(op: str, alo: np.ndarray, ahi: np.ndarray, blo: np.ndarray, bhi: np.ndarray, label: str) -> Tuple[np.ndarray, np.ndarray]:
    if op == "add":
        return alo + blo, ahi + bhi
    if op == "sub":
        return alo - bhi, ahi - blo
    if op in ("maximum", "fmax"):
        return np.maximum(alo, blo), np.maximum(ahi, bhi)
    if op in ("minimum", "fmin"):
        return np.minimum(alo, blo), np.minimum(ahi, bhi)
    if op == "div" and np.any((blo <= 0) & (bhi >= 0)):
        raise Refused(f"{label} divides by a value whose bounds include 0")
    with np.errstate(all="ignore"):
        if op == "mul":
            c = [alo * blo, alo * bhi, ahi * blo, ahi * bhi]
        else:
            c = [alo / blo, alo / bhi, ahi / blo, ahi / bhi]
    return np.minimum.reduce(c), np.maximum.reduce(c)


def _made(first: Rows, step: Step, ops: Tuple[str, ...], result: Any, lo: Any, hi: Any, nan: bool,
          integral: bool, axis: Optional[int] = None) -> Rows:
    """A new Rows fact, once its shape, dtype and bounds are checked (`result`: the exemplar's result)."""
    axis = first.axis if axis is None else axis
    slice_shape = _shape_of(result)
    if slice_shape is None or len(slice_shape) <= axis or slice_shape[axis] != 1:
        raise Refused("the result does not keep the rows on one axis")
    try:
        lo = np.ascontiguousarray(np.broadcast_to(np.asarray(lo, dtype=np.float64), slice_shape))
        hi = np.ascontiguousarray(np.broadcast_to(np.asarray(hi, dtype=np.float64), slice_shape))
    except ValueError:
        raise Refused("the bounds do not fit the result's shape") from None
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise Refused("the bounds would not be finite (an overflow, a log of 0, a division by 0)")
    if np.any(np.abs(lo) > MAX_BOUND) or np.any(np.abs(hi) > MAX_BOUND):
        raise Refused(f"the bounds would exceed ±{MAX_BOUND:g}")
    kind = _dtype_kind(result)
    if kind not in "biuf":
        raise Refused("the result is not real numbers")
    if kind == "f" and _float_bits(result) < 32:
        raise Refused("half-precision results lose too much to keep bounds")
    if kind in "iu":
        info = np.iinfo(_np_dtype(result))
        if float(np.min(lo, initial=0.0)) < info.min or float(np.max(hi, initial=0.0)) > info.max:
            raise Refused(f"the values may overflow {_np_dtype(result)}")
        integral = True
    if kind == "b":
        lo, hi, integral = np.clip(lo, 0, 1), np.clip(hi, 0, 1), True
    if kind in "biu":
        nan = False
    shape = tuple(first.rows if i == axis else s for i, s in enumerate(slice_shape))
    return Rows(asset=first.asset, axis=axis, shape=shape, lo=lo, hi=hi, nan=nan, integral=integral, step=step, ops=ops,
                exemplar=result)


def _shape_of(value: Any) -> Optional[Tuple[int, ...]]:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return tuple(int(s) for s in value.shape)
    return None


def _np_dtype(value: Any) -> np.dtype:
    if isinstance(value, torch.Tensor):
        return torch.empty(0, dtype=value.dtype).numpy().dtype
    return np.asarray(value).dtype


def _float_bits(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return torch.finfo(value.dtype).bits
    return int(np.asarray(value).dtype.itemsize * 8)


def _boolean(first: Rows, step: Step, ops: Tuple[str, ...], result: Any) -> Rows:
    return _made(first, step, ops, result, 0.0, 1.0, nan=False, integral=True)


def _where(kind: str, pos: List[Arg], kw: Dict[str, Arg], first: Rows, step: Step, ops: Tuple[str, ...], result: Any,
           label: str) -> Rows:
    if kw:
        raise Refused(f"{label} with keyword arguments")
    if kind == "method":  # x.where(cond, other): x where cond, else other
        if len(pos) != 3:
            raise Refused(f"{label}: unexpected arguments")
        choices = [pos[0], pos[2]]
    else:
        if len(pos) != 3:
            raise Refused(f"{label} needs a condition and two choices")
        choices = [pos[1], pos[2]]
    los, his, nan, integral = [], [], False, True
    for c in choices:
        if c.rows is not None:
            los.append(c.rows.lo)
            his.append(c.rows.hi)
            nan = nan or c.rows.nan
            integral = integral and c.rows.integral
        else:
            v = _as_float64(c.const)
            if not np.all(np.isfinite(v)):
                raise Refused(f"{label} with a constant that is not finite")
            los.append(v)
            his.append(v)
            integral = integral and _integral_const(c.const)
    lo = np.minimum(*np.broadcast_arrays(los[0], los[1]))
    hi = np.maximum(*np.broadcast_arrays(his[0], his[1]))
    return _made(first, step, ops, result, lo, hi, nan=nan, integral=integral)


def _index(rows: Rows, key: Any) -> Tuple[Tuple[Any, ...], int]:
    """A basic index made explicit (one entry per axis, plus new axes), and where the unit axis goes.

    Refused unless it keeps the unit axis whole: columns, ranges of other axes and new axes only.
    """
    key = key if isinstance(key, tuple) else (key,)
    ndim = len(rows.shape)
    if sum(1 for k in key if k is Ellipsis) > 1:
        raise Refused("indexing with more than one ...")
    used = sum(1 for k in key if k is not None and k is not Ellipsis)
    expanded: List[Any] = []
    for k in key:
        if k is Ellipsis:
            expanded.extend([slice(None)] * (ndim - used))
        else:
            expanded.append(k)
    real = [k for k in expanded if k is not None]
    if len(real) > ndim:
        raise Refused("indexing with more indices than axes")
    expanded += [slice(None)] * (ndim - len(real))
    dim, new_axis, out_dim = 0, None, 0
    for k in expanded:
        if k is None:
            out_dim += 1
            continue
        if isinstance(k, bool) or not isinstance(k, (int, np.integer, slice)):
            raise Refused("indexing with arrays, masks or lists selects rows; only plain ints and slices keep bounds")
        if dim == rows.axis:
            if not (isinstance(k, slice) and k.step in (None, 1) and k.start in (None, 0)
                    and (k.stop is None or (isinstance(k.stop, int) and k.stop >= rows.rows))):
                raise Refused("indexing that selects rows (the privacy unit) keeps no bounds: "
                              "aggregate over all rows instead (use where() to leave some out)")
            new_axis = out_dim
        if not isinstance(k, (int, np.integer)):
            out_dim += 1
        dim += 1
    assert new_axis is not None
    return tuple(expanded), new_axis


def _getitem(rows: Rows, key: Any, step: Step, ops: Tuple[str, ...], result: Any) -> Rows:
    """Basic indexing that keeps the unit axis whole: columns, ranges of other axes, new axes."""
    expanded, new_axis = _index(rows, key)
    lo = np.asarray(rows.lo)[expanded]
    hi = np.asarray(rows.hi)[expanded]
    return _made(rows, step, ops, result, lo, hi, nan=rows.nan, integral=rows.integral, axis=new_axis)


def _dims_of(pos: List[Arg], kw: Dict[str, Arg], ndim: int, op: str) -> Tuple[Tuple[int, ...], bool]:
    allowed = {"dim", "axis", "keepdim", "keepdims", "dtype"}
    if any(k not in allowed for k in kw) or len(pos) > 2 or any(a.fact is not None for a in pos[1:]) \
            or any(a.fact is not None for a in kw.values()):
        raise Refused(f"{op} with arguments that have no rule for bounds")
    dim = pos[1].const if len(pos) > 1 else (kw["dim"].const if "dim" in kw else (kw["axis"].const if "axis" in kw else None))
    keep = kw.get("keepdim") or kw.get("keepdims")
    keepdim = bool(keep.const) if keep is not None else False
    if dim is None:
        return tuple(range(ndim)), keepdim
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if not dims:  # torch reads no axes as all of them, numpy as none: no safe reading
        raise Refused(f"{op} over an empty list of axes")
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and -ndim <= d < ndim for d in dims):
        raise Refused(f"{op} over axes that are not plain ints")
    return tuple(sorted({int(d) % ndim for d in dims})), keepdim


def _reduction(op: str, label: str, pos: List[Arg], kw: Dict[str, Arg], step: Step, ops: Tuple[str, ...],
               result: Any) -> Fact:
    if not pos or pos[0].rows is None:
        raise Refused(f"{label}: the value with bounds is not the first argument")
    rows = pos[0].rows
    if op == "histogram":
        return _histogram(rows, pos, kw, ops, result)
    if op == "quantile":
        return _quantile(rows, pos, kw, ops, result)
    dims, keepdim = _dims_of(pos, kw, len(rows.shape), label)
    if rows.axis in dims:
        if op in ("sum", "mean") and rows.nan:
            raise Refused(f"{label} of values that may be missing (NaN): use nansum, or nan_to_num first")
        if op == "mean" and _dtype_kind(result) != "f":
            raise Refused(f"{label} whose result is not floating point")
        if _dtype_kind(result) not in "iuf":
            raise Refused(f"{label}: an unexpected result")
        return Aggregate(rows=rows, kind=op, dims=dims, ops=ops, form=result)
    # Over other axes only: still one value per row.
    nan = rows.nan
    if op == "count_nonzero":
        k = float(np.prod([rows.shape[d] for d in dims]))
        lo = np.zeros_like(np.sum(rows.lo, axis=dims, keepdims=True))
        hi, integral, nan = lo + k, True, False
    else:
        lo_src, hi_src = rows.lo, rows.hi
        if op == "nansum":  # a missing value counts as 0
            lo_src, hi_src, nan = np.minimum(lo_src, 0.0), np.maximum(hi_src, 0.0), False
        reduce = np.mean if op == "mean" else np.sum
        lo, hi = reduce(lo_src, axis=dims, keepdims=True), reduce(hi_src, axis=dims, keepdims=True)
        integral = rows.integral and op != "mean"
    if not keepdim:
        lo, hi = np.squeeze(lo, axis=dims), np.squeeze(hi, axis=dims)
    new_axis = rows.axis if keepdim else rows.axis - sum(1 for d in dims if d < rows.axis)
    return _made(rows, step, ops, result, lo, hi, nan=nan, integral=integral, axis=new_axis)


def _histogram(rows: Rows, pos: List[Arg], kw: Dict[str, Arg], ops: Tuple[str, ...], result: Any) -> Aggregate:
    if rows.nan:
        raise Refused("a histogram of values that may be missing (NaN): use nan_to_num first")
    edges = _kw_or_pos(pos, kw, "edges", 1, None)
    if edges is None or not isinstance(result, tuple) or len(result) != 2:
        raise Refused("a histogram needs explicit bin edges")
    e = np.asarray(edges, dtype=np.float64)
    return Aggregate(rows=rows, kind="histogram", dims=tuple(range(len(rows.shape))), edges=e, ops=ops, form=result)


def _quantile(rows: Rows, pos: List[Arg], kw: Dict[str, Arg], ops: Tuple[str, ...], result: Any) -> Aggregate:
    if rows.nan:
        raise Refused("a quantile of values that may be missing (NaN): use nan_to_num first")
    if rows.slice_size != 1:
        raise Refused("a quantile needs one value per row; select a column first")
    q = _kw_or_pos(pos, kw, "q", 1, None)
    candidates = _kw_or_pos(pos, kw, "candidates", 2, None)
    if not _is_number(q) or candidates is None:
        raise Refused("a quantile needs q and candidate values")
    return Aggregate(rows=rows, kind="quantile", dims=tuple(range(len(rows.shape))), alpha=float(q),
                     candidates=np.asarray(candidates, dtype=np.float64), ops=ops, form=result)


# -- aggregates --------------------------------------------------------------------------------
def _on_aggregate(op: str, label: str, pos: List[Arg], kw: Dict[str, Arg], result: Any) -> Aggregate:
    """After an aggregate: only a public affine map (times, plus, a cast); anything else after the release."""
    facts = [a for a in pos + list(kw.values()) if a.fact is not None]
    if len(facts) != 1 or not isinstance(facts[0].fact, Aggregate):
        raise Refused(f"{label} combines an aggregate with another private value; release them one by one")
    agg: Aggregate = facts[0].fact
    if agg.kind in ("histogram", "quantile"):
        raise Refused(f"{label} after a {agg.kind}: apply it to the released value instead")
    ops = agg.ops + (label,)
    if op in _CASTS:
        if op == "item" and _size_of(result) != 1:
            raise Refused(f"{label} of more than one value")
        if _dtype_kind(result) != "f" and not (op in ("to", "astype") and _dtype_kind(result) in "iu" and agg.kind != "mean"):
            raise Refused(f"{label} to a type that is not floating point")
        return replace(agg, ops=ops, form=result)
    if op in ("neg", "pos") and len(pos) == 1 and not kw:
        sign = -1.0 if op == "neg" else 1.0
        return replace(agg, scale=agg.scale * sign, shift=agg.shift * sign, ops=ops, form=result)
    if op in _ARITH and len(pos) == 2 and not kw:
        idx = 0 if pos[0].fact is not None else 1
        c = pos[1 - idx].const
        if isinstance(c, torch.Tensor) and c.numel() == 1 and not c.is_complex():
            c = c.item()
        elif isinstance(c, np.ndarray) and c.size == 1 and c.dtype.kind in "biuf":
            c = c.reshape(-1)[0].item()
        if not _is_number(c) or not math.isfinite(float(c)):
            raise Refused(f"{label}: only a public number may scale or shift an aggregate")
        c = float(c)
        if _dtype_kind(result) != "f":
            raise Refused(f"{label} of an aggregate whose result is not floating point")
        if op == "add":
            return replace(agg, shift=agg.shift + c, ops=ops, form=result)
        if op == "sub":
            if idx == 0:
                return replace(agg, shift=agg.shift - c, ops=ops, form=result)
            return replace(agg, scale=-agg.scale, shift=c - agg.shift, ops=ops, form=result)
        if op == "mul":
            return replace(agg, scale=agg.scale * c, shift=agg.shift * c, ops=ops, form=result)
        if op == "div" and idx == 0 and c != 0:
            return replace(agg, scale=agg.scale / c, shift=agg.shift / c, ops=ops, form=result)
    raise Refused(f"{label} after an aggregate has no rule for sensitivity: release first, then compute "
                   "(anything done to a released value costs no privacy)")


def _size_of(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.numel())
    if isinstance(value, np.ndarray):
        return int(value.size)
    return 1


def form_agrees(fact: Fact, live: Any) -> bool:
    """Whether the live result has exactly the type, dtype and shape the fact predicted from exemplars."""
    if isinstance(fact, Rows):
        predicted: Any = fact.exemplar
        shape: Any = fact.shape
    else:
        predicted, shape = fact.form, _form_shape(fact.form)
    return _form(live) == _form(predicted, shape)


def _form_shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, (torch.Tensor, np.ndarray)) else None


def _form(value: Any, shape: Any = None) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(shape if shape is not None else value.shape), value.dtype)
    if isinstance(value, np.ndarray):
        return ("ndarray", tuple(shape if shape is not None else value.shape), value.dtype.str)
    if isinstance(value, np.generic):
        return ("generic", value.dtype.str)
    if isinstance(value, tuple):
        return ("tuple", tuple(_form(v) for v in value))
    return (type(value).__name__,)


def check_sources(fact: Fact, store: Any) -> None:
    """The assets a fact reads must still be published, as they were (raises NotAllowed-worthy ValueError)."""
    rows = fact.rows if isinstance(fact, Aggregate) else fact
    name = rows.asset.name
    if name not in store or store.get(name) is not rows.asset:
        raise LookupError(f"asset {name!r} was removed or replaced since this value was computed")
