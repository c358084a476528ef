"""The fast path between two computers: network namespaces on one bridge (tests/natlab.py).

An owner process and a scientist process on two LAN hosts (198.18.0.10x, no NAT), paired through
a real duet-signaling in the lab's internet namespace, ICE over the real network:

- the path comes up between the two addresses and carries a 32 MiB .get() (sha256 checked);
- with a firewall on both hosts that drops every new inbound TCP connection, it cannot come up,
  and the same .get() arrives intact over the data channel.

Needs root (skipped otherwise) and nftables.
"""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests import natlab

pytestmark = pytest.mark.slow

if os.geteuid() != 0:
    pytest.skip("the lab needs root (network namespaces, nftables)", allow_module_level=True)

SIGNALING_PORT = 8010
MB = 32


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple]:
    natlab.require_lab()
    with natlab.Internet() as internet:
        _, url = internet.start_signaling(SIGNALING_PORT)
        yield internet, url
    assert natlab.leftover_namespaces() == []


def run_pair(internet: natlab.Internet, url: str, firewall: bool) -> dict:
    with internet.lan_hosts(2) as (owner_host, scientist_host):
        if firewall:
            owner_host.block_inbound_tcp()
            scientist_host.block_inbound_tcp()
        wait = "3" if firewall else "20"
        scientist = natlab.start_scientist(scientist_host, "--get-mb", str(MB), "--releases", "0", "--fast-path-wait", wait)
        owner, info = natlab.start_owner(owner_host, url, MB, network=True)
        natlab.send_line(scientist, info["code"])
        result = scientist.next_json(180)
        assert scientist.popen.wait(30) == 0, "".join(scientist.stderr[-30:])
        natlab.stop_proc(owner)
        result["owner_ip"], result["scientist_ip"] = owner_host.home_ip, scientist_host.home_ip
        return result


def test_up_between_two_hosts_on_a_bridge(lab):
    internet, url = lab
    result = run_pair(internet, url, firewall=False)
    assert "error" not in result, result
    assert result["fast_path_settled"] is True
    assert result["fast_path"].startswith(f"up: TCP to {result['owner_ip']}:"), result
    assert result["fast_received"] >= MB * 2**20
    assert result["sha_ok"] is True and result["kind"] == "direct"


def test_a_firewall_keeps_it_down_and_the_data_channel_carries_the_transfer(lab):
    internet, url = lab
    result = run_pair(internet, url, firewall=True)
    assert "error" not in result, result
    assert not str(result["fast_path"]).startswith("up"), result
    assert result["fast_received"] == 0
    assert result["sha_ok"] is True
