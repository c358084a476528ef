"""No route: ICE failure is noticed from ICE itself, fast, and explained; TURN URLs are tried in turn.

The NAT lab (tests/test_nat_lab.py) shows the same between real NATs; here the failure is made on
loopback by rewriting each side's candidates to a socket that swallows every packet, so both
sides check against a black hole, as behind two NATs that cannot be crossed.
"""
from __future__ import annotations

import asyncio
import re
import socket
import time

import pytest

import duet
from duet import runtime
from duet.transport.ice import IceConfig, candidate_types, expand_servers, no_route_message, server_choices
from duet.transport.webrtc import RtcPeer

HOST_ONLY = "a=candidate:1 1 udp 2130706431 10.0.0.2 5000 typ host\r\n"
HOST_SRFLX = HOST_ONLY + "a=candidate:2 1 udp 1694498815 198.18.0.7 40000 typ srflx raddr 10.0.0.2 rport 5000\r\n"
WITH_RELAY = HOST_SRFLX + "a=candidate:3 1 udp 16777215 198.18.0.9 50000 typ relay raddr 198.18.0.7 rport 40000\r\n"


def test_candidate_types_reads_each_type_and_transport():
    assert candidate_types(WITH_RELAY) == {"host": {"udp"}, "srflx": {"udp"}, "relay": {"udp"}}
    assert candidate_types("") == {} and candidate_types(None) == {}


def test_turn_urls_are_tried_udp_first_then_tcp_then_tls_with_the_first_stun_server():
    servers = [
        "stun:a.example:3478", "stun:b.example:3478",
        {"urls": ["turns:t.example:443?transport=tcp", "turn:t.example:3478?transport=tcp", "turn:t.example:3478"],
         "username": "u", "credential": "p"},
    ]
    choices = [[u.url for u in c] for c in server_choices(servers)]
    assert choices == [
        ["stun:a.example:3478", "turn:t.example:3478"],
        ["stun:a.example:3478", "turn:t.example:3478?transport=tcp"],
        ["stun:a.example:3478", "turns:t.example:443?transport=tcp"],
    ]
    assert all(u.username == "u" for c in server_choices(servers) for u in c if u.is_turn)
    assert [[u.url for u in c] for c in server_choices(servers, with_stun=False)][0] == ["turn:t.example:3478"]
    assert server_choices([]) == [[]] and [[u.url for u in c] for c in server_choices(["stun:a:1"])] == [["stun:a:1"]]


def test_a_bad_ice_server_entry_fails_when_configured_naming_it():
    with pytest.raises(ValueError, match="'http://x'"):
        IceConfig(servers=["http://x"])
    with pytest.raises(TypeError, match="int"):
        IceConfig(servers=[3478])
    with pytest.raises(TypeError, match="URL is a string"):
        expand_servers([{"urls": [None]}])


@pytest.mark.parametrize("mine, theirs, servers, expect", [
    (HOST_ONLY, HOST_ONLY, [], "no STUN or TURN server is configured"),
    (HOST_SRFLX, HOST_SRFLX, ["stun:s:3478"], "a TURN server is needed"),
    (HOST_SRFLX, HOST_ONLY, ["stun:s:3478"], "the owner's side host candidate; no direct route and no relay"),
    (HOST_SRFLX, HOST_SRFLX, ["stun:s:3478", {"urls": "turn:t:3478", "username": "u", "credential": "p"}],
     "the TURN server (turn:t:3478) gave you no relay address"),
    (WITH_RELAY, HOST_SRFLX, ["turn:t:3478"], "a TURN relay was offered but no check through it succeeded"),
])
def test_the_message_says_what_each_side_gathered_and_what_to_do(mine, theirs, servers, expect):
    text = no_route_message(mine, theirs, expand_servers(servers), "the owner", 10)
    assert text.startswith("no network route to the owner after 10 s of ICE checks: your side gathered ")
    assert expect in text and "docs/networks.md" in text


def _black_hole() -> socket.socket:
    """A UDP socket on loopback that receives and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _redirect_candidates(sdp: str, port: int) -> str:
    """Every candidate's port replaced by `port` (DTLS fingerprints untouched)."""
    return re.sub(r"^(a=candidate:\S+ \d+ \S+ \d+ 127\.0\.0\.1 )\d+", lambda m: m.group(1) + str(port), sdp, flags=re.M)


@pytest.mark.slow
def test_both_sides_fail_fast_with_connection_failed_when_every_check_goes_unanswered():
    hole = _black_hole()
    port = hole.getsockname()[1]

    async def scenario():
        offerer = await RtcPeer.create(IceConfig(local_only=True), ice_check_timeout=1.5)
        answerer = await RtcPeer.create(IceConfig(local_only=True), ice_check_timeout=1.5)
        try:
            offer = await offerer.create_offer()
            answer = await answerer.accept_offer(_redirect_candidates(offer, port))
            await offerer.accept_answer(_redirect_candidates(answer, port))
            started = time.monotonic()
            results = await asyncio.gather(offerer.wait_open(20, peer="the owner"),
                                           answerer.wait_open(20, peer="the scientist"), return_exceptions=True)
            return results, time.monotonic() - started
        finally:
            await offerer.close()
            await answerer.close()

    try:
        (mine, theirs), took = runtime.run(scenario(), timeout=30)
    finally:
        hole.close()
    assert isinstance(mine, duet.ConnectionFailed) and isinstance(mine, duet.PairingError), mine
    assert isinstance(theirs, duet.ConnectionFailed), theirs
    assert took < 5, f"noticed after {took:.1f} s, not from the ICE check timeout"
    assert str(mine).startswith("no network route to the owner after 1.5 s of ICE checks: your side gathered host candidate")
    assert "no STUN or TURN server is configured" in str(mine)
    assert str(theirs).startswith("no network route to the scientist")


@pytest.mark.slow
def test_a_turn_url_that_gives_no_relay_is_followed_by_the_next_one():
    """UDP TURN unanswered (gathering gives up after aioice's 5 s), then TCP TURN refused: both were tried."""
    hole = _black_hole()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused at once
    servers = [{"urls": [f"turn:127.0.0.1:{closed.getsockname()[1]}?transport=tcp",
                         f"turn:127.0.0.1:{hole.getsockname()[1]}"], "username": "u", "credential": "p"}]

    async def scenario():
        peer = await RtcPeer.create(IceConfig(servers=servers))
        try:
            started = time.monotonic()
            sdp = await peer.create_offer()
            return sdp, [u.url for u in peer.servers], time.monotonic() - started
        finally:
            await peer.close()

    try:
        sdp, used, took = runtime.run(scenario(), timeout=30)
    finally:
        hole.close()
        closed.close()
    assert used == [servers[0]["urls"][0]], "after UDP gave no relay, the TCP URL is the one in use"
    assert "relay" not in candidate_types(sdp) and "host" in candidate_types(sdp)
    assert 4 < took < 12, took


def test_an_offered_ice_server_aiortc_cannot_parse_is_dropped_not_fatal(caplog):
    """The offer comes from the untrusted service: a bad URL in it must not turn pairing into a ValueError."""
    from duet.connect import ice_config

    offered = ["turn:relay.test:notaport", "stun:127.0.0.1:3478", {"urls": ["turn:127.0.0.1:3478"], "username": "u", "credential": "p"}]
    config = ice_config(False, None, offered=offered)
    assert config.servers == offered[1:]
    assert "ignored an ICE server the signaling service offered" in caplog.text
