"""No single action may stall or exhaust the owner: each bomb is refused before it costs much.

Every test runs one attack from a hostile scientist while a heartbeat thread
in the owner's process measures the longest stall (Python big-int and string
arithmetic hold the interpreter lock), a second scientist measures its own
round-trip latency, and the owner's resident memory is sampled. The attack
must be refused with a clear error, the stall and the other scientist's
latency must stay small, and memory must not grow.
"""
from __future__ import annotations

import secrets
import threading
import time
from typing import Any, Callable, Dict

import numpy as np
import pytest
import torch
from torch import nn

import duet
from tests.waiting import until
from duet import identity
from duet.identity import HandshakeContext
from duet.owner.host import Owner
from duet.scientist.client import Scientist
from duet.session import Session
from duet.transport.memory import memory_pair
from duet.wire import Ref

MAX_STALL_S = 0.5
MAX_OTHER_LATENCY_S = 1.0
MAX_RSS_GROWTH_MB = 150


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _join(owner: Owner, name: str) -> Scientist:
    owner_end, scientist_end = memory_pair()
    fp = "sha-256 " + ":".join(f"{b:02X}" for b in secrets.token_bytes(32))
    ctx = HandshakeContext(room_id=secrets.token_hex(16), session_id=secrets.token_bytes(16), owner_dtls=fp,
                           scientist_dtls=fp, owner_name="o", scientist_name=name)
    owner.attach(Session(owner_end, name="owner"), ctx)
    scientist = Scientist(Session(scientist_end, name=name), name=name, identity=identity.Identity.ephemeral())
    scientist.handshake(ctx, 10)
    return scientist


class Watch:
    """Heartbeat, other scientist's latency and RSS, while an attack runs."""

    def __init__(self, other: Scientist) -> None:
        self.other = other
        self.stop = threading.Event()
        self.max_gap = 0.0
        self.max_latency = 0.0
        self.pings = 0
        self.rss0 = _rss_mb()
        self.rss_peak = self.rss0

    def _beat(self) -> None:
        last = time.perf_counter()
        while not self.stop.wait(0.005):
            now = time.perf_counter()
            self.max_gap = max(self.max_gap, now - last)
            self.rss_peak = max(self.rss_peak, _rss_mb())
            last = now

    def _ping(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            self.other.ping(timeout=30)
            self.max_latency = max(self.max_latency, time.perf_counter() - start)
            self.pings += 1

    def __enter__(self) -> "Watch":
        self.threads = [threading.Thread(target=self._beat, daemon=True), threading.Thread(target=self._ping, daemon=True)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def check(self) -> None:
        assert self.pings > 0
        assert self.max_gap < MAX_STALL_S, f"the owner's process stalled for {self.max_gap:.2f} s"
        assert self.max_latency < MAX_OTHER_LATENCY_S, f"another scientist waited {self.max_latency:.2f} s"
        growth = self.rss_peak - self.rss0
        assert growth < MAX_RSS_GROWTH_MB, f"the owner's memory grew by {growth:.0f} MB"


@pytest.fixture
def room(tmp_path):
    limits = duet.Limits(max_bytes=64 * 2**20, max_elements_per_object=2**24, max_pending_releases=8,
                         max_queued_bytes=32 * 2**20)
    owner = Owner(name="o", audit_log=tmp_path / "a.jsonl", identity=identity.Identity.ephemeral(), limits=limits)
    owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0]), name="ages")
    attacker, other = _join(owner, "attacker"), _join(owner, "other")
    yield owner, attacker, other
    for s in (attacker, other):
        s.close()
    owner.close()


def _refused(ptr: duet.Pointer) -> BaseException:
    try:
        ptr.get(timeout=60)
    except (duet.LimitExceeded, duet.NotAllowed) as exc:
        return exc
    raise AssertionError(f"{ptr!r} was not refused")


def _pyint(s: Scientist, v: int) -> duet.Pointer:
    return s.torch.tensor(v).item()  # a Python int on the owner, as a scientist makes one


BOMBS: Dict[str, Callable[[Scientist], duet.Pointer]] = {
    # Python arithmetic holds the interpreter lock
    "3 ** 20_000_000": lambda s: _pyint(s, 3) ** 20_000_000,
    "1 << 10**9": lambda s: _pyint(s, 1) << 10**9,
    "big * big": lambda s: (_pyint(s, 2) ** 60_000) * (_pyint(s, 2) ** 60_000),
    "'x' * 10**9": lambda s: s._call("func", "operator.mul", ["x", 10**9], {}),
    "[0] * 10**9": lambda s: s._call("func", "operator.mul", [[0], 10**9], {}),
    "list doubling": lambda s: _doubled(s),
    # sizes in every form a size can take
    "zeros(numpy int)": lambda s: s.torch.zeros(np.int64(2**40)),
    "zeros(0-d tensor)": lambda s: s._call("func", "torch.zeros", [s.torch.tensor(2**40)], {}),
    "numpy.random.randint size by position": lambda s: s.numpy.random.randint(0, 10, 2**40),
    "numpy.random.normal size by position": lambda s: s.numpy.random.normal(0, 1, 2**40),
    "bytes, not elements (float64)": lambda s: s.torch.zeros(12 * 2**20, dtype=torch.float64),
    "numpy bytes (float64)": lambda s: s.numpy.zeros(12 * 2**20),
    "fixed-width string dtype": lambda s: s.numpy.zeros(10, dtype="U100000000"),
    # argument-sized operations
    "torch.outer": lambda s: s.torch.outer(s.torch.ones(10**5), s.torch.ones(10**5)),
    "torch.kron": lambda s: s.torch.kron(s.torch.ones(3000, 3000), s.torch.ones(3000, 3000)),
    "Tensor.tile": lambda s: s.torch.ones(10).tile(10**5, 10**5),
    "bincount minlength": lambda s: s.torch.bincount(s.send(torch.tensor([1])), minlength=2**40),
    "bincount of a huge value": lambda s: s.torch.bincount(s.send(torch.tensor([2**40]))),
    "repeat_interleave": lambda s: s.torch.repeat_interleave(s.send(torch.tensor([2**40]))),
    "one_hot num_classes": lambda s: s.torch.nn.functional.one_hot(s.send(torch.tensor([1, 2])), 2**40),
    "one_hot of a huge value": lambda s: s.torch.nn.functional.one_hot(s.send(torch.tensor([2**40]))),
    "pad": lambda s: s.torch.nn.functional.pad(s.torch.ones(1, 1), (0, 2**40)),
    "interpolate": lambda s: s.torch.nn.functional.interpolate(s.torch.ones(1, 1, 10), scale_factor=10**9),
    "cartesian_prod": lambda s: s.torch.cartesian_prod(s.torch.ones(10**4), s.torch.ones(10**4), s.torch.ones(10**4)),
    "combinations": lambda s: s.torch.combinations(s.torch.ones(10**4), 3),
    "einsum outer": lambda s: s.torch.einsum("i,j->ij", s.torch.ones(10**5), s.torch.ones(10**5)),
    "diag": lambda s: s.torch.diag(s.torch.ones(10**5)),
    "histc bins": lambda s: s.torch.histc(s.torch.ones(3), bins=2**40),
    "broadcasting": lambda s: s.torch.ones(10**5, 1) + s.torch.ones(1, 10**5),
    "expand then contiguous": lambda s: s.torch.ones(1, 1).expand(10**5, 10**5).contiguous(),
    "conv_transpose": lambda s: s.torch.nn.functional.conv_transpose1d(s.torch.ones(1, 1, 10**4), s.torch.ones(1, 1, 3),
                                                                     stride=10**5),
    "numpy.outer": lambda s: s.numpy.outer(s.numpy.ones(10**5), s.numpy.ones(10**5)),
    "numpy.kron": lambda s: s.numpy.kron(s.numpy.ones((3000, 3000)), s.numpy.ones((3000, 3000))),
    "numpy.tile": lambda s: s.numpy.tile(s.numpy.ones(10), (10**5, 10**5)),
    "numpy.repeat": lambda s: s.numpy.repeat(s.numpy.ones(10), 10**9),
    "numpy.histogram bins": lambda s: s.numpy.histogram(s.numpy.ones(3), bins=2**40),
    "numpy.bincount minlength": lambda s: s.numpy.bincount(s.numpy.ones(3, dtype="int64"), None, 2**40),
    "numpy ufunc broadcasting": lambda s: s.numpy.add(s.numpy.ones((10**5, 1)), s.numpy.ones((1, 10**5))),
    # results made of many Python objects from zero bytes
    "tolist of an empty (10**7, 0)": lambda s: s.torch.zeros(10**7, 0).tolist(),
    "unbind of an empty (10**7, 0)": lambda s: s.torch.zeros(10**7, 0).unbind(),
    "split of an empty (10**7, 0)": lambda s: s.torch.split(s.torch.zeros(10**7, 0), 1),
    "chunk of an empty (10**7, 0)": lambda s: s.torch.zeros(10**7, 0).chunk(10**7),
    "numpy.array_split into 10**7": lambda s: s.numpy.array_split(s.numpy.zeros((10**7, 0)), 10**7),
    "numpy tolist of an empty (10**7, 0)": lambda s: s.numpy.zeros((10**7, 0)).tolist(),
    "unbind into a million tensors": lambda s: s.torch.zeros(10**6 - 1, 0).unbind(),
    "split into a million arrays": lambda s: s.numpy.split(s.numpy.zeros((10**6 - 1, 0)), 10**6 - 1),
    "unbind inside a model": lambda s: s.send(_Unbind())(s.send(torch.ones(2))),
    "tensor_split at 10**6 cut points": lambda s: s.torch.tensor_split(s.torch.zeros(10), s.torch.zeros(10**6, dtype=torch.long)),
    "randn inside a model": lambda s: s.send(_Randn())(s.send(torch.ones(2))),
    # inside a sent model and a plan
    "new_ones inside a model": lambda s: s.send(_NewOnes())(s.send(torch.ones(2))),
    "repeat inside a model": lambda s: s.send(_Repeat())(s.send(torch.ones(2))),
    "data-dependent size inside a model": lambda s: s.send(_RepeatInterleave())(s.send(torch.tensor([2**40]))),
    "repeat inside a plan": lambda s: _repeat_plan(s.send(torch.ones(2))),
}


class _NewOnes(nn.Module):
    def forward(self, x):
        return x.new_ones(10**5, 10**5).sum()


class _Randn(nn.Module):
    def forward(self, x):
        return x + torch.randn(10**5, 10**5).sum()


class _Unbind(nn.Module):
    def forward(self, x):
        return x.new_zeros(10**6 - 1, 0).unbind()[0]


class _Repeat(nn.Module):
    def forward(self, x):
        return x.repeat(10**5, 10**5).sum()


class _RepeatInterleave(nn.Module):
    def forward(self, x):
        return torch.repeat_interleave(x).sum()


@duet.plan
def _repeat_plan(x):
    return x.repeat(10**5, 10**5).sum()


def _doubled(s: Scientist) -> duet.Pointer:
    lst = s.send([0] * 1000)
    for _ in range(20):
        lst = lst + lst
    return lst


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_bomb_is_refused_without_stalling_anyone(room, bomb):
    owner, attacker, other = room
    with Watch(other) as w:
        err = _refused(BOMBS[bomb](attacker))
    w.check()
    assert "would" in str(err) or "limit" in str(err) or "not allowed" in str(err), err
    assert torch.equal((attacker.send(torch.ones(1)) + 1).get(timeout=30), torch.tensor([2.0]))  # still serving


def test_pending_release_snapshots_are_bounded(room):
    owner, attacker, other = room
    big = owner.store["ages"].value.repeat(2**18 // 4)  # 256 Ki elements (1 MiB), private
    owner.store.add(big, name="big")
    ptr = attacker.store["big"] * 1.0
    with Watch(other) as w:
        handles = []
        for i in range(20):  # each would hold a 1 MiB snapshot until the owner decides
            handles.append((ptr + i).request(f"#{i}"))
        attacker.ping(timeout=30)
    w.check()
    refused = 0
    for h in handles:
        try:
            h.wait(0.2)
        except duet.LimitExceeded:
            refused += 1
        except duet.RequestTimeout:
            pass
    assert len(owner.requests.pending) == 8 and refused == 12
    for req in owner.requests.pending:
        req.deny("no")
    assert owner.scientists[0].objects.extra_bytes == 0  # the snapshots no longer count


def test_queued_bytes_are_bounded(tmp_path):
    limits = duet.Limits(max_queued_bytes=8 * 2**20)
    owner = Owner(name="o", approve="everything", audit_log=tmp_path / "a.jsonl",
                  identity=identity.Identity.ephemeral(), limits=limits)
    try:
        attacker = _join(owner, "attacker")
        x = attacker.send(torch.zeros(1))
        blocker = x + 1  # waits for compute approval: the attacker's worker is busy
        owner.requests.wait_pending(10, kind="compute")
        rss0 = _rss_mb()
        rids = []
        for _ in range(40):  # 40 x 1 MiB uploads queue behind it
            rids.append(attacker._new_rid())
            attacker._send_with_frees({"t": "put", "rid": rids[-1], "value": torch.zeros(2**18)})
        # Every upload must have reached the owner (queued or refused) before the worker is freed.
        conn = owner.scientists[0]
        until(lambda: conn._queued + sum(r in conn.failures for r in rids) >= len(rids), 30, "all uploads arrived")
        owner.requests.add_handler(action="accept", kind="compute")
        blocker.get(timeout=30)
        attacker.ping(timeout=30)
        refused = [r for r in rids if isinstance(attacker.failures.get(r), duet.LimitExceeded)]
        assert 25 <= len(refused) <= 34, len(refused)  # 8 MiB queued at most, the rest refused, loudly
        assert all("bytes queued" in str(attacker.failures[r]) for r in refused)
        assert _rss_mb() - rss0 < MAX_RSS_GROWTH_MB  # 40 MiB were sent; what was refused is not kept
        attacker.close()
    finally:
        owner.close()


def test_plan_literals_count_against_the_budget(room):
    owner, attacker, _ = room
    literal = list(range(2**20, 2**20 + 990_000))  # ~36 MB of Python ints once stored on the owner
    pids = []
    for _ in range(2):  # each fits in a message; both do not fit in the 64 MiB budget
        pids.append(attacker._new_rid())
        action = {"rid": 1, "kind": "func", "name": "operator.add", "args": [Ref(0), literal], "kwargs": {}}
        attacker.session.send({"t": "plan_def", "pid": pids[-1], "inputs": 1, "outputs": [1], "name": "big",
                               "actions": [action]})
    attacker.ping(timeout=60)
    assert pids[0] not in attacker.failures
    err = attacker.failures.get(pids[1])
    assert isinstance(err, duet.LimitExceeded) and "memory limit" in str(err)
