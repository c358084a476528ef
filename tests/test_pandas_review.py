"""Hostile review of the pandas support: each test is an attack the review found, now closed.

Leaks use the `differential` helper: two owners publish frames with the same
columns, dtypes and length but other values; nothing is approved, and
everything the scientist observes must be identical.
"""
from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest

pd = pytest.importorskip("pandas")

import duet  # noqa: E402
from duet import identity, wire  # noqa: E402
from duet.owner.host import Owner  # noqa: E402
from tests.test_bounded_owner import MAX_OTHER_LATENCY_S, MAX_RSS_GROWTH_MB, Watch, _join, _rss_mb  # noqa: E402
from tests.test_noninterference_cases import differential  # noqa: E402


def test_quantile_dtype_tells_whether_a_float32_column_has_a_missing_value(tmp_path) -> None:
    """pandas keeps float32 for quantiles of a float32 column that holds a NaN, and gives float64
    otherwise. The prediction runs on a frame of zeros (no NaN), so it agrees with the owner whose
    column has no NaN (metadata public: type, shape, dtype float64, ops) and disagrees with the
    owner whose column has one (metadata private). `metadata_private` is one bit per column:
    "is any value missing?", without approval."""
    a = pd.DataFrame({"w": np.array([61.5, 70.0, 82.25, 90.0], dtype=np.float32)})
    b = pd.DataFrame({"w": np.array([61.5, np.nan, 82.25, 90.0], dtype=np.float32)})

    def prog(s):
        p = s.store["patients"]
        q = p.quantile([0.25, 0.75])
        sq = p["w"].quantile([0.5])
        return {"frame quantile": lambda: q, "series quantile": lambda: sq}

    differential(prog, tmp_path, extra={"patients": (a, b)})


def test_complex_reductions_tell_whether_a_value_is_nan(tmp_path, monkeypatch) -> None:
    """DataFrame.sum(min_count=n) over complex64 columns: when a column has fewer than n non-NaN
    values, pandas's masked path returns complex128, else complex64 (what the frame of zeros
    predicts). With n = the (public) number of rows, the result's metadata is public for the owner
    with no missing value and private for the other: "is any value missing?" without approval.

    Closed twice: complex (and float16) columns are not published, and predictions also run on
    frames with missing values, so a structure that depends on them stays private."""
    with pytest.raises(TypeError, match="complex64"):
        duet.owner.store.AssetStore().add(pd.DataFrame({"z": np.zeros(2, np.complex64)}), name="z")
    from duet.owner import frames

    monkeypatch.setattr(frames, "check_publishable", lambda value: None)  # as if it had been published
    a = pd.DataFrame({"z": np.array([1 + 1j, 2, 3], np.complex64), "y": np.array([1j, 2, 3], np.complex64)})
    b = pd.DataFrame({"z": np.array([1 + 1j, 2, 3], np.complex64), "y": np.array([1j, np.nan, 3], np.complex64)})

    def prog(s):
        p = s.store["patients"]
        sm = p.sum(min_count=3)
        return {"sum": lambda: sm}

    differential(prog, tmp_path, extra={"patients": (a, b)})


def test_to_numpy_with_a_wider_dtype_allocates_far_past_the_memory_limit(tmp_path) -> None:
    """Tensor actions are sized by a shadow run before anything is allocated; pandas actions are not.
    A 16 MB bool frame (the scientist's own, within a 64 MiB budget) asked for
    .to_numpy(dtype='complex128') makes a 256 MB zeros copy for the prediction, a 256 MB result
    and a 256 MB np.array copy of it before the budget check refuses the result: the owner's memory
    jumps by ~0.5 GB (32x the input; scale the frame and the owner runs out of memory). The same
    conversion of a tensor is refused at no cost."""
    limits = duet.Limits(max_bytes=64 * 2**20, max_elements_per_object=2**24)
    owner = Owner(name="o", audit_log=tmp_path / "a.jsonl", identity=identity.Identity.ephemeral(), limits=limits)
    attacker = _join(owner, "attacker")
    try:
        mine = attacker.send(pd.DataFrame({f"c{i}": np.zeros(2_000_000, bool) for i in range(8)}))
        assert mine.meta(timeout=30)["type"] == "DataFrame"
        stop, peak = threading.Event(), []
        rss0 = _rss_mb()

        def sample() -> None:
            while not stop.wait(0.002):
                peak.append(_rss_mb())

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            with pytest.raises(duet.DuetError):
                mine.to_numpy(dtype="complex128").meta(timeout=60)
        finally:
            stop.set()
            t.join(10)
        growth = max(peak + [rss0]) - rss0
        assert growth < MAX_RSS_GROWTH_MB, f"the owner's memory grew by {growth:.0f} MB for a refused action"
    finally:
        attacker.close()
        owner.close()


def _empty_frames_message(rid: int, n: int) -> bytes:
    """{"t": "put", "rid": rid, "value": [n empty DataFrames]}, built by hand (no encoding cost here)."""
    mark = msgpack.packb(msgpack.ExtType(wire.EXT_FRAME, b""))
    one = wire._array_header(5) + mark + b"".join(wire.encode(i) for i in ("DataFrame", None, slice(0, 0, 1), []))
    return (b"\x83" + msgpack.packb("t") + msgpack.packb("put") + msgpack.packb("rid") + msgpack.packb(rid)
            + msgpack.packb("value") + wire._array_header(n) + one * n)


def test_one_small_message_of_empty_frames_stalls_every_scientist(tmp_path) -> None:
    """wire_frames bounds frames per message at 65,536 because "building one costs more than
    decoding an array", but each costs ~150 us of pandas: a 1.4 MB message of 65,536 column-less
    DataFrames (each counts once) takes ~10 s to decode. Decoding runs on the runtime loop thread
    that serves every session, so another scientist's ping waits for it (seconds, not < 1 s)."""
    limits = duet.Limits(max_bytes=64 * 2**20, max_elements_per_object=2**24, max_queued_bytes=32 * 2**20)
    owner = Owner(name="o", audit_log=tmp_path / "a.jsonl", identity=identity.Identity.ephemeral(), limits=limits)
    attacker, other = _join(owner, "attacker"), _join(owner, "other")
    try:
        raw = _empty_frames_message(attacker._new_rid(), 65_536)
        assert len(raw) < 2 * 2**20
        with Watch(other) as w:
            time.sleep(0.2)
            attacker.session.transport.send(raw)
            attacker.ping(timeout=120)
        assert w.max_latency < MAX_OTHER_LATENCY_S, f"another scientist waited {w.max_latency:.1f} s"
    finally:
        attacker.close()
        other.close()
        owner.close()
