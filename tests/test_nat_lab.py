"""Owner and scientist in two homes behind real NATs, through real coturn and duet-signaling.

The lab (tests/natlab.py) is network namespaces joined by veths, with nftables NAT in each home's
router; only 198.18.0.0/15 addresses, nothing connected to the machine's own network. The
internet namespace with coturn and three signaling services (STUN only; STUN and TURN; nothing)
is shared by the module; each case gets new routers and homes, so no NAT state carries over.

- the lab itself: cone NATs keep one mapping per socket (also after an unsolicited packet, the
  trap natlab's docstring describes, which a control router without the early drop falls into),
  symmetric NATs do not, homes cannot reach each other's LAN, UDP-blocked lets out only TCP to
  the TURN and signaling ports;
- a route is found: cone/cone with STUN is direct (server-reflexive), cone/symmetric and
  symmetric/symmetric with TURN are relayed, UDP-blocked/cone relays over TCP to the TURN server;
  each makes a small auto-approved release and gets a seeded 16 MiB tensor (sha256 checked);
- no route: ConnectionFailed within 15 s of join() on the scientist's side and a
  connection_failed event on the owner's, saying what is missing (TURN; or any server at all).

Needs root (skipped otherwise, or where namespaces cannot be made) and nftables + coturn (fails
without them: CI installs them).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Dict, Iterator, NamedTuple

import pytest

from tests import natlab
from tests.procs.helpers import Proc

pytestmark = pytest.mark.slow

if os.geteuid() != 0:
    pytest.skip("the NAT lab needs root (network namespaces, nftables)", allow_module_level=True)

# signaling services in the lab's own namespace (always free ports)
SIGNALING_STUN_PORT, SIGNALING_TURN_PORT, SIGNALING_BARE_PORT = 8000, 8001, 8002
CLOSED_PORT = 8009  # nothing listens there
MB = 16
JOIN_FAILS_WITHIN = 15.0
PROBE_PORTS = (7001, 7002, 7003)
LOCAL_PORT = 40000
NOTHING_WITHIN = 0.5  # how long we wait for a packet that must not arrive


class Lab(NamedTuple):
    internet: natlab.Internet
    stun_url: str  # signaling offering only the lab's STUN server
    turn_url: str  # signaling offering STUN and TURN (UDP, then TCP), with REST credentials
    bare_url: str  # signaling offering no ICE server at all

    def url(self, servers: str) -> str:
        return {"stun": self.stun_url, "turn": self.turn_url, "none": self.bare_url}[servers]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    natlab.require_lab()
    with natlab.Internet() as internet:
        internet.start_turn()
        _, stun_url = internet.start_signaling(SIGNALING_STUN_PORT, *internet.ice_args(turn=False))
        _, turn_url = internet.start_signaling(SIGNALING_TURN_PORT, *internet.ice_args(turn=True))
        _, bare_url = internet.start_signaling(SIGNALING_BARE_PORT)
        yield Lab(internet, stun_url, turn_url, bare_url)
    assert natlab.leftover_namespaces() == []


# --------------------------------------------------------------------------
# the lab itself


def _udp(site_or_internet, *extra: str) -> Proc:
    proc = site_or_internet.python("-m", "tests.natlab", "udp", *extra) if isinstance(site_or_internet, natlab.Site) \
        else site_or_internet.spawn(sys.executable, "-m", "tests.natlab", "udp", *extra)
    assert "ready" in proc.next_json(20)
    return proc


def _next_with(proc: Proc, key: str, timeout: float = 5.0) -> Dict:
    """The next JSON line with `key` (a reflector also reports what it receives)."""
    deadline = time.monotonic() + timeout
    while True:
        line = proc.next_json(max(deadline - time.monotonic(), 0.01))
        if key in line:
            return line


def _send(proc: Proc, from_port: int, host: str, port: int, data: str = "hello") -> None:
    natlab.send_line(proc, json.dumps({"send": [from_port, host, port], "data": data}))
    _next_with(proc, "sent")


def _mapped(client: Proc, port: int) -> str:
    """Where the reflector on `port` saw our LOCAL_PORT socket coming from (the NAT's mapping)."""
    _send(client, LOCAL_PORT, natlab.INET_IP, port)
    got = _next_with(client, "recv")
    assert got.get("from") == f"{natlab.INET_IP}:{port}", got
    return json.loads(got["recv"])["seen"]


def _nothing(proc: Proc, what: str) -> None:
    try:
        got = proc.next_json(NOTHING_WITHIN)
    except TimeoutError:
        return
    raise AssertionError(f"{what}: {got}")


def _tcp(site: natlab.Site, port: int) -> Dict:
    proc = site.python("-m", "tests.natlab", "tcp-connect", "--to", f"{natlab.INET_IP}:{port}", "--timeout", "1")
    return proc.next_json(20)


def test_the_lab_behaves_as_labelled(lab):
    """Cone keeps a mapping (even after an unsolicited packet), symmetric does not; homes are unreachable."""
    reflector = _udp(lab.internet, "--ip", natlab.INET_IP, "--ports", ",".join(map(str, PROBE_PORTS)), "--reflect")
    try:
        _check_nat_kinds(lab, reflector)
        _check_the_trap_is_real(lab, reflector)
    finally:
        natlab.stop_proc(reflector)


def _check_nat_kinds(lab: Lab, reflector: Proc) -> None:
    with lab.internet.homes("cone", "symmetric", "udp-blocked") as (cone, symmetric, blocked):
        a, b, c = (_udp(site, "--ports", str(LOCAL_PORT)) for site in (cone, symmetric, blocked))

        # cone: one external address for one socket, whatever the destination
        seen = {_mapped(a, port) for port in PROBE_PORTS[:2]}
        assert len(seen) == 1 and seen.pop().startswith(cone.wan_ip + ":")
        cone_mapping = _mapped(a, PROBE_PORTS[0])
        # an unsolicited packet to that mapping is dropped, and dropped early enough that our own
        # later packet to its sender keeps the mapping (the trap: natlab's docstring)
        ip, port = cone_mapping.split(":")
        _send(reflector, PROBE_PORTS[2], ip, int(port), "unsolicited")
        _nothing(a, "an unsolicited packet crossed the cone NAT")
        assert _mapped(a, PROBE_PORTS[2]) == cone_mapping

        # symmetric: a new external port per destination
        first, second = (_mapped(b, port) for port in PROBE_PORTS[:2])
        assert first != second and first.startswith(symmetric.wan_ip + ":") and second.startswith(symmetric.wan_ip + ":")
        # ... so a cone peer sending to the mapping it learned from a server does not get through
        ip, port = first.split(":")
        _send(a, LOCAL_PORT, ip, int(port), "to the symmetric mapping")
        _nothing(b, "a packet crossed the symmetric NAT to a mapping made for another destination")

        # no home reaches another home's LAN address
        _send(a, LOCAL_PORT, symmetric.home_ip, LOCAL_PORT, "to a private address")
        _send(b, LOCAL_PORT, cone.home_ip, LOCAL_PORT, "to a private address")
        _nothing(b, "a home reached another home's LAN address")
        _nothing(a, "a home reached another home's LAN address")

        # UDP blocked: nothing comes back; TCP only to the TURN and signaling ports
        _send(c, LOCAL_PORT, natlab.INET_IP, PROBE_PORTS[0])
        _nothing(c, "UDP crossed the UDP-blocking NAT")
        assert _tcp(blocked, SIGNALING_TURN_PORT)["connected"] is True
        assert _tcp(blocked, natlab.TURN_PORT)["connected"] is True
        assert _tcp(blocked, CLOSED_PORT) == {"connected": False, "error": "TimeoutError"}  # dropped, not refused
        assert _tcp(cone, CLOSED_PORT) == {"connected": False, "error": "ConnectionRefusedError"}  # it got there


def _check_the_trap_is_real(lab: Lab, reflector: Proc) -> None:
    """Without the early drop the same sequence moves the mapping: the check above can see the trap."""
    leaky = lab.internet.site("cone", 9, early_drop=False)
    try:
        d = _udp(leaky, "--ports", str(LOCAL_PORT))
        mapping = _mapped(d, PROBE_PORTS[0])
        ip, port = mapping.split(":")
        _send(reflector, PROBE_PORTS[2], ip, int(port), "unsolicited")
        _nothing(d, "an unsolicited packet crossed the NAT")
        assert _mapped(d, PROBE_PORTS[2]) != mapping, "the router confirmed the unsolicited packet, yet kept the port"
    finally:
        try:
            leaky.close()
        finally:
            lab.internet.sites.remove(leaky)


# --------------------------------------------------------------------------
# owner and scientist across the NATs


def _explain(lab: Lab, result: Dict, owner: Proc) -> str:
    return (f"scientist: {json.dumps(result)}\nowner stderr:\n{''.join(owner.stderr[-15:])}"
            f"\ncoturn log:\n{lab.internet.turn_log(15)}")


@contextlib.contextmanager
def _pair(lab: Lab, owner_nat: str, scientist_nat: str, servers: str) -> Iterator:
    """Two homes, an owner process and a scientist's result; the owner must then exit cleanly.

    servers: what the signaling service offers: "none", "stun" or "turn" (STUN and TURN).
    """
    url = lab.url(servers)
    with lab.internet.homes(owner_nat, scientist_nat) as (owner_home, scientist_home):
        result, owner = natlab.pair_once(lab.internet, owner_home, scientist_home, url, get_mb=MB)
        try:
            yield result, owner
        finally:
            rc = natlab.stop_proc(owner)
        assert rc == 0, "the owner process did not exit cleanly:\n" + "".join(owner.stderr[-30:])


def _check_transfers(lab: Lab, result: Dict, owner: Proc) -> None:
    why = _explain(lab, result, owner)
    assert "error" not in result, why
    assert result["release_ok"] is True, why
    assert result["sha_ok"] is True, why


@pytest.mark.parametrize("owner_nat, scientist_nat, servers, kind", [
    pytest.param("cone", "cone", "stun", "direct", id="cone-cone-stun-direct"),
    pytest.param("cone", "symmetric", "turn", "relay", id="cone-symmetric-turn-relay"),
    pytest.param("symmetric", "symmetric", "turn", "relay", id="symmetric-symmetric-turn-relay"),
    pytest.param("cone", "udp-blocked", "turn", "relay", id="cone-udpblocked-turn-tcp-relay"),
])
def test_a_route_is_found_and_reported(lab, owner_nat, scientist_nat, servers, kind):
    with _pair(lab, owner_nat, scientist_nat, servers) as (result, owner):
        _check_transfers(lab, result, owner)
        why = _explain(lab, result, owner)
        assert result["kind"] == kind, why
        assert str(result["route"]).startswith(f"{kind} over "), why
        if kind == "direct":
            # two cone NATs: hole punching between server-reflexive addresses
            assert "srflx" in (result["local_type"], result["remote_type"]), why
            assert result["protocol"] == "udp", why
        if scientist_nat == "udp-blocked":
            # the only way out is TCP to the TURN server: our relay candidate, reached over TCP
            assert result["local_type"] == "relay", why
            assert result["protocol"] == "tcp", why
        elif kind == "relay":
            assert result["protocol"] == "udp", why


@pytest.mark.parametrize("owner_nat, scientist_nat, servers, advice", [
    # a symmetric NAT with STUN only: hole punching cannot work, TURN is what is missing
    pytest.param("cone", "symmetric", "stun", "a TURN server is needed", id="cone-symmetric-stun"),
    # two ordinary NATs and no server at all: not even hole punching (docs/networks.md says so)
    pytest.param("cone", "cone", "none", "no STUN or TURN server is configured", id="cone-cone-no-servers"),
])
def test_no_route_fails_fast_on_both_sides_saying_what_is_missing(lab, owner_nat, scientist_nat, servers, advice):
    """ConnectionFailed within 15 s of the join, naming TURN; the owner reports the failed pairing too."""
    with _pair(lab, owner_nat, scientist_nat, servers) as (result, owner):
        why = _explain(lab, result, owner)
        assert result.get("error") == "ConnectionFailed", why
        assert result["stage"] == "join" and result["seconds"] < JOIN_FAILS_WITHIN, why
        assert "TURN" in result["message"] and advice in result["message"], why
        event = _next_with(owner, "event", timeout=20)
        assert event == {"event": "connection_failed", "scientist": "Dr. Lee", "message": event["message"]}, event
        assert "TURN" in event["message"] and advice in event["message"], event
