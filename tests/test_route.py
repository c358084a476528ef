"""The route report: which path a link took, on both sides, read from ICE's nominated pair."""
from __future__ import annotations

import pytest

import duet
from duet.transport.route import Route


def test_an_in_process_pair_says_so(pair):
    _, scientist = pair
    route = scientist.connection
    assert route.kind == "in-process" and route.rtt is not None and route.rtt >= 0
    assert str(route) == "in-process (no network)"


@pytest.mark.slow
def test_a_webrtc_link_reports_a_direct_udp_route_on_both_sides():
    owner = duet.launch(name="o", local_only=True, display=False)
    try:
        scientist = duet.join(owner.code, name="s", local_only=True, timeout=30)
        try:
            route = scientist.connection
            assert (route.kind, route.local_type, route.remote_type, route.protocol) == ("direct", "host", "host", "udp")
            assert 0 < route.rtt < 5
            assert str(route).startswith("direct over udp, host -> host candidates, rtt ")
            theirs = owner.wait_for_scientist(10).route
            assert isinstance(theirs, Route) and (theirs.kind, theirs.protocol) == ("direct", "udp")
        finally:
            scientist.close()
    finally:
        owner.close()


def test_relay_routes_are_named_relay():
    class Cand:
        def __init__(self, type_: str) -> None:
            self.type, self.transport = type_, "UDP"

    class Pair:
        local_candidate, remote_candidate = Cand("relay"), Cand("srflx")

    class Obj:
        pass

    pc = Obj()
    pc.sctp = Obj()
    pc.sctp.transport = Obj()
    pc.sctp.transport.transport = Obj()
    pc.sctp.transport.transport._connection = Obj()
    pc.sctp.transport.transport._connection.turn_transport = "tcp"  # TURN over TCP: the relay candidate itself is UDP
    pc.sctp.transport.transport._connection._nominated = {1: Pair()}
    from duet.transport.route import selected_route

    assert selected_route(pc) == Route(kind="relay", local_type="relay", remote_type="srflx", protocol="tcp")
    pc.sctp.transport.transport._connection._nominated = {}
    assert selected_route(pc) is None
