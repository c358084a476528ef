"""pandas on the owner: published DataFrames and a small allowlisted set of their operations.

Optional: nothing here imports pandas. An object can only be a DataFrame if
pandas is already loaded, so every check first looks at `sys.modules`.

What is public and what is not, as for tensors: a published frame's column
names, dtypes and shape are public (the listing shows them); its values and
its index are not. Only bool and numeric numpy columns are published: object,
string, categorical, datetime and nullable extension columns are refused.

How operations stay within the rules:

- **Names.** Only the methods of `duet.allowlist.PANDAS_METHODS` run, and
  `operator.getitem` of column names. Every argument is a plain literal sent
  with the call (no remote object, so no callable and no private value) and is
  checked here against the method's own list of keywords: no ``inplace``, no
  callables, no code strings; aggregations are names from `AGGREGATIONS`
  (pandas resolves such names by getattr, so nothing else may reach it).
- **No sharing.** Every pandas result is a deep copy, and ``to_numpy`` always
  copies, so no two objects a scientist holds share pandas memory. Nothing on
  the list writes into a frame, and pandas objects cannot be passed to any
  other function, so lineage never has to track writes into one.
- **Lineage.** A frame is data, like a tensor: results take the lineage of
  the frame they were computed from. Their metadata is public only when it is
  a function of public facts, checked like a shadow run: the same operation is
  run on a frame of zeros with the same columns, dtypes and length, and only
  for operations whose result structure depends on no value (`PREDICTED`).
  ``groupby(...).agg`` and ``value_counts`` have as many rows as there are
  groups or distinct values: their shape stays private, and so do the types of
  scalar results.
"""
from __future__ import annotations

import operator
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .. import containers, wire_frames
from ..errors import NotAllowed, ProtocolError
from ..wire import Ref

PUBLISHABLE_KINDS = ("DataFrame", "Series")
AGGREGATIONS = frozenset("count max mean median min nunique prod sem size std sum var".split())
_INTERPOLATIONS = frozenset("linear lower higher midpoint nearest".split())
_NUMERIC = frozenset("bool uint8 int8 int16 int32 int64 float16 float32 float64 complex64 complex128".split())
_MAX_LIST = 100  # percentiles, quantiles, columns of a key
_MAX_COLUMNS = 4096


def _pandas() -> Any:
    return sys.modules.get("pandas")


def kind(value: Any) -> Optional[str]:
    """'DataFrame', 'Series' or 'GroupBy' for exactly those types, else None (cheap when pandas is absent)."""
    pd = _pandas()
    if pd is None:
        return None
    t = type(value)
    if t is pd.DataFrame:
        return "DataFrame"
    if t is pd.Series:
        return "Series"
    if t is GroupBy:
        return "GroupBy"
    return None


# -- publishing ------------------------------------------------------------------------
def check_publishable(value: Any) -> None:
    """A DataFrame or Series an owner may publish: unique str column names, bool or numeric columns."""
    if kind(value) not in PUBLISHABLE_KINDS:
        raise TypeError(f"cannot publish a {type(value).__name__} as a frame")
    columns = [value] if kind(value) == "Series" else [value[c] for c in _unique_str_columns(value)]
    for col in columns:
        dt = col.dtype
        if isinstance(dt, np.dtype) and (dt.kind == "c" or dt == np.float16):
            raise TypeError(
                f"cannot publish column {col.name!r} of dtype {dt}: pandas picks the dtype of some results "
                "from the values there (whether any is missing); convert it with .astype('float64')")
        if not isinstance(dt, np.dtype) or dt.kind not in "biufc":
            raise TypeError(
                f"cannot publish column {col.name!r} of dtype {dt}: only bool and numeric columns "
                "(publish categories as integer codes, e.g. df['sex'].cat.codes, and dates as numbers)")
    try:
        wire_frames.check(value)
    except ProtocolError as exc:
        raise TypeError(f"cannot publish this {kind(value)}: {exc}; e.g. df.reset_index(drop=True)") from None


def _unique_str_columns(df: Any) -> List[str]:
    labels = list(df.columns)
    if any(type(c) is not str for c in labels):
        raise TypeError("cannot publish a DataFrame whose column names are not all str: df.columns = df.columns.astype(str)")
    if len(set(labels)) != len(labels):
        raise TypeError("cannot publish a DataFrame with duplicate column names")
    if len(labels) > _MAX_COLUMNS:
        raise TypeError(f"cannot publish a DataFrame with more than {_MAX_COLUMNS} columns")
    return labels


def listing(value: Any) -> Dict[str, Any]:
    """What the store listing adds for a frame: column names and dtypes (public, like a tensor's dtype)."""
    k = kind(value)
    if k not in PUBLISHABLE_KINDS:
        return {}
    pairs = [[value.name, str(value.dtype)]] if k == "Series" else [[c, str(d)] for c, d in value.dtypes.items()]
    return {"columns": pairs, "dtype": ", ".join(f"{c}: {d}" for c, d in pairs)}


def copy(value: Any) -> Any:
    """A deep copy: each scientist works on their own, and a release is a snapshot."""
    return value.copy(deep=True)


def snapshot(value: Any) -> Any:
    if kind(value) == "GroupBy":
        raise NotAllowed("a groupby cannot be released; release an aggregate of it, e.g. .agg('mean')")
    return copy(value)


def size_of(value: Any) -> Tuple[int, int]:
    """(numel, nbytes) of a frame as a release counts it: every value, index entry and name."""
    if kind(value) == "GroupBy":
        value = value.frame
    index = value.index
    names = [value.name] if kind(value) == "Series" else list(value.columns)
    name_chars = sum(len(str(n)) for n in names if n is not None) + len(str(index.name or ""))
    numel = int(np.prod(value.shape)) + len(index) + name_chars
    nbytes = int(np.sum(value.memory_usage(index=True, deep=True))) + name_chars  # (an int for a Series)
    return max(numel, 1), nbytes


# -- results ------------------------------------------------------------------------------
def make_safe(value: Any, op: str) -> Any:
    """A result the owner keeps: a deep copy of a frame that could travel, or a GroupBy."""
    if kind(value) == "GroupBy":
        return value
    try:
        wire_frames.check(value)
    except ProtocolError as exc:
        raise NotAllowed(f"{op} returned a {kind(value)} that cannot be kept: {exc}") from None
    return copy(value)


def describe(value: Any) -> Tuple[Any, ...]:
    """The structure of a frame without its values: kind, shape, names, dtypes, the index's type and length."""
    k = kind(value)
    if k == "GroupBy":
        return ("pandas.GroupBy", value.by, value.options, value.selection, describe(value.frame))
    idx = value.index
    index = (type(idx).__name__, str(idx.dtype), len(idx), _label(idx.name))
    if k == "Series":
        return ("pandas.Series", tuple(value.shape), _label(value.name), str(value.dtype), index)
    return ("pandas.DataFrame", tuple(value.shape), tuple(_label(c) for c in value.columns),
            tuple(str(d) for d in value.dtypes), index)


def _label(name: Any) -> Tuple[str, Any]:
    plain = name if name is None or type(name) in (str, bool, int, float) else repr(type(name))
    return (type(name).__name__, plain)


# -- the groupby object -----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GroupBy:
    """A frame grouped by column names: a recipe, grouped anew by each aggregation.

    Held instead of pandas's own groupby object, whose many methods and caches
    would all have to be reviewed; it never changes and counts its frame's memory.
    """

    frame: Any
    by: Any  # a column name, or a tuple of them
    options: Tuple[Tuple[str, bool], ...]
    selection: Any = None  # a column name, or a tuple of them

    def grouped(self) -> Any:
        g = self.frame.groupby(_as_list(self.by), **dict(self.options))
        return g if self.selection is None else g[_as_list(self.selection)]

    def __getitem__(self, key: Any) -> "GroupBy":
        if self.selection is not None:
            raise NotAllowed("columns of a groupby are selected once")
        return GroupBy(self.frame, self.by, self.options, _frozen(key))

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + int(np.sum(self.frame.memory_usage(index=True, deep=True)))

    def __repr__(self) -> str:
        return f"GroupBy(by={self.by!r}, selection={self.selection!r})"


def _frozen(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _as_list(key: Any) -> Any:
    return list(key) if isinstance(key, tuple) else key


# -- argument checks --------------------------------------------------------------------
Check = Callable[[Any, Any, str], None]  # (receiver, value, what) -> raises NotAllowed


def _bool(receiver: Any, v: Any, what: str) -> None:
    if type(v) is not bool:
        raise NotAllowed(f"{what} must be True or False")


def _ddof(receiver: Any, v: Any, what: str) -> None:
    if type(v) is not int or not 0 <= v <= 1_000_000:
        raise NotAllowed(f"{what} must be an int from 0 to 1000000")


def _min_count(receiver: Any, v: Any, what: str) -> None:
    _ddof(receiver, v, what)


def _prob(v: Any) -> bool:
    return type(v) in (int, float) and 0 <= v <= 1


def _probs(receiver: Any, v: Any, what: str) -> None:
    if _prob(v) or (type(v) is list and 0 < len(v) <= _MAX_LIST and all(map(_prob, v))):
        return
    raise NotAllowed(f"{what} must be a number from 0 to 1, or a list of up to {_MAX_LIST} of them")


def _prob_list(receiver: Any, v: Any, what: str) -> None:
    if type(v) is not list:
        raise NotAllowed(f"{what} must be a list of numbers from 0 to 1")
    _probs(receiver, v, what)


def _interpolation(receiver: Any, v: Any, what: str) -> None:
    if v not in _INTERPOLATIONS or type(v) is not str:
        raise NotAllowed(f"{what} must be one of {', '.join(sorted(_INTERPOLATIONS))}")


def _dtype(receiver: Any, v: Any, what: str) -> None:
    if v is None or (type(v) is str and v in _NUMERIC):
        return
    if isinstance(v, np.dtype) and v.name in _NUMERIC:
        return
    raise NotAllowed(f"{what} must be a numeric dtype name, e.g. 'float32'")


def _columns_of(receiver: Any) -> List[str]:
    frame = receiver.frame if kind(receiver) == "GroupBy" else receiver
    return list(frame.columns)


def _column_key(receiver: Any, v: Any, what: str) -> None:
    """A column name, or a list of distinct ones, all in the frame."""
    names = [v] if type(v) is str else v
    if type(names) is not list or not names or len(names) > _MAX_COLUMNS or any(type(n) is not str for n in names):
        raise NotAllowed(f"{what} must be a column name or a non-empty list of column names")
    if len(set(names)) != len(names):
        raise NotAllowed(f"{what} names a column twice")
    known = set(_columns_of(receiver))
    missing = [n for n in names if n not in known]
    if missing:
        raise NotAllowed(f"{what}: no column named {missing[0]!r}")


def _aggregation(receiver: Any, v: Any, what: str) -> None:
    """An aggregation name, or (grouping whole columns) a dict of column name to aggregation name."""
    if type(v) is str and v in AGGREGATIONS:
        return
    if type(v) is dict and v and kind(receiver) == "GroupBy" and not isinstance(receiver.selection, str):
        _column_key(receiver, list(v), what)
        if all(type(a) is str and a in AGGREGATIONS for a in v.values()):
            return
    raise NotAllowed(f"{what} must be one of {', '.join(sorted(AGGREGATIONS))}, or a dict of column name to one "
                     "of them (functions and lists of aggregations are not allowed)")


@dataclass(frozen=True)
class Spec:
    """The arguments one pandas method may take, by position and by keyword."""

    positional: Tuple[str, ...] = ()
    keywords: Tuple[Tuple[str, Check], ...] = ()
    required: Tuple[str, ...] = ()

    def check(self, receiver: Any, label: str, args: List[Any], kwargs: Dict[str, Any]) -> None:
        if len(args) > len(self.positional):
            raise NotAllowed(f"{label} takes at most {len(self.positional)} positional arguments")
        allowed = dict(self.keywords)
        given = dict(zip(self.positional, args))
        for k, v in kwargs.items():
            if k in given:
                raise NotAllowed(f"{label} got {k!r} twice")
            given[k] = v
        for k, v in given.items():
            check = allowed.get(k) if type(k) is str else None
            if check is None:
                hint = " (nothing on the owner changes in place)" if k == "inplace" else ""
                raise NotAllowed(f"{label}: keyword argument {k!r} is not allowed{hint}")
            check(receiver, v, f"{label}: {k!r}")
        for k in self.required:
            if k not in given:
                raise NotAllowed(f"{label} needs {k!r}")


def _spec(*keywords: str, positional: Tuple[str, ...] = (), required: Tuple[str, ...] = ()) -> Spec:
    return Spec(positional, tuple((k, _CHECKS[k]) for k in keywords + positional), required)


_CHECKS: Dict[str, Check] = {
    "skipna": _bool, "numeric_only": _bool, "dropna": _bool, "normalize": _bool, "sort": _bool,
    "ascending": _bool, "as_index": _bool, "ddof": _ddof, "min_count": _min_count, "q": _probs,
    "percentiles": _prob_list, "interpolation": _interpolation, "dtype": _dtype, "by": _column_key,
    "func": _aggregation,
}

_REDUCE = _spec("skipna", "numeric_only")
_FRAME_SPECS: Dict[str, Spec] = {
    "describe": _spec("percentiles"),
    "count": _spec("numeric_only"),
    "mean": _REDUCE, "median": _REDUCE, "min": _REDUCE, "max": _REDUCE,
    "sum": _spec("skipna", "numeric_only", "min_count"),
    "std": _spec("skipna", "numeric_only", "ddof"), "var": _spec("skipna", "numeric_only", "ddof"),
    "nunique": _spec("dropna"),
    "quantile": _spec("interpolation", "numeric_only", positional=("q",)),
    "groupby": _spec("as_index", "sort", "dropna", positional=("by",), required=("by",)),
    "to_numpy": _spec("dtype"),
}
_SERIES_SPECS: Dict[str, Spec] = {
    "describe": _spec("percentiles"),
    "count": _spec(),
    "mean": _spec("skipna"), "median": _spec("skipna"), "min": _spec("skipna"), "max": _spec("skipna"),
    "sum": _spec("skipna", "min_count"), "std": _spec("skipna", "ddof"), "var": _spec("skipna", "ddof"),
    "nunique": _spec("dropna"),
    "quantile": _spec("interpolation", positional=("q",)),
    "value_counts": _spec("normalize", "sort", "ascending", "dropna"),
    "to_numpy": _spec("dtype"),
}
_GROUP_REDUCE = _spec("numeric_only")
_GROUPBY_SPECS: Dict[str, Spec] = {
    "agg": _spec(positional=("func",), required=("func",)),
    "aggregate": _spec(positional=("func",), required=("func",)),
    "count": _spec(), "size": _spec(), "nunique": _spec("dropna"),
    "mean": _GROUP_REDUCE, "median": _GROUP_REDUCE, "min": _GROUP_REDUCE, "max": _GROUP_REDUCE,
    "sum": _spec("numeric_only", "min_count"), "prod": _GROUP_REDUCE,
    "std": _spec("numeric_only", "ddof"), "var": _spec("numeric_only", "ddof"), "sem": _spec("numeric_only", "ddof"),
}
SPECS: Dict[str, Dict[str, Spec]] = {"DataFrame": _FRAME_SPECS, "Series": _SERIES_SPECS, "GroupBy": _GROUPBY_SPECS}
_GETITEM = ("DataFrame", "GroupBy")  # receivers whose columns `obj[...]` selects


def check_call(kind_: str, name: str, args: List[Any], kwargs: Dict[str, Any], values: List[Any],
               kw: Dict[str, Any]) -> None:
    """Refuse, before anything runs, a pandas call off the list or with arguments off its spec.

    `args`/`kwargs` are as they came (remote objects still `Ref`s); `values`/`kw` resolved.
    """
    if _pandas() is None:
        return
    receiver = values[0] if values and kind_ in ("method", "attr", "call") else None
    rkind = kind(receiver)
    if kind_ == "method" and rkind is not None:
        label = f"{rkind}.{name}"
        spec = SPECS[rkind].get(name)
        if spec is None:
            raise NotAllowed(f"{label} is not on the owner's allowlist")
        _literal(label, args[1:], kwargs)
        spec.check(receiver, label, list(values[1:]), dict(kw))
        if name == "groupby":
            _check_keys(label, values[1:], kw)
        return
    if kind_ == "func" and name == "operator.getitem" and values and kind(values[0]) in _GETITEM:
        _literal(name, args[1:], kwargs)
        if len(values) != 2 or kw:
            raise NotAllowed("selecting columns takes one key")
        _column_key(values[0], values[1], f"selecting columns of a {kind(values[0])}")
        return
    if rkind is not None or _holds_pandas([values, kw]):
        raise NotAllowed(f"{name}: a pandas object can only be used through its own allowlisted methods and column "
                         "selection; convert it with .to_numpy() first")


def _check_keys(label: str, args: List[Any], kw: Dict[str, Any]) -> None:
    """Several keys make a MultiIndex, which cannot travel: they need as_index=False."""
    by = args[0] if args else kw.get("by")
    if isinstance(by, list) and len(by) > 1 and kw.get("as_index", True):
        raise NotAllowed(f"{label} by several columns needs as_index=False (a MultiIndex cannot be kept)")


def _literal(label: str, args: Iterable[Any], kwargs: Dict[str, Any]) -> None:
    """Arguments sent with the call, not remote objects: public, and never a callable."""
    if _holds(lambda v: isinstance(v, Ref), [list(args), kwargs]):
        raise NotAllowed(f"{label}: pass arguments as plain values (names, numbers, lists), not remote objects")


def _holds_pandas(value: Any) -> bool:
    return _holds(lambda v: kind(v) is not None, value)


# Deeper than arguments can arrive from the wire (wire.Limits.max_depth is 32, and the callers
# wrap them in two more levels), so _literal sees every Ref the scientist sent; deeper values
# are skipped.
HOLDS_DEPTH = 64


def _holds(pred: Callable[[Any], bool], value: Any) -> bool:
    """Whether pred holds for a value in the lists, tuples and dicts of `value`."""
    return any(pred(v) for v in containers.leaves(value, max_depth=HOLDS_DEPTH, prune=True))


# -- running --------------------------------------------------------------------------------
def method(target: Any, name: str) -> Callable[..., Any]:
    """The callable for an allowlisted method whose arguments `check_call` accepted."""
    if kind(target) == "GroupBy":
        return getattr(target.grouped(), name)
    if name == "to_numpy":
        return lambda dtype=None: np.array(target.to_numpy(dtype=dtype), copy=True)
    if name == "groupby":
        return lambda by, **options: GroupBy(target, _frozen(by), tuple(sorted(options.items())))
    return getattr(target, name)


# -- metadata from public facts ----------------------------------------------------------------
# Operations whose result structure (kind, shape, names, dtypes) depends on no value; "getitem" selects columns.
PREDICTED: Dict[str, frozenset] = {
    "DataFrame": frozenset("getitem describe count mean median min max sum std var quantile nunique to_numpy "
                           "groupby".split()),
    "Series": frozenset("describe quantile to_numpy".split()),
    "GroupBy": frozenset({"getitem"}),
}
_PREDICTIONS: Dict[Any, Any] = {}
_PREDICTIONS_LOCK = threading.Lock()
_MAX_PREDICTIONS = 1024


def predict(kind_: str, name: str, target: Any, call_args: List[Any], kw: Dict[str, Any], unavailable: Any) -> Any:
    """None if no pandas object is involved; else the result's predicted structure, or `unavailable`.

    The prediction runs the operation on a frame of zeros with the receiver's
    public structure, for the operations of `PREDICTED` only: for the others
    (value_counts, aggregations of groups, scalar results) it would tell
    something about values by agreeing or not.
    """
    if _pandas() is None:
        return None
    if kind_ == "method" and kind(target) is not None:
        receiver, op, args = target, name, list(call_args)
    elif kind_ == "func" and name == "operator.getitem" and call_args and kind(call_args[0]) is not None:
        receiver, op, args = call_args[0], "getitem", list(call_args[1:])
    else:
        return None
    if op not in PREDICTED.get(kind(receiver) or "", ()):
        return unavailable
    key = (op, describe(receiver), repr(args), repr(sorted(kw.items())))
    with _PREDICTIONS_LOCK:
        if key in _PREDICTIONS:
            return _PREDICTIONS[key]
    found = _run_on_zeros(receiver, op, args, kw, unavailable)
    with _PREDICTIONS_LOCK:
        _PREDICTIONS[key] = found
        while len(_PREDICTIONS) > _MAX_PREDICTIONS:
            _PREDICTIONS.pop(next(iter(_PREDICTIONS)))
    return found


def _run_on_zeros(receiver: Any, op: str, args: List[Any], kw: Dict[str, Any], unavailable: Any) -> Any:
    from . import shapes

    found = []
    for fill in _FILLS:  # values pandas chooses result dtypes by: none missing, all missing, some missing
        try:
            dummy = zeros_like(receiver, fill)
            result = operator.getitem(dummy, args[0]) if op == "getitem" else method(dummy, op)(*args, **kw)
            if kind(result) is None and not isinstance(result, np.ndarray):
                return unavailable  # a scalar: its type and value are kept private
            found.append(shapes.describe(result))
        except Exception:
            return unavailable
        if found[-1] != found[0]:
            return unavailable  # the structure depends on values: private
    return found[0]


_FILLS = ("zeros", "missing", "some missing")


def zeros_like(value: Any, fill: str = "zeros") -> Any:
    """A frame with the same public structure (names, dtypes, length, index type and name).

    All zeros; with `fill`, floating columns all NaN ("missing") or NaN in the first row ("some missing").
    """
    pd = _pandas()
    k = kind(value)
    if k == "GroupBy":
        return GroupBy(zeros_like(value.frame, fill), value.by, value.options, value.selection)
    index = _zeros_index(pd, value.index)
    if k == "Series":
        return pd.Series(_dummy_column(len(value), value.dtype, fill), index=index, name=value.name)
    data = {c: _dummy_column(len(value), d, fill) for c, d in value.dtypes.items()}
    return pd.DataFrame(data, index=index, columns=value.columns)


def _dummy_column(n: int, dtype: Any, fill: str) -> np.ndarray:
    column = np.zeros(n, dtype=dtype)
    if fill != "zeros" and column.dtype.kind in "fc":
        column[: (n if fill == "missing" else 1)] = np.nan
    return column


def result_bytes(kind_: str, name: str, target: Any, call_args: List[Any], kw: Dict[str, Any]) -> int:
    """An upper bound of what a pandas action allocates: its predictions, its result and a copy of it.

    Checked against the scientist's budget before anything runs (to_numpy(dtype="complex128") of a
    bool frame is sixteen times the frame).
    """
    if kind_ == "method" and kind(target) is not None:
        receiver = target
    elif kind_ == "func" and name == "operator.getitem" and call_args and kind(call_args[0]) is not None:
        receiver = call_args[0]
    else:
        return 0
    frame = receiver.frame if kind(receiver) == "GroupBy" else receiver
    cells = (len(frame) + 1) * ((frame.shape[1] if kind(frame) == "DataFrame" else 1) + 1)
    dtype = kw.get("dtype", call_args[0] if name == "to_numpy" and call_args else None)
    try:
        width = max(np.dtype(dtype).itemsize, 8) if dtype is not None else 8
    except TypeError:
        width = 16
    return cells * width * (len(_FILLS) + 2)


def _zeros_index(pd: Any, index: Any) -> Any:
    if type(index) is pd.RangeIndex:
        return pd.RangeIndex(len(index), name=index.name)
    if isinstance(index.dtype, np.dtype) and index.dtype.kind in "biuf":
        return pd.Index(np.zeros(len(index), dtype=index.dtype), name=index.name)
    return pd.Index([""] * len(index), dtype=object, name=index.name)
