"""Real processes, real WebRTC on 127.0.0.1, a real signaling service process."""
from __future__ import annotations

import hashlib
import socket
import threading
import time

import pytest
import torch

import duet
from duet.pairing import JoinCode
from tests.procs.helpers import start_owner, start_signaling

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def signaling():
    proc, url = start_signaling()
    yield url
    proc.stop()


def test_two_processes_ops_approval_and_64mb_get(signaling, capsys):
    owner_proc, info = start_owner("--signaling", signaling, "--big-mb", "64", "--accept-all")
    try:
        start = time.perf_counter()
        scientist = duet.join(info["code"], name="Dr. Lee", local_only=True)
        assert time.perf_counter() - start < 5
        assert scientist.owner_fingerprint == info["fingerprint"]
        assert torch.equal((scientist.store["ages"] * 2 + 1).mean().get(timeout=30), torch.tensor(79.5))
        big = scientist.store["big"]
        assert big.shape == torch.Size([64 * 2**18])
        value = big.get(reason="checksum test", timeout=120)
        expected = torch.rand(64 * 2**18, generator=torch.Generator().manual_seed(1234))
        assert hashlib.sha256(value.numpy().tobytes()).hexdigest() == hashlib.sha256(expected.numpy().tobytes()).hexdigest()
        captured = capsys.readouterr()
        assert "receiving big" in captured.err + captured.out  # a progress bar for the 64 MB transfer
        scientist.close()
    finally:
        rc = owner_proc.stop()
        assert rc == 0, "".join(owner_proc.stderr[-40:])


def test_wrong_code_is_a_clear_error(signaling):
    owner_proc, info = start_owner("--signaling", signaling)
    try:
        code = info["code"]
        typo = ("X" if code[3] != "X" else "Y").join([code[:3], code[4:]])
        with pytest.raises(duet.PairingError, match="typo"):
            duet.join(typo, local_only=True, timeout=10)
        other_room = str(JoinCode.new(signaling))  # well formed, but no owner has it
        start = time.perf_counter()
        with pytest.raises(duet.SignalingError, match="no such room"):
            duet.join(other_room, local_only=True, timeout=10)
        assert time.perf_counter() - start < 5
    finally:
        owner_proc.stop()


def test_expired_room_refuses_joins():
    sig_proc, url = start_signaling("--room-ttl-seconds", "1")
    owner_proc, info = start_owner("--signaling", url)
    try:
        assert owner_proc.next_json(20).get("event") == "room_closed"
        with pytest.raises(duet.SignalingError, match="no such room"):
            duet.join(info["code"], local_only=True, timeout=10)
    finally:
        owner_proc.stop()
        sig_proc.stop()


def test_signaling_down_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    code = str(JoinCode.new(f"http://127.0.0.1:{port}"))
    start = time.perf_counter()
    with pytest.raises(duet.SignalingError, match="could not reach"):
        duet.join(code, local_only=True, timeout=5)
    assert time.perf_counter() - start < 6


def test_owner_killed_mid_transfer_fails_the_get(signaling):
    owner_proc, info = start_owner("--signaling", signaling, "--big-mb", "64", "--accept-all")
    scientist = duet.join(info["code"], name="Dr. Lee", local_only=True)
    try:
        started = threading.Event()
        scientist.session.transport.on_progress = lambda received, total: started.set()
        handle = scientist.store["big"].request("kill test")
        assert started.wait(60), "the transfer never started"
        owner_proc.kill()
        start = time.perf_counter()
        with pytest.raises(duet.ConnectionLost):
            handle.wait(60)
        assert time.perf_counter() - start < 45
        assert scientist.session.wait_closed(10)
    finally:
        scientist.close()
        owner_proc.stop()


def test_scientist_killed_owner_keeps_serving(signaling, tmp_path):
    import subprocess
    import sys

    owner = duet.launch(name="o", signaling=signaling, local_only=True, display=False, audit_log=tmp_path / "a.jsonl")
    try:
        owner.store.add(torch.ones(2**22), name="big")
        owner.requests.add_handler(action="accept", datasets=["big"])
        script = (
            "import duet, sys; s = duet.join(sys.argv[1], name='doomed', local_only=True); "
            "print('joined', flush=True); s.store['big'].request('x'); sys.stdin.read()"
        )
        child = subprocess.Popen([sys.executable, "-c", script, owner.code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "joined"
        owner.wait_for_scientist(30)
        child.kill()
        child.wait(10)
        deadline = time.monotonic() + 45
        while owner.scientists and time.monotonic() < deadline:
            owner.requests.wait_changed(0.5)
        assert owner.scientists == []
        with duet.join(owner.code, name="next", local_only=True) as scientist:
            assert scientist.store["big"].sum().get(timeout=30).item() == 2**22
    finally:
        owner.close()


def test_join_approval_by_owner(signaling, tmp_path):
    owner = duet.launch(name="o", signaling=signaling, local_only=True, display=False, approve_joins=True, audit_log=tmp_path / "a.jsonl")
    try:
        result = {}

        def scientist_joins() -> None:
            try:
                result["scientist"] = duet.join(owner.code, name="Dr. Lee", local_only=True, reason="study 7")
            except Exception as exc:
                result["error"] = exc

        t = threading.Thread(target=scientist_joins)
        t.start()
        req = owner.requests.wait_pending(30, kind="join")
        assert req.requester.name == "Dr. Lee" and req.reason == "study 7"
        req.accept()
        t.join(30)
        assert "scientist" in result, result.get("error")
        result["scientist"].close()

        t = threading.Thread(target=scientist_joins)
        result.clear()
        t.start()
        owner.requests.wait_pending(30, kind="join").deny("not today")
        t.join(30)
        assert isinstance(result.get("error"), duet.RequestDenied) and "not today" in str(result["error"])
    finally:
        owner.close()


def test_owner_serves_several_scientists_separately(signaling, tmp_path):
    owner = duet.launch(name="o", signaling=signaling, local_only=True, display=False, audit_log=tmp_path / "a.jsonl")
    owner.store.add(torch.tensor([1.0, 2.0]), name="x")
    scientists = [duet.join(owner.code, name=f"s{i}", local_only=True) for i in range(3)]
    try:
        mine = [s.send(torch.tensor([float(i)])) for i, s in enumerate(scientists)]
        sums = []
        for i, (s, p) in enumerate(zip(scientists, mine)):
            assert p.get(timeout=10).item() == float(i)
            sums.append(s.store["x"].sum())
            sums[-1].request(f"from s{i}")
        for s in scientists:
            s.ping()
        deadline = time.monotonic() + 30
        while len(owner.requests.pending) < 3 and time.monotonic() < deadline:
            owner.requests.wait_changed(0.5)
        who = sorted(r.requester.name for r in owner.requests.pending)
        assert who == ["s0", "s1", "s2"]
        assert len({r.requester.fingerprint for r in owner.requests.pending}) == 1  # same machine, same identity
        assert len(owner.scientists) == 3 and sorted(len(c.objects) for c in owner.scientists) == [2, 2, 2]
    finally:
        for s in scientists:
            s.close()
        owner.close()


def test_signaling_killed_after_pairing_then_restarted(tmp_path):
    sig_proc, url = start_signaling()
    port = url.rsplit(":", 1)[-1]
    owner = duet.launch(name="o", signaling=url, local_only=True, display=False, audit_log=tmp_path / "a.jsonl")
    restarted = None
    try:
        owner.store.add(torch.tensor([1.0, 2.0]), name="x")
        owner.requests.add_handler(action="accept", datasets=["x"])
        scientist = duet.join(owner.code, name="early", local_only=True)
        sig_proc.kill()
        # the peer link does not need the signaling service
        assert scientist.store["x"].sum().get(timeout=30).item() == 3.0
        with pytest.raises(duet.SignalingError):
            duet.join(owner.code, name="meanwhile", local_only=True, timeout=5)
        restarted, _ = start_signaling("--port", port)
        owner.signaling.wait_registration(2, timeout=30)
        with duet.join(owner.code, name="later", local_only=True) as later:
            assert later.store["x"].max().get(timeout=30).item() == 2.0
        scientist.close()
    finally:
        owner.close()
        if restarted is not None:
            restarted.stop()


def test_owner_closing_tells_scientists_why(signaling, tmp_path):
    owner = duet.launch(name="o", signaling=signaling, local_only=True, display=False, audit_log=tmp_path / "a.jsonl")
    owner.store.add(torch.tensor([1.0, 2.0]), name="x")
    scientist = duet.join(owner.code, name="s", local_only=True)
    handle = scientist.store["x"].sum().request("pending when the owner leaves")
    owner.requests.wait_pending(10)
    owner.close(reason="the clinic closes at six")
    with pytest.raises((duet.ConnectionLost, duet.RequestDenied), match="clinic closes at six"):
        handle.wait(30)
    assert scientist.session.wait_closed(30)
    with pytest.raises(duet.ConnectionLost, match="clinic closes at six"):
        scientist.send(torch.ones(1))
    scientist.close()
