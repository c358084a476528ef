"""Hostile input and load: the owner's dispatcher under fuzzing, resource bombs, and the signaling service under load.

The long runs live in benchmarks/ (fuzz_session.py: 100k hostile inputs and one
million tiny actions; signaling_load.py: 1,000 WebSockets, 100 rooms pairing at
once); these are the same code on a smaller scale. Serving several scientists
at once, each with its own queue and objects, is covered over real WebRTC by
tests/test_p2p.py::test_owner_serves_several_scientists_separately.
"""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import resource
import sys
import time
from pathlib import Path
from types import ModuleType

import msgpack
import numpy as np
import pytest
import torch

import duet
from duet import wire

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    """A benchmark script as a module (benchmarks/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fuzz_session = _load("fuzz_session")


def _rss_mb() -> float:
    return fuzz_session.status_kb("VmRSS") / 1024


def _still_serving(scientist: duet.Scientist) -> None:
    assert torch.equal((scientist.send(torch.tensor([1.0])) + 1).get(timeout=30), torch.tensor([2.0]))


def _outcome(ptr: duet.Pointer) -> BaseException:
    try:
        ptr.get(timeout=30)
    except duet.DuetError as exc:
        return exc
    raise AssertionError(f"{ptr!r} was created")


# --------------------------------------------------------------------------- fuzzing
@pytest.mark.timeout(240)
def test_dispatcher_survives_hostile_messages(tmp_path):
    """3,000 structured-random messages and raw byte strings: no worker exception, still serving."""
    old_as = fuzz_session.cap_address_space(3.0)  # an unguarded huge allocation fails instead of swapping
    counter, saved = fuzz_session.install_counter()
    try:
        limits = duet.Limits(max_objects=20_000, max_bytes=256 * 2**20, max_elements_per_object=2**24)
        owner, scientist = duet.local_pair(limits=limits, audit_log=tmp_path / "a.jsonl")
        try:
            owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0]), name="ages")
            stats = fuzz_session.fuzz(owner, scientist, count=3000, seconds=120, seed=1234, barrier=250)
            assert stats["inputs"] == 3000, stats
            assert stats["raw"] > 300 and stats["structured"] > 2000, stats
            problem = fuzz_session.still_serving(owner, scientist)
            assert problem is None, problem
        finally:
            scientist.close()
            owner.close()
    finally:
        fuzz_session.remove_counter(saved)
        if old_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, old_as)
    assert counter.error_count == 0, "\n\n".join(counter.errors)
    assert counter.counts.get("WARNING", 0) > 1000  # the inputs were refused, loudly, not ignored


def test_fuzz_generator_covers_every_message_type():
    gen = fuzz_session.Hostile(0, pool=[1, 2, 3], first_rid=100)
    seen = {gen.message()["t"] for _ in range(3000)}
    assert {"call", "put", "free", "req", "hello", "welcome", "unknown", "model", "plan_def", "plan_run",
            "epoch", "batch", "rep"} <= seen
    raws = [gen.raw() for _ in range(200)]
    assert all(isinstance(r, bytes) and r for r in raws)


# --------------------------------------------------------------------------- resource bombs
HUGE = {
    "torch.zeros(2**40)": lambda s, x: s.torch.zeros(2**40),
    "torch.ones(100000, 100000)": lambda s, x: s.torch.ones(100000, 100000),
    "torch.empty((2**30, 2**30))": lambda s, x: s.torch.empty((2**30, 2**30)),
    "torch.zeros(size=...)": lambda s, x: s.torch.zeros(size=(2**20, 2**20)),
    "torch.full": lambda s, x: s.torch.full((2**30, 2**30), 1.0),
    "torch.randn": lambda s, x: s.torch.randn(2**20, 2**20),
    "torch.randint": lambda s, x: s.torch.randint(0, 10, (2**20, 2**20)),
    "torch.arange": lambda s, x: s.torch.arange(0, 2**40),
    "torch.linspace": lambda s, x: s.torch.linspace(0, 1, 2**40),
    "torch.eye": lambda s, x: s.torch.eye(2**20),
    "torch.randperm": lambda s, x: s.torch.randperm(2**40),
    "x.repeat": lambda s, x: x.repeat(10**6, 10**6),
    "numpy.zeros": lambda s, x: s.numpy.zeros((10**6, 10**6)),
    "numpy.full": lambda s, x: s.numpy.full((2**30, 2**30), 1.0),
    "numpy.arange": lambda s, x: s.numpy.arange(2**40),
    "numpy.random.rand": lambda s, x: s.numpy.random.rand(2**20, 2**20),
    "numpy.random.normal(size=...)": lambda s, x: s.numpy.random.normal(0, 1, size=(2**20, 2**20)),
}


@pytest.mark.parametrize("what", sorted(HUGE))
def test_huge_shapes_are_refused_before_allocating(pair, what):
    _, scientist = pair
    x = scientist.send(torch.ones(10))
    rss = _rss_mb()
    start = time.perf_counter()
    err = _outcome(HUGE[what](scientist, x))
    assert isinstance(err, duet.LimitExceeded), err
    assert "would allocate more than" in str(err)
    assert time.perf_counter() - start < 20
    assert _rss_mb() - rss < 200  # nothing was allocated
    _still_serving(scientist)


def test_results_over_the_byte_limit_are_refused(tmp_path):
    """Ops whose size is not guarded up front (a view, new_zeros, a layer) still cannot be kept over the limit."""
    owner, scientist = duet.local_pair(limits=duet.Limits(max_bytes=1_000_000), audit_log=tmp_path / "a.jsonl")
    try:
        x = scientist.send(torch.ones(4))
        for ptr in (x.new_zeros(10**6), scientist.torch.nn.Linear(1000, 1000), x[0:1].expand(10**6, 10**6)):
            err = _outcome(ptr)
            assert isinstance(err, duet.LimitExceeded) and "memory limit" in str(err), err
        _still_serving(scientist)
    finally:
        scientist.close()
        owner.close()


def _nested_call(depth: int) -> bytes:
    """A call whose args are `depth` nested lists, msgpack-encoded by hand (our encoder refuses it)."""
    head = msgpack.packb({"t": "call", "rid": 77, "kind": "func", "name": "torch.add", "kwargs": {}})
    # the map above has 5 entries; rewrite its header to 6 and append "args": [[[...]]]
    assert head[0] == 0x85
    return b"\x86" + head[1:] + msgpack.packb("args") + b"\x91" * depth + b"\xc0"


@pytest.mark.parametrize("depth,why", [(10_000, "StackError"), (100, "nesting deeper than max_depth=32")])
def test_deeply_nested_arguments_are_dropped_and_the_session_goes_on(pair, caplog, depth, why):
    owner, scientist = pair
    data = _nested_call(depth)
    with pytest.raises(duet.ProtocolError, match=why):  # msgpack's own stack limit, or ours
        wire.decode(data)
    with caplog.at_level(logging.WARNING, logger="duet.session"):
        scientist.session.transport.send(data)
        scientist.ping(timeout=30)
    dropped = [r for r in caplog.records if r.name == "duet.session" and "dropped a malformed message" in r.getMessage()]
    assert len(dropped) == 1 and why in dropped[0].getMessage()
    assert owner.scientists and not scientist.session.closed
    _still_serving(scientist)
    # Within the limit, the same message is an ordinary (failing) action, not a dropped one.
    scientist.session.transport.send(_nested_call(20))
    err = scientist.session.request({"kind": "meta", "obj": 77}).exception(timeout=30)
    assert isinstance(err, (duet.NotAllowed, duet.RemoteError)), err


def _tiny_actions(n: int, tmp_path: Path) -> dict:
    owner, scientist = duet.local_pair(audit_log=tmp_path / "a.jsonl")
    try:
        return fuzz_session.tiny_actions(owner, scientist, n, barrier=20_000)
    finally:
        scientist.close()
        owner.close()


def test_many_tiny_actions_finish_with_bounded_memory(tmp_path):
    r = _tiny_actions(20_000, tmp_path)
    assert r["value"] == 20_000
    assert r["rss_peak_growth_mb"] < 500
    assert r["objects_on_owner"] <= 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_hundred_thousand_tiny_actions(tmp_path):
    """200k fire-and-forget x.add_(1); the million-action run is benchmarks/fuzz_session.py --tiny-actions."""
    r = _tiny_actions(200_000, tmp_path)
    assert r["value"] == 200_000
    assert r["rss_peak_growth_mb"] < 500, r
    assert r["seconds"] < 400, r


def test_fire_and_forget_actions_over_the_queue_limit_are_not_lost_silently(tmp_path):
    owner, scientist = duet.local_pair(
        approve="everything", limits=duet.Limits(max_queued_actions=5), audit_log=tmp_path / "a.jsonl"
    )
    try:
        x = scientist.send(torch.zeros(1))
        blocker = x + 1  # waits for compute approval, holding the queue
        owner.requests.wait_pending(10, kind="compute")
        for _ in range(20):
            scientist._call("method", "add_", [x, 1], {}, want_result=False)
        owner.requests.add_handler(action="accept", kind="compute")
        blocker.get(timeout=30)
        with pytest.raises(duet.LimitExceeded, match="queued"):
            scientist.ping(timeout=30)  # the refused actions are reported, not lost
        value = x.get(timeout=30).item()
        assert value < 20  # some were refused ...
        scientist.ping(timeout=30)  # ... and reported once
    finally:
        scientist.close()
        owner.close()


# --------------------------------------------------------------------------- lineage through identity
def _leak_via_same_object(scientist: duet.Scientist) -> duet.Pointer:
    ages = scientist.store["ages"]
    own = scientist.send(torch.zeros(4))
    same = own.float()  # on the owner this returns the very same tensor object
    same.add_(ages)  # in place: taints `same`'s group
    return own


def _leak_via_positional_out(scientist: duet.Scientist) -> duet.Pointer:
    own = scientist.send(np.zeros(4, dtype=np.float32))
    scientist.numpy.add(scientist.store["ages"].numpy(), 0.0, own)  # numpy's positional `out`
    return own


@pytest.mark.parametrize("attack", [_leak_via_same_object, _leak_via_positional_out])
def test_private_values_cannot_reach_own_objects_through_identity(pair, attack):
    _, scientist = pair
    own = attack(scientist)
    scientist.ping(timeout=30)
    if not own.private:  # refused outright (positional out), or it would be private
        assert not np.any(np.asarray(own.get(timeout=30)) > 1), "private values reached a public object"


def test_identity_alias_is_private(pair):
    _, scientist = pair
    assert _leak_via_same_object(scientist).private


# --------------------------------------------------------------------------- signaling load
@pytest.mark.timeout(180)
def test_signaling_service_under_load():
    """200 WebSockets in 20 rooms, all pairing at once through the real service process."""
    signaling_load = _load("signaling_load")
    r = asyncio.run(signaling_load.load(rooms=20, scientists=9, size=3000, rounds=1, timeout=60, probes=40))
    assert r["connections_held"] == 200 and r["connections_held_after"] == 200, r
    assert not r["room_errors"], r["room_errors"]
    assert r["messages_relayed"] == r["messages_expected"] == 360
    assert r["latency_ms"]["count"] == 360
    assert r["latency_ms"]["p99"] < 2000, r["latency_ms"]
    assert r["latency_one_ms"]["p99"] < 1000, r["latency_one_ms"]
    assert r["service_alive"] and r["service_rss_peak_kb"] < 500 * 1024
