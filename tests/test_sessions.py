"""Sessions cannot multiply a scientist's share of the owner: per-key caps, a shared budget, handshake deadlines."""
from __future__ import annotations

import secrets
import time
from typing import List

import pytest
import torch

import duet
from duet import identity
from duet.owner import host
from duet.identity import HandshakeContext
from duet.owner.host import Owner
from duet.scientist.client import Scientist
from duet.session import Session
from duet.transport.memory import memory_pair


def _ctx(name: str = "s") -> HandshakeContext:
    fp = "sha-256 " + ":".join(f"{b:02X}" for b in secrets.token_bytes(32))
    return HandshakeContext(room_id=secrets.token_hex(16), session_id=secrets.token_bytes(16), owner_dtls=fp,
                            scientist_dtls=fp, owner_name="o", scientist_name=name)


def _join(owner: Owner, ident: identity.Identity) -> Scientist:
    owner_end, scientist_end = memory_pair()
    ctx = _ctx()
    owner.attach(Session(owner_end, name="owner"), ctx)
    scientist = Scientist(Session(scientist_end, name="scientist"), identity=ident)
    scientist.handshake(ctx, 10)
    return scientist


@pytest.fixture
def owner(tmp_path):
    o = Owner(name="o", audit_log=tmp_path / "a.jsonl", identity=identity.Identity.ephemeral(),
              limits=duet.Limits(max_objects=10, max_sessions_per_key=2))
    o.store.add(torch.tensor([1.0, 2.0]), name="ages")
    yield o
    o.close()


def test_one_key_gets_a_bounded_number_of_sessions(owner):
    key = identity.Identity.ephemeral()
    joined: List[Scientist] = [_join(owner, key), _join(owner, key)]
    with pytest.raises(duet.RequestDenied, match="already has 2 sessions"):
        _join(owner, key)
    other = _join(owner, identity.Identity.ephemeral())  # another key is not affected
    joined.append(other)
    joined[0].close()
    deadline = time.monotonic() + 10
    while owner.sessions_of(key.fingerprint) >= 2:  # woken by the owner's change notification
        assert time.monotonic() < deadline, "the closed session kept its place"
        owner.requests.wait_changed(1.0)
    joined.append(_join(owner, key))  # a closed session frees its place
    for s in joined:
        s.close()


def test_sessions_of_one_key_share_one_budget(owner):
    key = identity.Identity.ephemeral()
    a, b = _join(owner, key), _join(owner, key)
    keep = [a.send(torch.zeros(1)) for _ in range(8)]
    a.ping()
    ok = b.send(torch.zeros(1))
    over = [b.send(torch.zeros(1)) for _ in range(3)]
    b.ping()
    assert torch.equal(ok.get(timeout=10), torch.zeros(1))
    errors = [p for p in over if isinstance(b.failures.get(p.id), duet.LimitExceeded)]
    assert len(errors) == 2, "10 objects across both sessions, not 10 each"
    c = _join(owner, identity.Identity.ephemeral())
    assert all(torch.equal(c.send(torch.ones(1)).get(timeout=10), torch.ones(1)) for _ in range(5))
    del keep
    for s in (a, b, c):
        s.close()


def test_a_link_that_never_says_hello_is_closed(owner, monkeypatch):
    monkeypatch.setattr(host, "HANDSHAKE_TIMEOUT", 0.3)
    owner_end, scientist_end = memory_pair()
    session = Session(scientist_end, name="silent")
    owner.attach(Session(owner_end, name="owner"), _ctx())
    assert session.wait_closed(10), "the owner kept a silent link open"
    assert owner._connections == []


def test_launch_binds_its_embedded_service_to_loopback(tmp_path):
    owner = duet.launch(name="o", display=False, audit_log=tmp_path / "a.jsonl")  # no local_only, no host
    try:
        assert owner.signaling.embedded.host == "127.0.0.1"
        assert "127.0.0.1" in owner.code
    finally:
        owner.close()


def test_an_embedded_service_for_others_advertises_an_interface_address_never_a_host_name():
    from duet.connect import _advertised_host

    host, warning = _advertised_host("0.0.0.0", False, ["127.0.0.1", "192.168.1.20", "8.8.4.4"])
    assert (host, warning) == ("8.8.4.4", None), "a public address first, with no warning"
    host, warning = _advertised_host("0.0.0.0", False, ["127.0.0.1", "169.254.3.4", "192.168.1.20"])
    assert host == "192.168.1.20" and "private address" in warning and "same network" in warning
    host, warning = _advertised_host("0.0.0.0", False, ["127.0.0.1"])
    assert host == "127.0.0.1" and "works only here" in warning
    assert _advertised_host("10.1.2.3", False, [])[0] == "10.1.2.3" and "private" in _advertised_host("10.1.2.3", False, [])[1]
    assert _advertised_host("0.0.0.0", True, ["8.8.4.4"]) == ("127.0.0.1", None)
    # This machine's own interfaces: an IP literal, never socket.getfqdn().
    import ipaddress

    ipaddress.ip_address(_advertised_host("0.0.0.0", False)[0])


@pytest.mark.timeout(120)
def test_embedded_service_stays_far_below_the_file_limit(tmp_path):
    """Connections anyone opens to the embedded service cannot exhaust the owner's file descriptors."""
    import asyncio
    import resource

    from tornado.websocket import websocket_connect

    from duet import runtime

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    owner = None
    try:
        owner = duet.launch(name="o", display=False, audit_log=tmp_path / "a.jsonl")
        service = owner.signaling.embedded
        cap = service.state.limits.max_connections
        assert cap <= 256 // 8

        async def flood() -> int:
            held = []
            for i in range(cap + 20):
                try:
                    ws = await asyncio.wait_for(
                        websocket_connect(f"ws://127.0.0.1:{service.port}/ws?room={i:032x}&role=owner"), 5)
                except Exception:
                    continue
                held.append(ws)
            registered = len(service.state._connections)  # what the service holds open right now
            for ws in held:
                ws.close()
            return registered

        opened = runtime.run(flood(), timeout=60)
        assert opened <= cap
        with open(tmp_path / "still-works.txt", "w") as f:  # the owner's own files are fine
            f.write("ok")
        owner.audit.append("probe")
    finally:
        if owner is not None:
            owner.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
