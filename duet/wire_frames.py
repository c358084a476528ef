"""The wire form of pandas DataFrames and Series: named numpy columns and an index, never pickle.

A frame travels like a tuple, as a msgpack array that starts with a marker
(ext 12, empty); its items are ordinary wire values, decoded and bounded by
`duet.wire` like any others, and only then checked here and built into pandas:

    [mark, kind, index_name, index, labels, column, column, ...]

- ``kind``: ``"DataFrame"`` or ``"Series"``;
- ``index_name``: nil, str, bool, int or float;
- ``index``: a slice ``(start, stop, step)`` for a RangeIndex, a 1-D bool or
  numeric ndarray, or a list of str;
- ``labels``: the column names (unique str) of a DataFrame, or ``[name]`` of a
  Series (nil, str, bool, int or float);
- each column: a 1-D bool or numeric ndarray as long as the index.

Bounds are those of every value (message size, items, string length), plus
at most `MAX_COLUMNS` frames and columns per message (building a frame costs
more than decoding an array) and, for a frame without columns, an index of at
most ``max_items`` rows. Both sides check the same, so what one encodes the
other decodes.

pandas is imported only when a frame is encoded or arrives; without pandas a
frame that arrives is refused with a `ProtocolError` that says so.
"""
from __future__ import annotations

import sys
from typing import Any, List

import numpy as np

from duet.errors import ProtocolError

KINDS = ("DataFrame", "Series")
# What building frames costs, per message, in units of one column (about 15 us of pandas); a frame
# costs FRAME_UNITS (about 150 us even when empty). Decoding runs on the loop every session shares,
# so a message may cost at most ~0.15 s of building: 512 frames, or one frame of 8,000 columns.
FRAME_UNITS = 16
MAX_COLUMNS = 8_192


def units(items: List[Any]) -> int:
    """What building the frame of these items (kind, index name, index, labels, *columns) costs."""
    return FRAME_UNITS + max(len(items) - 4, 0)
_INDEX_KINDS = "biuf"  # bool and real numbers: an index of complex numbers has no use here
_COLUMN_KINDS = "biufc"
NO_PANDAS = ("a pandas DataFrame or Series arrived, but pandas is not installed here: "
             "pip install 'duet-p2p[pandas]', or ask for .to_numpy() instead")


def _pandas() -> Any:
    """pandas if it is already imported (no object of its types can exist otherwise)."""
    return sys.modules.get("pandas")


def is_frame_type(t: type) -> bool:
    """Exactly a DataFrame or Series (subclasses are refused, as msgpack's strict types are)."""
    pd = _pandas()
    return pd is not None and (t is pd.DataFrame or t is pd.Series)


def is_frame(obj: Any) -> bool:
    return is_frame_type(type(obj))


# -- encoding ---------------------------------------------------------------------
def check(obj: Any) -> None:
    """Whether a DataFrame or Series can travel; ProtocolError naming dtypes and kinds, never values."""
    pd = _pandas()
    _check_index(obj.index)
    if type(obj) is pd.Series:
        plain_name(obj.name, "a Series name")
        _check_column(obj.dtype)
        return
    labels = list(obj.columns)
    if any(type(label) is not str for label in labels):
        raise ProtocolError("cannot encode a DataFrame whose column names are not all str")
    if len(set(labels)) != len(labels):
        raise ProtocolError("cannot encode a DataFrame with duplicate column names")
    for dt in obj.dtypes:
        _check_column(dt)


def to_items(obj: Any) -> List[Any]:
    """The items after the marker: [kind, index_name, index, labels, *columns], checked first."""
    pd = _pandas()
    check(obj)
    index = [plain_name(obj.index.name, "an index name"), _index_values(obj.index)]
    if type(obj) is pd.Series:
        return ["Series", *index, [plain_name(obj.name, "a Series name")], _column(obj)]
    columns = [_column(obj.iloc[:, i]) for i in range(obj.shape[1])]
    return ["DataFrame", *index, list(obj.columns), *columns]


def plain_name(value: Any, what: str) -> Any:
    """A Series or index name as it travels: None, str, bool, int or float (numpy scalars as Python)."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        value = value.item()
    if value is None or type(value) in _NAME_TYPES:
        return value
    raise ProtocolError(f"cannot encode {what} of type {type(value).__name__}")


_NAME_TYPES = (str, bool, int, float)


def _check_column(dt: Any) -> None:
    if not isinstance(dt, np.dtype) or dt.kind not in _COLUMN_KINDS:
        raise ProtocolError(f"cannot encode a pandas column of dtype {dt}: only bool and numeric numpy dtypes")


def _column(series: Any) -> np.ndarray:
    return np.ascontiguousarray(series.to_numpy())


def _check_index(index: Any) -> None:
    pd = _pandas()
    plain_name(index.name, "an index name")
    if type(index) is pd.RangeIndex:
        return
    if type(index) is not pd.Index:
        raise ProtocolError(f"cannot encode a pandas {type(index).__name__}: only RangeIndex and flat Index")
    dt = index.dtype
    if isinstance(dt, np.dtype) and dt.kind in _INDEX_KINDS:
        return
    if not all(type(v) is str for v in index):
        raise ProtocolError(f"cannot encode a pandas index of dtype {dt}: only bool, numeric or str labels")


def _index_values(index: Any) -> Any:
    pd = _pandas()
    if type(index) is pd.RangeIndex:
        return slice(int(index.start), int(index.stop), int(index.step))
    if isinstance(index.dtype, np.dtype) and index.dtype.kind in _INDEX_KINDS:
        return np.ascontiguousarray(index.to_numpy())
    return list(index)


# -- decoding ---------------------------------------------------------------------
def build(items: List[Any], max_rows: int) -> Any:
    """A DataFrame or Series from decoded items, each checked first; ProtocolError otherwise.

    `max_rows` bounds a RangeIndex that no column backs (its length costs no bytes on the wire).
    """
    if len(items) < 4:
        raise ProtocolError("bad frame: too few fields")
    kind, index_name, index, labels, columns = items[0], items[1], items[2], items[3], items[4:]
    if kind not in KINDS:
        raise ProtocolError("bad frame kind")
    if index_name is not None and type(index_name) not in _NAME_TYPES:
        raise ProtocolError("bad frame index name")
    rows = _index_length(index)
    if not columns and rows > max_rows:
        raise ProtocolError("bad frame: an index longer than max_items without columns")
    _check_labels(kind, labels, len(columns))
    for col in columns:
        if type(col) is not np.ndarray or col.ndim != 1 or col.dtype.kind not in _COLUMN_KINDS:
            raise ProtocolError("bad frame column: must be a 1-D bool or numeric array")
        if len(col) != rows:
            raise ProtocolError("bad frame: a column and the index differ in length")
    pd = _pandas() or _import_pandas()
    idx = _build_index(pd, index, index_name)
    if kind == "Series":
        return pd.Series(columns[0], index=idx, name=labels[0], copy=False)
    if not columns:
        return pd.DataFrame(index=idx)
    return pd.DataFrame(dict(zip(labels, columns)), index=idx, copy=False)


def _import_pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ProtocolError(NO_PANDAS) from None
    return pandas


def _index_length(index: Any) -> int:
    if type(index) is slice:
        if any(type(p) is not int for p in (index.start, index.stop, index.step)) or index.step == 0:
            raise ProtocolError("bad frame: a range index needs int start, stop and a non-zero step")
        return len(range(index.start, index.stop, index.step))
    if type(index) is np.ndarray:
        if index.ndim != 1 or index.dtype.kind not in _INDEX_KINDS:
            raise ProtocolError("bad frame index: must be a 1-D bool or real array")
        return len(index)
    if type(index) is list and all(type(v) is str for v in index):
        return len(index)
    raise ProtocolError("bad frame index")


def _check_labels(kind: str, labels: Any, ncols: int) -> None:
    if type(labels) is not list:
        raise ProtocolError("bad frame labels")
    if kind == "Series":
        if ncols != 1 or len(labels) != 1 or not (labels[0] is None or type(labels[0]) in _NAME_TYPES):
            raise ProtocolError("bad Series: one column and one name (nil, str, bool, int or float)")
        return
    if len(labels) != ncols or any(type(v) is not str for v in labels) or len(set(labels)) != ncols:
        raise ProtocolError("bad DataFrame: one unique str name per column")


def _build_index(pd: Any, index: Any, index_name: Any) -> Any:
    if type(index) is slice:
        return pd.RangeIndex(index.start, index.stop, index.step, name=index_name)
    if type(index) is list:
        return pd.Index(index, dtype=object, name=index_name)
    return pd.Index(index, name=index_name, copy=False)
