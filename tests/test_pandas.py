"""pandas: published DataFrames, their allowlisted operations, lineage, refusals and the wire form."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Iterator, Tuple

import msgpack
import numpy as np
import pytest
import torch

pd = pytest.importorskip("pandas")

import duet  # noqa: E402
from duet import allowlist, wire, wire_frames  # noqa: E402
from duet.errors import ProtocolError  # noqa: E402
from duet.owner import frames  # noqa: E402
from tests.test_noninterference_cases import differential  # noqa: E402

T = 10

PATIENTS = pd.DataFrame({
    "age": [31.0, 45.0, 52.0, 29.0, 61.0, 38.0],
    "bmi": [22.1, 27.3, 30.2, 19.9, 25.0, 23.4],
    "sex": np.array([0, 1, 1, 0, 1, 0], dtype=np.int64),
    "smoker": [True, False, True, False, False, True],
})
# Same columns, dtypes and length; other values: three sexes instead of two, a missing age, and no
# smoker at all (one group, like a frame of zeros: a prediction from zeros would agree here only).
OTHERS = pd.DataFrame({
    "age": [70.0, np.nan, 18.0, 18.0, 44.0, 90.0],
    "bmi": [35.5, 18.2, 21.0, 21.0, 29.9, 24.4],
    "sex": np.array([2, 0, 1, 2, 2, 0], dtype=np.int64),
    "smoker": [False, False, False, False, False, False],
})


@pytest.fixture
def frame_pair(tmp_path) -> Iterator[Tuple[duet.Owner, duet.Scientist]]:
    owner, scientist = duet.local_pair(audit_log=tmp_path / "audit.jsonl")
    owner.store.add(PATIENTS.copy(), name="patients", description="a small cohort")
    owner.store.add(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64), name="weights")
    yield owner, scientist
    scientist.close()
    owner.close()


def approve_all(owner: duet.Owner) -> None:
    owner.requests.add_handler(action="accept", datasets=["patients", "weights"])


def assert_same(remote: Any, local: Any) -> None:
    """The released value is the value local pandas computes, type included."""
    assert type(remote) is type(local), (type(remote), type(local))
    if isinstance(local, pd.DataFrame):
        pd.testing.assert_frame_equal(remote, local, check_exact=True)
    elif isinstance(local, pd.Series):
        pd.testing.assert_series_equal(remote, local, check_exact=True)
    elif isinstance(local, np.ndarray):
        assert remote.dtype == local.dtype and remote.shape == local.shape
        np.testing.assert_array_equal(remote, local)
    else:
        assert remote == local or (np.isnan(remote) and np.isnan(local))


# -- publishing -----------------------------------------------------------------------------------
def test_listing_shows_type_shape_and_columns_never_values(frame_pair) -> None:
    _, s = frame_pair
    info = next(a for a in s.store.listing() if a["name"] == "patients")
    assert info["type"] == "DataFrame"
    assert info["shape"] == [6, 4]
    assert info["columns"] == [["age", "float64"], ["bmi", "float64"], ["sex", "int64"], ["smoker", "bool"]]
    assert info["dtype"] == "age: float64, bmi: float64, sex: int64, smoker: bool"
    shown = repr(s.store)
    assert "DataFrame" in shown and "6×4" in shown and "smoker: bool" in shown
    assert "52" not in shown and "30.2" not in shown
    meta = s.store["patients"].meta(timeout=T)
    assert meta["type"] == "DataFrame" and meta["shape"] == [6, 4] and not meta["metadata_private"]
    assert s.store["patients"].shape == (6, 4)


@pytest.mark.parametrize("frame, what", [
    (pd.DataFrame({"name": ["a", "b"]}), "dtype object"),
    (pd.DataFrame({"sex": pd.Categorical(["f", "m"])}), "dtype category"),
    (pd.DataFrame({"when": pd.to_datetime(["2020-01-01", "2021-01-01"])}), "datetime64"),
    (pd.DataFrame({"n": pd.array([1, None], dtype="Int64")}), "dtype Int64"),
    (pd.DataFrame({"b": pd.array([True, None], dtype="boolean")}), "dtype boolean"),
    (pd.DataFrame([[1, 2]]), "not all str"),
    (pd.DataFrame([[1, 2]], columns=["a", "a"]), "duplicate"),
    (pd.DataFrame({"a": [1, 2]}, index=pd.MultiIndex.from_tuples([(0, 1), (1, 0)])), "MultiIndex"),
    (pd.DataFrame({"a": [1, 2]}, index=pd.to_datetime(["2020-01-01", "2021-01-01"])), "DatetimeIndex"),
])
def test_publishing_refuses_columns_that_are_not_bool_or_numeric(frame, what) -> None:
    owner, s = duet.local_pair()
    try:
        with pytest.raises(TypeError, match=what):
            owner.store.add(frame, name="bad")
        assert "bad" not in owner.store
    finally:
        s.close()
        owner.close()


def test_a_series_can_be_published(tmp_path) -> None:
    owner, s = duet.local_pair(audit_log=tmp_path / "a.jsonl")
    try:
        owner.store.add(PATIENTS["age"].copy(), name="age")
        assert s.store["age"].meta(timeout=T)["type"] == "Series"
        approve_all(owner)
        owner.requests.add_handler(action="accept", datasets=["age"])
        assert_same(s.store["age"].mean().get(timeout=T), PATIENTS["age"].mean())
    finally:
        s.close()
        owner.close()


# -- each allowlisted operation ------------------------------------------------------------------
OPERATIONS: dict = {
    "column": lambda df: df["age"],
    "columns": lambda df: df[["age", "bmi"]],
    "describe": lambda df: df.describe(),
    "describe percentiles": lambda df: df[["age", "bmi"]].describe(percentiles=[0.1, 0.9]),
    "mean": lambda df: df.mean(),
    "sum": lambda df: df.sum(),
    "count": lambda df: df.count(),
    "median": lambda df: df[["age", "bmi"]].median(),
    "std": lambda df: df[["age", "bmi"]].std(ddof=0),
    "var": lambda df: df[["age", "sex"]].var(),
    "min": lambda df: df[["age", "sex"]].min(),
    "max": lambda df: df[["bmi", "sex"]].max(),
    "nunique": lambda df: df.nunique(),
    "frame quantile": lambda df: df[["age", "bmi"]].quantile([0.25, 0.75]),
    "frame quantile one": lambda df: df[["age", "bmi"]].quantile(0.5, interpolation="lower"),
    "series mean": lambda df: df["age"].mean(),
    "series sum": lambda df: df["age"].sum(),
    "series min": lambda df: df["age"].min(),
    "series max": lambda df: df["bmi"].max(),
    "series std": lambda df: df["age"].std(),
    "series var": lambda df: df["age"].var(ddof=0),
    "series count": lambda df: df["age"].count(),
    "series median": lambda df: df["age"].median(),
    "series nunique": lambda df: df["sex"].nunique(),
    "series quantile": lambda df: df["age"].quantile(0.5),
    "series quantiles": lambda df: df["age"].quantile([0.1, 0.5, 0.9]),
    "series describe": lambda df: df["age"].describe(),
    "groupby agg": lambda df: df.groupby("sex").agg("mean"),
    "groupby agg dict": lambda df: df.groupby("sex").agg({"age": "mean", "bmi": "max"}),
    "groupby aggregate": lambda df: df.groupby("smoker").aggregate("median"),
    "groupby method": lambda df: df.groupby("sex").std(),
    "groupby size": lambda df: df.groupby("sex").size(),
    "groupby column": lambda df: df.groupby("sex")["age"].mean(),
    "groupby columns": lambda df: df.groupby("sex")[["age", "bmi"]].agg("max"),
    "groupby two keys": lambda df: df.groupby(["sex", "smoker"], as_index=False).agg("mean"),
    "groupby count": lambda df: df.groupby("sex", sort=False).count(),
    "value_counts": lambda df: df["sex"].value_counts(),
    "value_counts normalized": lambda df: df["smoker"].value_counts(normalize=True, ascending=True),
    "column to_numpy": lambda df: df["age"].to_numpy(),
    "frame to_numpy": lambda df: df[["age", "bmi"]].to_numpy(dtype="float32"),
}


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_each_operation_matches_local_pandas_after_approval(frame_pair, name) -> None:
    owner, s = frame_pair
    op = OPERATIONS[name]
    remote = op(s.store["patients"])
    meta = remote.meta(timeout=T)
    assert meta["private"] and meta["assets"] == ["patients"]
    approve_all(owner)
    assert_same(remote.get(reason=name, timeout=T), op(PATIENTS))


def test_get_waits_for_the_owner_and_the_request_counts_every_value(frame_pair) -> None:
    owner, s = frame_pair
    described = s.store["patients"].describe()
    handle = described.request(reason="summary for the paper")
    req = _first_pending(owner)
    assert req.lineage == ("patients",)
    assert req.type_name == "DataFrame" and req.shape == (8, 3)
    assert req.numel >= 8 * 3 + 8  # values and index labels
    assert not handle.delivered
    req.accept()
    assert_same(handle.wait(T), PATIENTS.describe())


def _first_pending(owner: duet.Owner) -> Any:
    """The first pending request, waiting on the queue's change signal (bounded)."""
    import time

    deadline = time.monotonic() + T
    while not owner.requests.pending:
        assert time.monotonic() < deadline, "no request reached the owner"
        owner.requests.wait_changed(0.1)
    return owner.requests.pending[0]


def test_denied_release_of_a_derived_frame(frame_pair) -> None:
    owner, s = frame_pair
    handle = s.store["patients"].groupby("sex").agg("mean").request(reason="groups")
    _first_pending(owner).deny(reason="too few patients per group")
    with pytest.raises(duet.RequestDenied, match="too few patients"):
        handle.wait(T)


def test_a_column_becomes_a_tensor_to_train_on(frame_pair) -> None:
    owner, s = frame_pair
    p = s.store["patients"]
    x = s.torch.tensor(p[["age", "bmi"]].to_numpy(dtype="float32"))
    y = s.torch.from_numpy(p["sex"].to_numpy(dtype="float32"))
    torch.manual_seed(0)
    local_model = torch.nn.Linear(2, 1)
    model = s.send(local_model)
    opt = s.torch.optim.SGD(model.parameters(), lr=1e-4)
    loss = s.torch.nn.functional.mse_loss(model(x).squeeze(1), y)
    loss.backward()
    opt.step()
    approve_all(owner)
    local_x = torch.tensor(PATIENTS[["age", "bmi"]].to_numpy(dtype="float32"))
    local_y = torch.tensor(PATIENTS["sex"].to_numpy(dtype="float32"))
    local_loss = torch.nn.functional.mse_loss(local_model(local_x).squeeze(1), local_y)
    assert loss.get(timeout=T).item() == pytest.approx(local_loss.item())
    assert loss.meta(timeout=T)["assets"] == ["patients"]


def test_lineage_joins_other_assets(frame_pair) -> None:
    _, s = frame_pair
    age = s.torch.tensor(s.store["patients"]["age"].to_numpy())
    mixed = age * s.store["weights"]
    assert mixed.meta(timeout=T)["assets"] == ["patients", "weights"]


def test_value_dependent_shapes_stay_private(frame_pair) -> None:
    _, s = frame_pair
    p = s.store["patients"]
    for ptr in (p["sex"].value_counts(), p.groupby("sex").agg("mean"), p.groupby("sex").size()):
        meta = ptr.meta(timeout=T)
        assert meta["metadata_private"] and meta["shape"] is None and meta["type"] is None
        with pytest.raises(duet.NotAllowed):
            ptr.shape
    assert p["age"].shape == (6,)
    assert p[["age", "bmi"]].shape == (6, 2)
    assert p.describe().shape == (8, 3)
    assert p.mean().shape == (4,)
    assert p["age"].to_numpy().shape == (6,)
    assert p.groupby("sex").meta(timeout=T)["type"] == "GroupBy"


def test_a_scientists_own_frame_needs_no_approval(frame_pair) -> None:
    _, s = frame_pair
    mine = s.send(OTHERS)
    assert not mine.private
    assert_same(mine.get(timeout=T), OTHERS)
    assert_same(mine.groupby("sex").agg("max").get(timeout=T), OTHERS.groupby("sex").agg("max"))


def test_assets_are_never_changed(frame_pair) -> None:
    owner, s = frame_pair
    p = s.store["patients"]
    for name in ("groupby agg", "describe", "value_counts", "column to_numpy"):
        OPERATIONS[name](p)
    arr = p["age"].to_numpy()
    arr.fill(0.0)  # writes into the scientist's copy only
    approve_all(owner)
    assert_same(p["age"].get(timeout=T), PATIENTS["age"])
    pd.testing.assert_frame_equal(owner.store["patients"].value, PATIENTS)


def test_writing_into_an_array_never_reaches_the_frame_it_came_from(frame_pair) -> None:
    owner, s = frame_pair
    col = s.store["patients"]["age"]
    arr = col.to_numpy()
    arr[:] = s.store["weights"].numpy()  # another asset's values, written into the array
    owner.requests.add_handler(action="accept", datasets=["patients"])  # releases of "patients" only
    assert_same(col.get(timeout=T), PATIENTS["age"])
    assert arr.meta(timeout=T)["assets"] == ["patients", "weights"]


# -- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["apply", "eval", "query", "pipe", "to_csv", "to_pickle", "transform", "map",
                                  "to_sql", "applymap", "agg", "value_counts", "numpy", "backward", "fill"])
def test_off_list_methods_are_refused_by_the_owner(frame_pair, name) -> None:
    _, s = frame_pair
    sent = s._call("method", name, [s.store["patients"]], {})  # past the client's own check
    with pytest.raises(duet.NotAllowed, match=f"DataFrame.{name} is not on the owner's allowlist"):
        sent.get(timeout=T)


def test_off_list_names_fail_fast_on_the_scientist(frame_pair) -> None:
    _, s = frame_pair
    p = s.store["patients"]
    for name in ("apply", "query", "pipe", "to_csv", "to_pickle"):
        with pytest.raises(AttributeError, match="not on the owner's allowlist"):
            getattr(p, name)
    with pytest.raises(duet.NotAllowed, match="DataFrame.eval is not on the owner's allowlist"):
        p.eval("age * 2").get(timeout=T)  # a module method's name: the owner refuses it on a frame


REFUSED_CALLS: dict = {
    "inplace": (lambda p, s: p.sum(inplace=True), "'inplace' is not allowed"),
    "axis": (lambda p, s: p.mean(axis=1), "'axis' is not allowed"),
    "describe include": (lambda p, s: p.describe(include="all"), "'include' is not allowed"),
    "aggregation by name of a method": (lambda p, s: p.groupby("sex").agg("to_csv"), "'func' must be one of"),
    "aggregation list": (lambda p, s: p.groupby("sex").agg(["mean", "max"]), "'func' must be one of"),
    "aggregation of a missing column": (lambda p, s: p.groupby("sex").agg({"nope": "mean"}), "no column named 'nope'"),
    "missing column": (lambda p, s: p["nope"], "no column named 'nope'"),
    "row selection": (lambda p, s: p[0], "column name"),
    "series indexing": (lambda p, s: p["age"][0], "pandas object can only be used"),
    "groupby by a missing column": (lambda p, s: p.groupby("nope"), "no column named 'nope'"),
    "several keys as index": (lambda p, s: p.groupby(["sex", "smoker"]), "as_index=False"),
    "quantile out of range": (lambda p, s: p["age"].quantile(2.0), "from 0 to 1"),
    "object dtype": (lambda p, s: p["age"].to_numpy(dtype="object"), "numeric dtype"),
    "remote argument": (lambda p, s: p["age"].quantile(s.send(0.5)), "not remote objects"),
    "frame in a torch function": (lambda p, s: s.torch.tensor(p["age"]), "convert it with .to_numpy"),
    "frame in a numpy function": (lambda p, s: s.numpy.mean(p["age"]), "convert it with .to_numpy"),
    "frame in arithmetic": (lambda p, s: p["age"] + 1, "convert it with .to_numpy"),
    "frame as a tensor method argument": (lambda p, s: s.torch.ones(6).add(p["age"]), "convert it with .to_numpy"),
    "len": (lambda p, s: s._call("func", "builtins.len", [p], {}), "convert it with .to_numpy"),
    "attribute": (lambda p, s: s._call("attr", "columns", [p], {}), "attribute DataFrame.columns"),
}


@pytest.mark.parametrize("name", list(REFUSED_CALLS))
def test_refused_arguments_name_the_operation(frame_pair, name) -> None:
    owner, s = frame_pair
    call, message = REFUSED_CALLS[name]
    approve_all(owner)
    with pytest.raises(duet.NotAllowed, match=message):
        call(s.store["patients"], s).get(timeout=T)


def test_setitem_into_a_frame_is_refused(frame_pair) -> None:
    owner, s = frame_pair
    p = s.store["patients"]
    p["age"] = 0.0  # fire and forget; the owner refuses it
    approve_all(owner)
    with pytest.raises(duet.NotAllowed, match="convert it with .to_numpy"):
        s._call("func", "operator.setitem", [p, "age", 0.0], {}).get(timeout=T)
    assert_same(p["age"].get(timeout=T), PATIENTS["age"])


def test_callables_cannot_even_be_sent(frame_pair) -> None:
    _, s = frame_pair
    with pytest.raises(ProtocolError):
        s.store["patients"].groupby("sex").agg(lambda v: v.sum())


def test_owner_tables_agree_with_the_argument_specs() -> None:
    for rkind, table in allowlist.PANDAS_METHODS.items():
        assert set(table) == set(frames.SPECS[rkind]), rkind
    for rkind in frames.SPECS:
        assert not {"apply", "eval", "query", "pipe", "to_csv", "to_pickle", "transform"} & set(allowlist.METHODS[rkind])


# -- noninterference -------------------------------------------------------------------------------
def test_two_owners_with_different_frames_look_the_same(tmp_path) -> None:
    def prog(s):
        p = s.store["patients"]
        g = p.groupby("sex")
        vc = p["sex"].value_counts()
        agg = g.agg("mean")
        out = {name: (lambda ptr=op(p): ptr) for name, op in OPERATIONS.items()}
        out.update({
            "groupby": lambda: g,
            "value_counts to_numpy": lambda: vc.to_numpy(),
            "value_counts as tensor": lambda: s.torch.tensor(vc.to_numpy()).sum(),
            "value_counts shape": lambda: vc.shape,
            "agg shape": lambda: agg.shape,
            "agg column": lambda: agg["age"],
            "agg column shape": lambda: agg["age"].shape,
            "agg describe": lambda: agg.describe(),
            "agg refused": lambda: agg.quantile(2.0),
            "agg missing column": lambda: agg["nope"],
            "value_counts refused": lambda: vc.value_counts(bins=3),
            "describe shape": lambda: p.describe().shape,
            "column tensor": lambda: s.torch.tensor(p["age"].to_numpy()) * 2,
            "mean of means": lambda: g.mean().mean(),
        })
        return out

    differential(prog, tmp_path, extra={"patients": (PATIENTS.copy(), OTHERS.copy())})


# -- the wire form ---------------------------------------------------------------------------------
ROUND_TRIPS = {
    "frame": PATIENTS,
    "range index with a start and step": PATIENTS.set_index(pd.RangeIndex(10, 22, 2, name="row")),
    "numeric index": PATIENTS.set_index("sex"),
    "float index": PATIENTS[["age", "bmi"]].quantile([0.25, 0.75]),
    "bool index": PATIENTS.groupby("smoker").agg("mean"),
    "str index": PATIENTS.describe(),
    "no columns": pd.DataFrame(index=pd.RangeIndex(4)),
    "no rows": PATIENTS.iloc[:0],
    "all dtypes": pd.DataFrame({n: np.arange(3).astype(n) for n in
                                "bool uint8 int8 int16 int32 int64 float16 float32 float64 complex64 complex128".split()}),
    "series": PATIENTS["age"],
    "unnamed series": PATIENTS.mean(),
    "series named by a number": PATIENTS[["age", "bmi"]].quantile(0.5),
    "value counts": PATIENTS["sex"].value_counts(),
    "nan and inf": pd.Series([np.nan, np.inf, -0.0], name="x"),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_frames_round_trip_exactly(name) -> None:
    value = ROUND_TRIPS[name]
    out = wire.decode(wire.encode({"v": [value, (value,)]}))
    for got in (out["v"][0], out["v"][1][0]):
        assert type(got) is type(value)
        check = pd.testing.assert_frame_equal if isinstance(value, pd.DataFrame) else pd.testing.assert_series_equal
        check(got, value, check_exact=True, check_index_type=True)


@pytest.mark.parametrize("value", [
    pd.DataFrame({"s": ["a", "b"]}), pd.DataFrame({"c": pd.Categorical(["a", "b"])}), pd.DataFrame([[1, 2]]),
    pd.DataFrame([[1, 2]], columns=["a", "a"]), PATIENTS.set_index(["sex", "smoker"]),
    pd.Series([1, 2], name=("a", "b")), pd.Series(pd.array([1, None], dtype="Int64")),
    pd.Series([1, 2], index=pd.to_datetime(["2020-01-01", "2021-01-01"])), pd.Series([1, 2], index=[1, "a"]),
], ids=lambda v: type(v).__name__)
def test_encode_refuses_frames_that_cannot_travel(value) -> None:
    with pytest.raises(ProtocolError):
        wire.encode(value)


def test_subclasses_are_refused() -> None:
    class Mine(pd.DataFrame):
        pass

    with pytest.raises(ProtocolError):
        wire.encode(Mine({"a": [1.0]}))


MARK = msgpack.ExtType(wire.EXT_FRAME, b"")


def frame_bytes(*items: Any) -> bytes:
    """A frame array built by hand: [mark, *items], each item encoded as the wire encodes it."""
    return wire._array_header(len(items) + 1) + msgpack.packb(MARK) + b"".join(wire.encode(i) for i in items)


GOOD = ("DataFrame", None, slice(0, 2, 1), ["a"], np.zeros(2))


def test_hand_built_frame_decodes() -> None:
    got = wire.decode(frame_bytes(*GOOD))
    pd.testing.assert_frame_equal(got, pd.DataFrame({"a": np.zeros(2)}))


@pytest.mark.parametrize("items", [
    ("Panel", None, slice(0, 2, 1), ["a"], np.zeros(2)),  # unknown kind
    ("DataFrame", None, slice(0, 3, 1), ["a"], np.zeros(2)),  # index longer than the column
    ("DataFrame", None, np.arange(3), ["a"], np.zeros(2)),
    ("DataFrame", None, ["x", "y"], ["a", "a"], np.zeros(2), np.zeros(2)),  # duplicate names
    ("DataFrame", None, slice(0, 2, 1), ["a", "b"], np.zeros(2)),  # more names than columns
    ("DataFrame", None, slice(0, 2, 1), [1], np.zeros(2)),  # a name that is not str
    ("DataFrame", None, slice(0, 2, 1), ["a"], np.zeros((2, 1))),  # a 2-D column
    ("DataFrame", None, slice(0, 2, 1), ["a"], [0.0, 0.0]),  # a list, not an array
    ("DataFrame", None, slice(0, 2, 0), ["a"], np.zeros(2)),  # step 0
    ("DataFrame", None, slice(None, 2, 1), ["a"], np.zeros(2)),
    ("DataFrame", None, [1, 2], ["a"], np.zeros(2)),  # an index list of ints
    ("DataFrame", None, np.zeros((2, 1)), ["a"], np.zeros(2)),
    ("DataFrame", None, np.zeros(2, dtype=np.complex64), ["a"], np.zeros(2)),
    ("DataFrame", [1], slice(0, 2, 1), ["a"], np.zeros(2)),  # index name
    ("DataFrame", None, slice(0, 2**62, 1), []),  # a huge index without columns
    ("DataFrame", None, slice(0, 2, 1), "a", np.zeros(2)),
    ("Series", None, slice(0, 2, 1), ["a", "b"], np.zeros(2)),
    ("Series", None, slice(0, 2, 1), [[1]], np.zeros(2)),
    ("Series", None, slice(0, 2, 1), ["a"]),
    ("Series", None, slice(0, 2, 1), ["a"], np.zeros(2), np.zeros(2)),
    ("DataFrame", None, slice(0, 2, 1)),
    (),
])
def test_malformed_frames_are_refused(items) -> None:
    with pytest.raises(ProtocolError):
        wire.decode(frame_bytes(*items))


def test_every_single_byte_change_of_a_frame_only_raises_protocol_error() -> None:
    small = pd.DataFrame({"a": [1.5, 2.5], "b": [True, False]}, index=pd.Index(["x", "y"], name="id"))
    msg = wire.encode({"frame": small, "series": small["a"]})
    for pos in range(len(msg)):
        for value in (0x00, 0x01, 0x0C, 0x7F, 0x80, 0x90, 0xC0, 0xC4, 0xC7, 0xD4, 0xDC, 0xFF, msg[pos] ^ 0x10):
            _decodes_or_refuses(msg[:pos] + bytes([value]) + msg[pos + 1:])
        _decodes_or_refuses(msg[:pos])
        _decodes_or_refuses(msg[:pos] + msg[pos + 1:])


def _decodes_or_refuses(data: bytes) -> None:
    """A value, or ProtocolError; anything else propagates and fails the test."""
    try:
        wire.decode(data)
    except ProtocolError:
        pass


def test_frame_marker_counts_only_first_in_an_array() -> None:
    for data in (msgpack.packb(MARK), msgpack.packb([1, MARK]), msgpack.packb({"a": MARK}),
                 msgpack.packb([MARK, MARK]), msgpack.packb(msgpack.ExtType(wire.EXT_FRAME, b"\xc0")),
                 msgpack.packb([msgpack.ExtType(wire.EXT_TUPLE, b""), MARK])):
        with pytest.raises(ProtocolError):
            wire.decode(data)


def test_frame_limits_are_the_same_on_both_sides(monkeypatch) -> None:
    monkeypatch.setattr(wire_frames, "MAX_COLUMNS", 4 * (wire_frames.FRAME_UNITS + 1))
    four = [PATIENTS["age"]] * 4  # FRAME_UNITS + 1 each: the Series and its column
    assert len(wire.decode(wire.encode(four))) == 4
    with pytest.raises(ProtocolError, match="columns in one message"):
        wire.encode(four + [PATIENTS["age"]])
    raw = wire._array_header(5) + b"".join(wire.encode(s) for s in four + [PATIENTS["age"]])
    with pytest.raises(ProtocolError, match="columns in one message"):
        wire.decode(raw)
    small = wire.Limits(max_items=20)
    with pytest.raises(ProtocolError, match="max_items"):
        wire.encode(pd.DataFrame(index=pd.RangeIndex(21)), limits=small)
    assert len(wire.decode(wire.encode(pd.DataFrame(index=pd.RangeIndex(20)), limits=small), small)) == 20


def test_a_frame_without_pandas_is_refused_clearly(monkeypatch) -> None:
    data = wire.encode(PATIENTS)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ProtocolError, match="pandas is not installed"):
        wire.decode(data)


def test_duet_works_without_pandas(tmp_path) -> None:
    code = (
        "import sys; sys.modules['pandas'] = None\n"
        "import duet, torch\n"
        f"owner, s = duet.local_pair(audit_log={str(tmp_path / 'a.jsonl')!r})\n"
        "owner.store.add(torch.tensor([1.0, 2.0]), name='ages')\n"
        "owner.requests.add_handler(action='accept', datasets=['ages'])\n"
        "print((s.store['ages'] * 2).sum().get(timeout=10).item())\n"
        "print(sys.modules['pandas'] is None)\n"
        "s.close(); owner.close()\n"
        "sys.stdout.flush(); import os; os._exit(0)\n"
    )
    env = dict(os.environ, DUET_CONFIG_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["6.0", "True"]


def test_setup_declares_the_optional_extra() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    assert extras["pandas"] == ["pandas>=2,<3"]
    assert "pandas>=2,<3" in extras["test"]
    assert not [r for r in project["dependencies"] if r.startswith("pandas")]
