"""A signaling relay that tampers with sealed messages makes pairing fail clearly, never succeed."""
from __future__ import annotations

import time
from typing import List

import pytest
import tornado.httpserver
import tornado.netutil
import torch

import duet
import duet_signaling
from duet import runtime
from duet_signaling.service import RunningService, SignalingState

pytestmark = pytest.mark.slow


class TamperingState(SignalingState):
    """The relay of a hostile service: it sees sealed payloads and may change, reflect or replay them."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "honest"
        self.recorded_offers: List[str] = []
        self.scientists = {}

    def _relay(self, room, target, sender_id, data):  # type: ignore[override]
        to_owner = sender_id != "owner"
        if to_owner:
            self.recorded_offers.append(data)
            self.scientists[sender_id] = None
        mode = self.mode
        if mode == "alter_offer" and to_owner or mode == "alter_answer" and not to_owner:
            mid = len(data) // 2
            data = data[:mid] + ("A" if data[mid] != "A" else "B") + data[mid + 1:]
        elif mode == "reflect" and to_owner:
            # hand the scientist its own offer back, as if the owner had answered
            return super()._relay(room, room.scientists[sender_id], "owner", data)
        elif mode == "replay" and to_owner and len(self.recorded_offers) > 1:
            data = self.recorded_offers[0]
        elif mode == "drop_answer" and not to_owner:
            return None
        return super()._relay(room, target, sender_id, data)


@pytest.fixture
def hostile(tmp_path):
    state = TamperingState()

    async def start() -> RunningService:
        app = duet_signaling.make_app(state=state)
        sockets = tornado.netutil.bind_sockets(0, address="127.0.0.1")
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        return RunningService(server, state, "127.0.0.1", sockets[0].getsockname()[1])

    service = runtime.run(start(), timeout=10)
    owner = duet.launch(name="o", signaling=service.url, local_only=True, display=False, audit_log=tmp_path / "a.jsonl")
    owner.store.add(torch.tensor([1.0, 2.0]), name="x")
    yield state, owner
    owner.close()
    runtime.run(service.stop(), timeout=10)


@pytest.mark.parametrize("mode,match", [("alter_offer", "could not verify"), ("alter_answer", "decrypt|tamper")])
def test_altered_messages_fail_pairing(hostile, mode, match):
    state, owner = hostile
    state.mode = mode
    start = time.perf_counter()
    with pytest.raises(duet.PairingError, match=match):
        duet.join(owner.code, local_only=True, timeout=15)
    assert time.perf_counter() - start < 10
    assert owner.scientists == []


def test_reflected_offer_fails_pairing(hostile):
    state, owner = hostile
    state.mode = "reflect"
    with pytest.raises(duet.PairingError, match="own role|reflect"):
        duet.join(owner.code, local_only=True, timeout=5)
    assert owner.scientists == []


def test_replayed_offer_is_refused(hostile):
    state, owner = hostile
    first = duet.join(owner.code, name="first", local_only=True, timeout=15)
    try:
        owner.wait_for_scientist(10)
        state.mode = "replay"
        with pytest.raises(duet.PairingError, match="replayed"):
            duet.join(owner.code, name="second", local_only=True, timeout=15)
        assert [c.requester.name for c in owner.scientists] == ["first"]
        assert first.store["x"].sum().request("still fine").status in ("pending", "accepted")
    finally:
        first.close()


def test_dropped_answer_times_out_clearly(hostile):
    state, owner = hostile
    state.mode = "drop_answer"
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="did not answer within 2"):
        duet.join(owner.code, local_only=True, timeout=2)
    assert time.perf_counter() - start < 4


def test_room_squatter_with_the_code_is_refused(tmp_path):
    """Anyone holding the code could register its room first (a hosted service restarted) and answer offers.

    The code commits to the owner's identity key, so the scientist refuses an
    answer signed by any other key, even though the squatter's messages are
    sealed correctly with the secret from the code.
    """
    import asyncio

    from duet.connect import OwnerSignaling, ice_config
    from duet.owner.host import Owner
    from duet.pairing import JoinCode
    from duet.signaling_client import SignalingClient

    service = runtime.run(duet_signaling.start(host="127.0.0.1", port=0), timeout=10)
    real_owner = duet.identity.Identity.ephemeral()
    code = JoinCode.new(service.url, owner_key=real_owner.public_key)  # what the real owner read out
    squatter = Owner(name="squatter", audit_log=tmp_path / "s.jsonl", identity=duet.identity.Identity.ephemeral())

    async def squat() -> OwnerSignaling:
        client = await SignalingClient.connect(code.signaling_url, code.room_id, "owner", timeout=10)
        sig = OwnerSignaling(owner=squatter, code=code, client=client, ice=ice_config(True, None))
        sig.task = asyncio.ensure_future(sig.serve())
        return sig

    sig = runtime.run(squat(), timeout=15)
    try:
        start = time.perf_counter()
        with pytest.raises(duet.PairingError, match="not the owner who made this join code"):
            duet.join(str(code), name="victim", local_only=True, timeout=15)
        assert time.perf_counter() - start < 15
    finally:
        runtime.run(sig.close(), timeout=10)
        squatter.close()
        runtime.run(service.stop(), timeout=10)
