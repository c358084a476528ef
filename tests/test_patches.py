"""The installed aioice and aiortc still have what duet.transport.patches (and route) rely on.

Those modules use names neither library documents: aioice's host address lookup, the
private state and methods of aiortc's SCTP association, the ICE connection behind a peer
connection. Each test here checks one of them exists with the shape the patch expects, or
that the patch still has its effect, so an upgrade that breaks one fails here by name rather
than as a slow or leaky link. Every peer stays on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import inspect

import aioice.ice
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.rtcsctptransport import RTCSctpTransport

from duet import runtime
from duet.transport import patches
from duet.transport.ice import IceConfig
from duet.transport.route import Route, selected_route
from duet.transport.sdp import LOOPBACK, candidate_addresses
from duet.transport.webrtc import RtcPeer

TIMEOUT = 20.0


def _original_get_host_addresses():
    f = aioice.ice.get_host_addresses
    return getattr(f, "__wrapped__", f)


async def _pc_with_channel() -> RTCPeerConnection:
    pc = RTCPeerConnection(configuration=RTCConfiguration(iceServers=[]))
    pc.createDataChannel("duet", ordered=True, negotiated=True, id=0)
    return pc


# -- loopback gathering ---------------------------------------------------------------------


def test_aioice_looks_up_host_addresses_where_the_patch_wraps_them():
    params = list(inspect.signature(_original_get_host_addresses()).parameters)
    assert params == ["use_ipv4", "use_ipv6"]
    # gather_candidates finds it as a global of aioice.ice at call time, so replacing it there works.
    assert "get_host_addresses" in aioice.ice.Connection.gather_candidates.__code__.co_names


def test_loopback_gathering_offers_only_127_0_0_1():
    async def gather(local_only: bool) -> str:
        pc = await _pc_with_channel()
        try:
            await patches.set_local_description(pc, await pc.createOffer(), local_only=local_only)
            return pc.localDescription.sdp
        finally:
            await pc.close()

    sdp = runtime.run(gather(True), TIMEOUT, "loopback gathering")
    addresses = candidate_addresses(sdp)
    assert addresses and set(addresses) == {LOOPBACK}, addresses
    # Outside a loopback-only gathering the wrapper is the original lookup (which skips 127.0.0.1).
    assert aioice.ice.get_host_addresses is not _original_get_host_addresses()
    assert aioice.ice.get_host_addresses(True, False) == _original_get_host_addresses()(True, False)
    assert LOOPBACK not in aioice.ice.get_host_addresses(True, False)
    assert patches._LOOPBACK_GATHERING.get() is False


# -- SCTP tuning ------------------------------------------------------------------------------


def test_aiortc_sctp_has_what_the_tuned_subclass_overrides():
    assert inspect.iscoroutinefunction(RTCSctpTransport._send_sack)
    assert list(inspect.signature(RTCSctpTransport._send_sack).parameters) == ["self"]
    assert not inspect.iscoroutinefunction(RTCSctpTransport._t3_expired)
    assert list(inspect.signature(RTCSctpTransport._t3_expired).parameters) == ["self"]
    assert RTCSctpTransport.State.ESTABLISHED
    # The window must be a plain instance attribute: the subclass turns it into a capped property.
    assert not hasattr(RTCSctpTransport, "_cwnd")

    async def state() -> dict:
        pc = await _pc_with_channel()
        try:
            return dict(vars(pc.sctp))
        finally:
            await pc.close()

    attrs = runtime.run(state(), TIMEOUT, "sctp state")
    assert isinstance(attrs["_cwnd"], int) and attrs["_cwnd"] > 0
    for name in ("_sack_needed", "_sack_misordered", "_sack_duplicates", "_association_state", "_loop",
                 "_remote_max_message_size"):
        assert name in attrs, name


def test_tune_sctp_installs_the_tuned_class_and_caps_the_window():
    async def tune() -> tuple:
        pc = await _pc_with_channel()
        try:
            before = pc.sctp._cwnd
            assert patches.tune_sctp(pc, cwnd_max=1 << 20, sack_every=2)
            sctp = pc.sctp
            kept = sctp._cwnd
            sctp._cwnd = 1 << 30
            capped = sctp._cwnd
            again = patches.tune_sctp(pc)
            return type(sctp), before, kept, capped, again
        finally:
            await pc.close()

    cls, before, kept, capped, again = runtime.run(tune(), TIMEOUT, "tune sctp")
    assert cls is patches._TunedSctpTransport and issubclass(cls, RTCSctpTransport)
    assert kept == before and capped == 1 << 20
    assert again is False  # only a plain RTCSctpTransport is tuned


# -- on a real link: every patch in effect, and the ICE internals route.py reads ----------------------


async def _connect() -> tuple:
    a = await RtcPeer.create(IceConfig(local_only=True))
    b = await RtcPeer.create(IceConfig(local_only=True))
    await a.accept_answer(await b.accept_offer(await a.create_offer()))
    return await a.wait_open(TIMEOUT), await b.wait_open(TIMEOUT), a, b


@pytest.fixture
def link():
    ta, tb, a, b = runtime.run(_connect(), TIMEOUT, "WebRTC connect")
    yield ta, tb, a, b
    for p in (a, b):
        runtime.run(p.close(), TIMEOUT, "close")


def test_on_a_real_link_the_patches_are_in_effect(link):
    ta, tb, a, b = link
    async def exchange() -> None:
        received = asyncio.get_running_loop().create_future()
        count = 0

        def on_message(_m: bytes) -> None:
            nonlocal count
            count += 1
            if count == 200 and not received.done():
                received.set_result(None)

        tb.set_handlers(on_message, lambda _e: None)
        for _ in range(200):
            ta.send(b"x" * 3000)
        await asyncio.wait_for(received, TIMEOUT)

    runtime.run(exchange(), TIMEOUT, "exchange")
    for peer in (a, b):
        sctp = peer.pc.sctp
        assert type(sctp) is patches._TunedSctpTransport
        assert peer.socket_buffers, "no ICE socket found through iceGatherer._connection._protocols"
    # aiortc calls _send_sack through the instance, so the receiver went through the override.
    assert "_duet_sack_count" in vars(b.pc.sctp)
    assert ta.stats()["sctp_t3_expired"] == 0


def test_on_a_real_link_ice_exposes_the_nominated_pair(link):
    ta, _, a, _ = link
    connection = a.pc.sctp.transport.transport._connection
    pair = connection._nominated.get(1)
    assert pair is not None
    assert (pair.local_candidate.type, str(pair.local_candidate.transport).lower()) == ("host", "udp")
    assert pair.remote_candidate.type == "host"
    assert isinstance(connection.turn_ssl, bool) and connection.turn_transport == "udp"
    assert selected_route(a.pc) == Route(kind="direct", local_type="host", remote_type="host", protocol="udp")
    assert ta.route == selected_route(a.pc)
