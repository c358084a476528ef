"""A NAT lab: an "internet" and homes behind real Linux NAT (nftables), in network namespaces.

    internet  dl<pid>i   bridge br0 198.18.0.1/24: coturn, duet-signaling, probes
              |          default route: veth "sink" to a neighbour that does not exist (packets vanish)
              +-- router  dl<pid>r<k>  wan 198.18.0.<10+k>/24 --nftables NAT-- lan 198.19.<n>.1/24
                           +-- home    dl<pid>h<k>  eth0 198.19.<n>.2/24, default via the router
              +-- lan host dl<pid>b<k>  eth0 198.18.0.<100+k>/24 on the bridge itself (no NAT)

Only 198.18.0.0/15 addresses, IPv6 off, and nothing is connected to the namespace this runs in:
no packet can leave the namespaces the lab creates. Every namespace, link and process is removed
by close(), which the context managers call in `finally`. Needs root, iproute2, nftables, coturn.

NAT kinds (Site.nat), each router's ruleset is `nat_ruleset(kind)`:

- "cone": `masquerade`. Linux keeps one external port per internal socket as long as it is free
  (endpoint-independent mapping) and lets in only replies to what went out (port-restricted).
- "symmetric": `masquerade random`: a new external port for every destination.
- "udp-blocked": only TCP to ports 3478, 443 and the signaling ports goes out; all UDP is dropped.

Three traps, and what this does about them:

- `fwd` is a keyword in nft: chains are named `early_drop`, `forward_chain`, `postrouting_chain`.
- Unsolicited packets from the WAN (a peer's connectivity check arriving before ours went out)
  must be dropped before conntrack confirms an entry for them. If one is confirmed (e.g. it is
  delivered to the router's input and answered with ICMP port unreachable), the reply tuple of our
  own later packet to that peer clashes with it and the NAT moves the mapping to another port, so
  hole punching between two cone NATs fails. They are dropped in a prerouting filter chain at
  priority mangle (-150): after conntrack has looked the packet up (-200), so `ct state` is
  known, and long before confirmation. (At -300, raw, conntrack has not run yet and every packet
  would look the same.) test_nat_lab checks the mapping stays put after such a packet.
- coturn's relay sockets die on ENETUNREACH when a peer asks it to send to a private address the
  internet cannot route (a host candidate). The internet namespace's default route goes to a veth
  with a permanent neighbour entry for a gateway that does not exist: sends succeed, packets vanish.

Also a small probe tool for tests and benchmarks (no torch, starts fast):

    python -m tests.natlab udp --ports 7001,7002 [--reflect]   # JSON lines on stdin/stdout
    python -m tests.natlab stun --server 198.18.0.1:3478       # one binding request: the mapped address
    python -m tests.natlab tcp-splice --port 443               # joins one sender to one receiver
    python -m tests.natlab tcp-send --to 198.18.0.1:443 --mb 16
    python -m tests.natlab tcp-recv --to 198.18.0.1:443
    python -m tests.natlab tcp-connect --to 198.18.0.1:8000 --timeout 1
    python -m tests.natlab cleanup     # namespaces of lab runs that were killed (their pid is gone)
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from tests.procs.helpers import Proc

ROOT = Path(__file__).resolve().parents[1]

INET_IP = "198.18.0.1"
INET_PREFIX = 24
SINK_GATEWAY = "198.18.1.254"  # on-link via the sink veth; nothing answers to its MAC
SINK_MAC = "02:00:00:00:00:01"
TURN_PORT = 3478
TURN_MIN_PORT, TURN_MAX_PORT = 49152, 49500
ALLOWED_TCP_PORTS = (3478, 443)  # what a UDP-blocking network lets out, plus the signaling ports
LAB_RANGE = "198.18.0.0-198.19.255.255"
NAT_KINDS = ("cone", "symmetric", "udp-blocked")
COMMAND_TIMEOUT = 15.0
TOOLS = {"ip": "iproute2", "nft": "nftables", "turnserver": "coturn"}


class LabUnavailable(Exception):
    """Network namespaces cannot be made here (not root, or no permission in this container)."""


# --------------------------------------------------------------------------
# prerequisites


def missing_tools() -> List[str]:
    return [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]


def check_prerequisites() -> None:
    """LabUnavailable (skip) when not root or namespaces cannot be made; RuntimeError (fail) for missing tools."""
    if os.geteuid() != 0:
        raise LabUnavailable("the NAT lab needs root (network namespaces, nftables)")
    missing = missing_tools()
    if missing:
        raise RuntimeError("the NAT lab needs " + ", ".join(missing)
                           + ": install iproute2, nftables and coturn (apt-get install iproute2 nftables coturn; CI does)")
    probe = f"dl{os.getpid()}p"
    try:
        sh("ip", "netns", "add", probe)
    except RuntimeError as exc:
        raise LabUnavailable(f"cannot create a network namespace here: {exc}") from None
    finally:
        sh("ip", "netns", "del", probe, check=False)


def require_lab() -> None:
    """In a test: skip when the lab cannot run here (not root, no namespaces), fail when a tool is missing."""
    import pytest

    try:
        check_prerequisites()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    except RuntimeError as exc:
        pytest.fail(str(exc))


# --------------------------------------------------------------------------
# commands


def sh(*args: str, input: Optional[str] = None, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> str:
    """Run a command (bounded in time); RuntimeError with its stderr when it fails."""
    try:
        done = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(args)}: no exit within {timeout} s") from None
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def in_ns(ns: str, *args: str) -> List[str]:
    return ["ip", "netns", "exec", ns, *args]


def _new_namespace(name: str) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    # No IPv6 anywhere (not even link-local): every packet in the lab is IPv4 in 198.18.0.0/15.
    if os.path.exists("/proc/sys/net/ipv6"):
        sh(*in_ns(name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
                  "net.ipv6.conf.lo.disable_ipv6=1"))


def _kill_namespace(name: str) -> None:
    """Kill what still runs in one of our namespaces (only processes we started live there), then delete it."""
    out = sh("ip", "netns", "pids", name, check=False)
    for pid in (int(p) for p in out.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    sh("ip", "netns", "del", name, check=False)


def nat_ruleset(kind: str, tcp_ports: Sequence[int] = ALLOWED_TCP_PORTS, early_drop: bool = True) -> str:
    """The router's nftables ruleset for a NAT kind (see the module docstring).

    early_drop=False leaves out the drop of unsolicited WAN packets before conntrack confirms them:
    only to show the trap (the router's input then answers them and their entries stay).
    """
    if kind not in NAT_KINDS:
        raise ValueError(f"unknown NAT kind {kind!r}; one of {NAT_KINDS}")
    masquerade = "masquerade random" if kind == "symmetric" else "masquerade"
    if kind == "udp-blocked":
        ports = ", ".join(str(p) for p in sorted(set(tcp_ports)))
        outbound = f'iifname "lan" oifname "wan" meta l4proto tcp tcp dport {{ {ports} }} accept'
    else:
        outbound = 'iifname "lan" oifname "wan" accept'
    drop = 'iifname "wan" ct state != { established, related } drop' if early_drop else ""
    return f"""
table ip natlab {{
    chain early_drop {{
        type filter hook prerouting priority mangle; policy accept;
        {drop}
    }}
    chain forward_chain {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        {outbound}
    }}
    chain postrouting_chain {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" {masquerade}
    }}
}}
"""


# --------------------------------------------------------------------------
# processes


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for lab processes: no loopback-only mode or ICE servers from the caller's shell."""
    env = {"DUET_LOCAL_ONLY": "", "DUET_ICE_SERVERS": "", "DUET_SIGNALING_URL": "", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    env.update(extra or {})
    return env


def _proc(ns: str, args: Sequence[str], env: Optional[Dict[str, str]] = None) -> Proc:
    return Proc(in_ns(ns, *args), env=child_env(env))


def stop_proc(proc: Proc, polite: bool = True, timeout: float = 10.0) -> Optional[int]:
    """Stop one of our processes by its own pid: close stdin (if polite), then SIGTERM, then SIGKILL."""
    if polite:
        return proc.stop(timeout)
    if proc.popen.poll() is None:
        proc.popen.terminate()
        try:
            return proc.popen.wait(5)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
    try:
        return proc.popen.wait(5)
    except subprocess.TimeoutExpired:
        return None


# --------------------------------------------------------------------------
# the lab


@dataclass
class Site:
    """A home behind a NAT router: where an owner or a scientist runs."""

    lab: "Internet"
    index: int
    nat: str
    lan: int
    early_drop: bool = True
    procs: List[Proc] = field(default_factory=list)
    closed: bool = False

    @property
    def router(self) -> str:
        return f"dl{self.lab.pid}r{self.index}"

    @property
    def home(self) -> str:
        return f"dl{self.lab.pid}h{self.index}"

    @property
    def wan_ip(self) -> str:
        return f"198.18.0.{10 + self.index}"

    @property
    def home_ip(self) -> str:
        return f"198.19.{self.lan}.2"

    @property
    def gateway_ip(self) -> str:
        return f"198.19.{self.lan}.1"

    def build(self) -> None:
        lab, router, home = self.lab, self.router, self.home
        _new_namespace(router)
        _new_namespace(home)
        port = f"p{self.index}"  # the router's port on the internet bridge
        sh("ip", "link", "add", "name", "wan", "netns", router, "type", "veth", "peer", "name", port, "netns", lab.ns)
        sh("ip", "-n", lab.ns, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", router, "addr", "add", f"{self.wan_ip}/{INET_PREFIX}", "dev", "wan")
        sh("ip", "-n", router, "link", "set", "wan", "up")
        sh("ip", "link", "add", "name", "lan", "netns", router, "type", "veth", "peer", "name", "eth0", "netns", home)
        sh("ip", "-n", router, "addr", "add", f"{self.gateway_ip}/24", "dev", "lan")
        sh("ip", "-n", router, "link", "set", "lan", "up")
        sh("ip", "-n", router, "route", "add", "default", "via", INET_IP)
        sh(*in_ns(router, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
        sh(*in_ns(router, "nft", "-f", "-"), input=nat_ruleset(self.nat, (*ALLOWED_TCP_PORTS, *lab.signaling_ports), self.early_drop))
        sh("ip", "-n", home, "addr", "add", f"{self.home_ip}/24", "dev", "eth0")
        sh("ip", "-n", home, "link", "set", "eth0", "up")
        sh("ip", "-n", home, "route", "add", "default", "via", self.gateway_ip)

    def spawn(self, *args: str, env: Optional[Dict[str, str]] = None) -> Proc:
        """A process in the home namespace (its stdin/stdout are pipes to us)."""
        proc = _proc(self.home, args, env)
        self.procs.append(proc)
        return proc

    def python(self, *args: str, env: Optional[Dict[str, str]] = None) -> Proc:
        return self.spawn(sys.executable, *args, env=env)

    def config_env(self, role: str) -> Dict[str, str]:
        """A fresh DUET_CONFIG_DIR (identity, audit log) for one process of this site."""
        path = tempfile.mkdtemp(prefix=f"{role}-", dir=self.lab.tmp)
        return {"DUET_CONFIG_DIR": path}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for proc in self.procs:
                stop_proc(proc, polite=False)
        finally:
            _kill_namespace(self.home)
            _kill_namespace(self.router)


@dataclass
class BridgeHost(Site):
    """A computer on the internet bridge itself, no NAT: two of them are peers on one LAN.

    Address 198.18.0.<100+index>; reaches the other hosts and the lab's services directly.
    `block_inbound_tcp()` installs a firewall that drops every new inbound TCP connection.
    """

    @property
    def home(self) -> str:
        return f"dl{self.lab.pid}b{self.index}"

    @property
    def home_ip(self) -> str:
        return f"198.18.0.{100 + self.index}"

    def build(self) -> None:
        lab, host = self.lab, self.home
        _new_namespace(host)
        port = f"q{self.index}"
        sh("ip", "link", "add", "name", "eth0", "netns", host, "type", "veth", "peer", "name", port, "netns", lab.ns)
        sh("ip", "-n", lab.ns, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", host, "addr", "add", f"{self.home_ip}/{INET_PREFIX}", "dev", "eth0")
        sh("ip", "-n", host, "link", "set", "eth0", "up")

    def block_inbound_tcp(self) -> None:
        sh(*in_ns(self.home, "nft", "-f", "-"), input=INBOUND_TCP_BLOCKED)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for proc in self.procs:
                stop_proc(proc, polite=False)
        finally:
            _kill_namespace(self.home)


INBOUND_TCP_BLOCKED = """
table inet firewall {
    chain input {
        type filter hook input priority 0; policy accept;
        iifname "lo" accept
        tcp flags & (syn | ack) == syn drop
    }
}
"""


class Internet:
    """The internet namespace: a bridge, a silent default route, coturn and signaling services."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.ns = f"dl{self.pid}i"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"natlab{self.pid}-"))
        self.turn_secret = secrets.token_hex(16)
        self.signaling_ports: List[int] = []
        self.procs: List[Proc] = []
        self.sites: List[Site] = []
        self.turn: Optional[subprocess.Popen] = None
        self._next_site = 0
        self._up = False

    # -- life cycle ----------------------------------------------------------
    def start(self) -> "Internet":
        _new_namespace(self.ns)
        self._up = True
        ns = self.ns
        sh(*in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=0"))  # drops, silently, what is not for it
        sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", ns, "addr", "add", f"{INET_IP}/{INET_PREFIX}", "dev", "br0")
        sh("ip", "-n", ns, "link", "set", "br0", "up")
        sh("ip", "-n", ns, "link", "add", "sink", "type", "veth", "peer", "name", "sinkp")
        sh("ip", "-n", ns, "link", "set", "sink", "up")
        sh("ip", "-n", ns, "link", "set", "sinkp", "up")
        sh("ip", "-n", ns, "neigh", "replace", SINK_GATEWAY, "lladdr", SINK_MAC, "dev", "sink", "nud", "permanent")
        sh("ip", "-n", ns, "route", "add", "default", "via", SINK_GATEWAY, "dev", "sink", "onlink")
        return self

    def close(self) -> None:
        """Everything the lab made: processes, sites, the internet namespace, temp files."""
        try:
            for site in list(self.sites):
                with contextlib.suppress(Exception):
                    site.close()
            for proc in self.procs:
                with contextlib.suppress(Exception):
                    stop_proc(proc, polite=False)
            if self.turn is not None and self.turn.poll() is None:
                self.turn.terminate()
                try:
                    self.turn.wait(5)
                except subprocess.TimeoutExpired:
                    self.turn.kill()
                    self.turn.wait(5)
        finally:
            if self._up:
                _kill_namespace(self.ns)
                self._up = False
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "Internet":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- services ------------------------------------------------------------
    def spawn(self, *args: str, env: Optional[Dict[str, str]] = None) -> Proc:
        proc = _proc(self.ns, args, env)
        self.procs.append(proc)
        return proc

    def start_turn(self, timeout: float = 15.0) -> None:
        """coturn on INET_IP:3478 (UDP and TCP), REST-API secret auth, relaying only inside the lab."""
        conf = self.tmp / "turnserver.conf"  # our own file: the distribution's default logs to syslog
        conf.write_text(f"static-auth-secret={self.turn_secret}\n")  # the secret in no process list
        log = open(self.tmp / "turnserver.log", "w")
        args = [
            "turnserver", "-c", str(conf), "--use-auth-secret", "--realm=duet.test",
            f"--listening-ip={INET_IP}", f"--relay-ip={INET_IP}", f"--listening-port={TURN_PORT}",
            f"--min-port={TURN_MIN_PORT}", f"--max-port={TURN_MAX_PORT}",
            "--no-tls", "--no-dtls", "--no-cli", "--fingerprint", "--no-rfc5780", "--no-multicast-peers",
            "--log-file=stdout", "--simple-log", f"--pidfile={self.tmp / 'turnserver.pid'}", f"--db={self.tmp / 'turndb'}",
            # Relay to lab addresses only (coturn denies loopback by default; everything else is denied here).
            "--denied-peer-ip=0.0.0.0-255.255.255.255", f"--allowed-peer-ip={LAB_RANGE}",
        ]
        self.turn = subprocess.Popen(in_ns(self.ns, *args), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        # Ready when it answers a STUN binding request (the probe retries, bounded).
        probe = self.spawn(sys.executable, "-m", "tests.natlab", "stun", "--server", f"{INET_IP}:{TURN_PORT}",
                           "--tries", str(int(timeout / 0.2)), "--interval", "0.2")
        try:
            answer = probe.next_json(timeout + 5)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"coturn did not answer STUN: {exc}\n{self.turn_log()}") from None
        if "mapped" not in answer:
            raise RuntimeError(f"coturn did not answer STUN: {answer}\n{self.turn_log()}")
        if self.turn.poll() is not None:
            raise RuntimeError(f"coturn exited ({self.turn.returncode})\n{self.turn_log()}")

    def turn_log(self, lines: int = 40) -> str:
        path = self.tmp / "turnserver.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "".join(text.splitlines(keepends=True)[-lines:])

    def ice_args(self, turn: bool) -> List[str]:
        """duet-signaling options: the lab's STUN server, and its TURN URLs (UDP, then TCP) if asked."""
        args = ["--ice-server", f"stun:{INET_IP}:{TURN_PORT}"]
        if turn:
            args += ["--turn-url", f"turn:{INET_IP}:{TURN_PORT}",
                     "--turn-url", f"turn:{INET_IP}:{TURN_PORT}?transport=tcp"]
        return args

    def start_signaling(self, port: int, *extra: str) -> Tuple[Proc, str]:
        """A real duet-signaling on 0.0.0.0:port here; returns (proc, the URL homes use)."""
        if self.sites:
            raise RuntimeError("start signaling services before sites: the UDP-blocked ruleset lists their ports")
        proc = self.spawn(sys.executable, "-m", "duet_signaling", "--host", "0.0.0.0", "--port", str(port), *extra,
                          env={"DUET_TURN_SECRET": self.turn_secret})
        proc.next_line(30, "duet-signaling listening on ")  # says 0.0.0.0: homes need our address
        self.signaling_ports.append(port)
        return proc, f"http://{INET_IP}:{port}"

    # -- sites ---------------------------------------------------------------
    def site(self, nat: str, lan: int, early_drop: bool = True) -> Site:
        """A new router and home (close() it, or use homes()); LAN 198.19.<lan>.0/24."""
        if self._next_site >= 200:
            raise RuntimeError("too many sites in one lab")
        if not 1 <= lan <= 254:
            raise ValueError("lan is 1..254")
        site = Site(self, self._next_site, nat, lan, early_drop)
        self._next_site += 1
        try:
            site.build()
        except BaseException:
            site.close()
            raise
        self.sites.append(site)
        return site

    @contextlib.contextmanager
    def lan_hosts(self, count: int = 2) -> Iterator[Tuple[BridgeHost, ...]]:
        """Computers on the bridge, no NAT between them (BridgeHost); torn down on exit."""
        hosts: List[BridgeHost] = []
        try:
            for _ in range(count):
                host = BridgeHost(self, self._next_site, "none", 0)
                self._next_site += 1
                hosts.append(host)
                host.build()
            self.sites.extend(hosts)
            yield tuple(hosts)
        finally:
            for host in hosts:
                try:
                    host.close()
                finally:
                    if host in self.sites:
                        self.sites.remove(host)

    @contextlib.contextmanager
    def homes(self, *nats: str) -> Iterator[Tuple[Site, ...]]:
        """One home per NAT kind, each behind its own router; the n-th on LAN 198.19.<n>.0/24.

        The tests put the owner in the first (198.19.1.0/24) and the scientist in the second.
        Everything is torn down on exit, also on failure.
        """
        sites: List[Site] = []
        try:
            for lan, nat in enumerate(nats, start=1):
                sites.append(self.site(nat, lan))
            yield tuple(sites)
        finally:
            for site in sites:
                try:
                    site.close()
                finally:
                    self.sites.remove(site)


_NAME = re.compile(r"^dl(\d+)(i|p|r\d+|h\d+|b\d+)$")


def _lab_namespaces() -> List[Tuple[str, int]]:
    names = [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]
    return [(n, int(m.group(1))) for n in names for m in [_NAME.match(n)] if m]


def leftover_namespaces(pid: Optional[int] = None) -> List[str]:
    """Namespaces of the lab of process `pid` (default: ours) that still exist."""
    pid = pid or os.getpid()
    return [name for name, owner in _lab_namespaces() if owner == pid]


def _cmd_cleanup(args: argparse.Namespace) -> int:
    """Delete lab namespaces whose creating process is gone (a run killed with SIGKILL leaves them)."""
    for name, pid in _lab_namespaces():
        if not os.path.exists(f"/proc/{pid}"):
            _kill_namespace(name)
            _emit(deleted=name)
    return 0


# --------------------------------------------------------------------------
# one owner and one scientist across the lab


def start_owner(site: Site, signaling_url: str, big_mb: int = 16, *extra: str, network: bool = True) -> Tuple[Proc, Dict]:
    """tests.procs.owner in the site's home, on the real network (or loopback); returns (proc, its code line)."""
    proc = site.python("-m", "tests.procs.owner", "--signaling", signaling_url, "--big-mb", str(big_mb),
                       "--accept-all", *(["--network"] if network else []), *extra, env=site.config_env("owner"))
    return proc, proc.next_json(60)


def start_scientist(site: Site, *extra: str) -> Proc:
    """tests.procs.scientist in the site's home, reading the join code from stdin (imports run meanwhile)."""
    return site.python("-m", "tests.procs.scientist", "--code-from-stdin", *extra, env=site.config_env("scientist"))


def send_line(proc: Proc, text: str) -> None:
    assert proc.popen.stdin is not None
    proc.popen.stdin.write(text + "\n")
    proc.popen.stdin.flush()


def pair_once(lab: Internet, owner_site: Site, scientist_site: Site, signaling_url: str, get_mb: int = 16,
              result_timeout: float = 120.0, loopback: bool = False) -> Tuple[Dict, Proc]:
    """A scientist process (started first: its imports overlap the owner's), an owner process, one join.

    Returns the scientist's result line and the owner process, still serving (stop it with stop_proc).
    loopback: both in one home with loopback-only ICE (signaling still crosses the NAT): a baseline.
    """
    if loopback and owner_site is not scientist_site:
        raise ValueError("a loopback pair runs in one home")
    scientist = start_scientist(scientist_site, "--get-mb", str(get_mb), *(["--local-only"] if loopback else []))
    owner, info = start_owner(owner_site, signaling_url, get_mb, network=not loopback)
    send_line(scientist, info["code"])
    result = scientist.next_json(result_timeout)
    rc = scientist.popen.wait(30)
    if rc != 0:
        raise RuntimeError(f"the scientist process exited {rc}: {''.join(scientist.stderr[-30:])}")
    return result, owner


# --------------------------------------------------------------------------
# probe tool (python -m tests.natlab ...)

MAX_LIFETIME = 300.0  # no probe outlives this, whatever happens to its parent


_emit_lock = threading.Lock()


def _emit(**fields: object) -> None:
    with _emit_lock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def _cmd_udp(args: argparse.Namespace) -> int:
    """UDP sockets on --ports; stdin {"send": [from_port, host, port], "data": "..."}; stdout what arrives.

    With --reflect every datagram is answered with {"seen": "ip:port"}: the address it came from.
    """
    socks: Dict[int, socket.socket] = {}
    for port in (int(p) for p in args.ports.split(",")):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((args.ip, port))
        socks[port] = s
    by_fd = {s.fileno(): (port, s) for port, s in socks.items()}
    stop = threading.Event()

    def commands() -> None:
        for line in sys.stdin:
            cmd = json.loads(line)
            from_port, host, port = cmd["send"]
            _emit(sent=[from_port, host, port])  # first: a reply's line must come after this one
            socks[int(from_port)].sendto(str(cmd.get("data", "hello")).encode(), (host, int(port)))
        stop.set()

    threading.Thread(target=commands, daemon=True).start()
    _emit(ready=sorted(socks))
    deadline = time.monotonic() + MAX_LIFETIME
    while not stop.is_set() and time.monotonic() < deadline:
        readable, _, _ = select.select(list(by_fd), [], [], 0.1)
        for fd in readable:
            port, s = by_fd[fd]
            data, addr = s.recvfrom(65536)
            peer = f"{addr[0]}:{addr[1]}"
            _emit(recv=data.decode(errors="replace"), on=port, **{"from": peer})
            if args.reflect:
                s.sendto(json.dumps({"seen": peer}).encode(), addr)
    return 0


def stun_binding_request() -> Tuple[bytes, bytes]:
    tid = secrets.token_bytes(12)
    return struct.pack("!HHI", 0x0001, 0, 0x2112A442) + tid, tid


def stun_mapped_address(data: bytes, tid: bytes) -> Optional[Tuple[str, int]]:
    """XOR-MAPPED-ADDRESS of a binding success response to `tid`, if that is what `data` is."""
    if len(data) < 20:
        return None
    kind, length, cookie = struct.unpack("!HHI", data[:8])
    if kind != 0x0101 or cookie != 0x2112A442 or data[8:20] != tid:
        return None
    pos = 20
    while pos + 4 <= min(len(data), 20 + length):
        attr, alen = struct.unpack("!HH", data[pos:pos + 4])
        value = data[pos + 4:pos + 4 + alen]
        if attr == 0x0020 and len(value) >= 8 and value[1] == 0x01:
            port = struct.unpack("!H", value[2:4])[0] ^ 0x2112
            ip = struct.unpack("!I", value[4:8])[0] ^ 0x2112A442
            return socket.inet_ntoa(struct.pack("!I", ip)), port
        pos += 4 + alen + (-alen % 4)
    return None


def _cmd_stun(args: argparse.Namespace) -> int:
    host, port = args.server.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", args.port))
    s.settimeout(args.interval)
    request, tid = stun_binding_request()
    for _ in range(args.tries):
        s.sendto(request, (host, int(port)))
        try:
            for _ in range(100):  # skip what is not our answer, but not forever
                data, _addr = s.recvfrom(2048)
                mapped = stun_mapped_address(data, tid)
                if mapped:
                    _emit(mapped=f"{mapped[0]}:{mapped[1]}", local=s.getsockname()[1])
                    return 0
        except socket.timeout:
            continue
        except OSError as exc:  # an ICMP error while the server starts; the next try waits on recv again
            _emit(retry=str(exc))
    _emit(error=f"no STUN answer from {args.server} after {args.tries} tries")
    return 0


def _payload(n: int) -> bytes:
    return random.Random(1234).randbytes(n)


def _cmd_tcp_splice(args: argparse.Namespace) -> int:
    """Accept two connections, each saying S (sender) or R (receiver); copy S to R until S ends."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.ip, args.port))
    srv.listen(4)
    srv.settimeout(args.timeout)
    _emit(ready=args.port)
    roles: Dict[bytes, socket.socket] = {}
    for _ in range(8):
        if b"S" in roles and b"R" in roles:
            break
        conn, _ = srv.accept()
        conn.settimeout(args.timeout)
        role = conn.recv(1)
        roles[role] = conn
    sender, receiver = roles[b"S"], roles[b"R"]
    total = 0
    buf = bytearray(1 << 16)
    while True:
        n = sender.recv_into(buf)
        if not n:
            break
        receiver.sendall(memoryview(buf)[:n])
        total += n
    receiver.shutdown(socket.SHUT_WR)
    receiver.close()
    sender.close()
    _emit(spliced=total)
    return 0


def _connect(target: str, timeout: float) -> socket.socket:
    host, port = target.rsplit(":", 1)  # the splice printed "ready" before anyone connects
    return socket.create_connection((host, int(port)), timeout=timeout)


def _cmd_tcp_connect(args: argparse.Namespace) -> int:
    """One TCP connection attempt: {"connected": true}, or the error (refused: it got there; timed out: dropped)."""
    try:
        _connect(args.to, args.timeout).close()
        _emit(connected=True)
    except OSError as exc:
        _emit(connected=False, error=type(exc).__name__)
    return 0


def _cmd_tcp_send(args: argparse.Namespace) -> int:
    data = _payload(args.mb << 20)
    s = _connect(args.to, args.timeout)
    start = time.perf_counter()
    s.sendall(b"S" + data)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # the splice closes after copying everything
    _emit(sent=len(data), seconds=time.perf_counter() - start)
    return 0


def _cmd_tcp_recv(args: argparse.Namespace) -> int:
    s = _connect(args.to, args.timeout)
    s.sendall(b"R")
    digest = hashlib.sha256()
    total, start = 0, None
    buf = bytearray(1 << 16)
    while True:
        n = s.recv_into(buf)
        if not n:
            break
        if start is None:
            start = time.perf_counter()
        digest.update(memoryview(buf)[:n])
        total += n
    seconds = time.perf_counter() - (start or time.perf_counter())
    _emit(bytes=total, seconds=seconds, sha256=digest.hexdigest())
    return 0


def expected_sha256(mb: int) -> str:
    return hashlib.sha256(_payload(mb << 20)).hexdigest()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.natlab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("udp")
    p.add_argument("--ip", default="0.0.0.0")
    p.add_argument("--ports", required=True)
    p.add_argument("--reflect", action="store_true")
    p.set_defaults(fn=_cmd_udp)
    p = sub.add_parser("stun")
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.2)
    p.set_defaults(fn=_cmd_stun)
    p = sub.add_parser("tcp-splice")
    p.add_argument("--ip", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(fn=_cmd_tcp_splice)
    for name, fn in (("tcp-send", _cmd_tcp_send), ("tcp-recv", _cmd_tcp_recv), ("tcp-connect", _cmd_tcp_connect)):
        p = sub.add_parser(name)
        p.add_argument("--to", required=True)
        p.add_argument("--mb", type=int, default=16)
        p.add_argument("--timeout", type=float, default=60.0)
        p.set_defaults(fn=fn)
    p = sub.add_parser("cleanup", help="delete namespaces left by lab runs whose process is gone")
    p.set_defaults(fn=_cmd_cleanup)
    args = ap.parse_args(argv)
    signal.alarm(int(MAX_LIFETIME))  # a probe never outlives a lost parent for long
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
