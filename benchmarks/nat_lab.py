"""Duet across real NATs (tests/natlab.py): join time, small release, 16 MiB .get(), per route kind.

Routes, each measured --reps times with new routers and homes (fresh NAT state) every time:
  direct        cone/cone, the service offers STUN only: hole punching between srflx addresses
  relay (UDP)   cone owner / symmetric scientist, the service offers TURN (UDP, then TCP)
  relay (TCP)   cone owner / UDP-blocked scientist, the same service: TURN over TCP

Baselines, measured in the same homes right after each Duet run:
  raw TCP       16 MiB from the owner's home to the scientist's home through both NATs. Two NATs
                that both filter let no TCP connection in, so both homes connect out to a byte
                splice in the internet namespace (on port 443, which even the UDP-blocked NAT lets
                out): the path of a relayed route, without WebRTC (no ICE, DTLS, SCTP or Duet), in
                the kernel's TCP. get/raw says what share of the path's capacity Duet uses; on these
                delay-free veths Duet is CPU-bound in aiortc's Python SCTP, so it is small.
  loopback      the same owner and scientist processes in one home with loopback-only ICE (the
                signaling still crosses the NAT): Duet without any NAT, TURN or veth in the data
                path. get/loop is what the route itself costs.

With `tc netem`, the same is repeated with 40 ms added on each router's WAN link (80 ms RTT);
without it (this kernel has no netem) that variant is skipped, saying so.

Needs root, iproute2, nftables, coturn.

    .venv/bin/python benchmarks/nat_lab.py            # --reps 3 --mb 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

try:
    from . import _util
except ImportError:  # run as a script
    import _util  # type: ignore[no-redef]

_util.ensure_path()

from tests import natlab  # noqa: E402

SIGNALING_STUN_PORT, SIGNALING_TURN_PORT = 8000, 8001
SPLICE_PORT = 443
DELAY = "40ms"


@dataclass
class Route:
    label: str
    owner_nat: str
    scientist_nat: str
    turn: bool
    runs: List[Dict] = field(default_factory=list)
    raw: List[float] = field(default_factory=list)  # raw TCP MB/s, one per run
    loopback: List[float] = field(default_factory=list)  # Duet .get() MB/s on loopback in the owner's home


ROUTES = [
    Route("direct (cone/cone, STUN)", "cone", "cone", False),
    Route("relay UDP (cone/symmetric, TURN)", "cone", "symmetric", True),
    Route("relay TCP (cone/UDP-blocked, TURN)", "cone", "udp-blocked", True),
]


def raw_tcp(lab: natlab.Internet, owner_home: natlab.Site, scientist_home: natlab.Site, mb: int) -> float:
    """MB/s of a raw TCP transfer owner home -> splice in the internet -> scientist home."""
    splice = lab.spawn(sys.executable, "-m", "tests.natlab", "tcp-splice", "--ip", natlab.INET_IP,
                       "--port", str(SPLICE_PORT))
    try:
        splice.next_json(20)  # ready
        target = f"{natlab.INET_IP}:{SPLICE_PORT}"
        receiver = scientist_home.python("-m", "tests.natlab", "tcp-recv", "--to", target)
        sender = owner_home.python("-m", "tests.natlab", "tcp-send", "--to", target, "--mb", str(mb))
        got = receiver.next_json(60)
        sender.next_json(60)
        if got["bytes"] != mb << 20 or got["sha256"] != natlab.expected_sha256(mb):
            raise RuntimeError(f"the raw TCP baseline arrived damaged: {got}")
        return got["bytes"] / got["seconds"] / 1e6
    finally:
        natlab.stop_proc(splice, polite=False)


def loopback_get(lab: natlab.Internet, home: natlab.Site, url: str, mb: int) -> float:
    """Duet's .get() MB/s with owner and scientist in one home on loopback ICE: the same code without a NAT."""
    result, owner = natlab.pair_once(lab, home, home, url, get_mb=mb, loopback=True)
    try:
        if "error" in result or not result.get("sha_ok"):
            raise RuntimeError(f"loopback baseline: {json.dumps(result)}")
    finally:
        natlab.stop_proc(owner)
    return result["get_MBps"]


def add_delay(site: natlab.Site) -> Optional[str]:
    """netem delay on the router's WAN link; None if done, else why not."""
    try:
        natlab.sh("ip", "netns", "exec", site.router, "tc", "qdisc", "add", "dev", "wan", "root", "netem", "delay", DELAY)
        return None
    except RuntimeError as exc:
        return str(exc)


def one_run(lab: natlab.Internet, urls: Dict[bool, str], route: Route, mb: int, delay: bool, verbose: bool) -> Optional[str]:
    with lab.homes(route.owner_nat, route.scientist_nat) as (owner_home, scientist_home):
        if delay:
            for site in (owner_home, scientist_home):
                why = add_delay(site)
                if why:
                    return why
        result, owner = natlab.pair_once(lab, owner_home, scientist_home, urls[route.turn], get_mb=mb)
        try:
            if "error" in result or not (result.get("sha_ok") and result.get("release_ok")):
                raise RuntimeError(f"{route.label}: {json.dumps(result)}\n{''.join(owner.stderr[-20:])}")
        finally:
            natlab.stop_proc(owner)
        route.runs.append(result)
        route.raw.append(raw_tcp(lab, owner_home, scientist_home, mb))
        route.loopback.append(loopback_get(lab, owner_home, urls[route.turn], mb))
        if verbose:
            print(f"  {route.label:38s} join {result['join_s']:6.2f} s  release {result['release_s'] * 1e3:7.1f} ms"
                  f" (warm {result['release_warm_s'] * 1e3:5.1f} ms)  get {result['get_MBps']:6.2f} MB/s"
                  f"  loopback {route.loopback[-1]:6.2f} MB/s  raw TCP {route.raw[-1]:7.1f} MB/s  {result['route']}",
                  flush=True)
    return None


def med(values: List[float]) -> float:
    return statistics.median(values)


def spread(values: List[float], fmt: str) -> str:
    return f"{format(med(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def table(routes: List[Route], title: str, mb: int) -> None:
    print(f"\n{title}: median [min-max] of {len(routes[0].runs)} runs, {mb} MiB .get()")
    header = (f"{'route':38s} {'reported':44s} {'join s':>18s} {'release ms':>20s} {'warm ms':>8s}"
              f" {'get MB/s':>20s} {'loopback MB/s':>20s} {'get/loop':>8s} {'raw TCP MB/s':>18s} {'get/raw':>8s}")
    print(header)
    print("-" * len(header))
    for r in routes:
        reported = sorted({run["route"].split(", rtt")[0] for run in r.runs})
        get = [run["get_MBps"] for run in r.runs]
        print(f"{r.label:38s} {' | '.join(reported):44s} {spread([x['join_s'] for x in r.runs], '.2f'):>18s}"
              f" {spread([x['release_s'] * 1e3 for x in r.runs], '.0f'):>20s}"
              f" {med([x['release_warm_s'] * 1e3 for x in r.runs]):8.1f}"
              f" {spread(get, '.2f'):>20s} {spread(r.loopback, '.2f'):>20s} {med(get) / med(r.loopback):7.2f}x"
              f" {spread(r.raw, '.0f'):>18s} {med(get) / med(r.raw):7.3f}x")
    print("release ms: the first small release of a session (it includes a one-off ~1 s warm-up that shows on"
          " loopback too); warm ms: median of the next 5.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mb", type=int, default=16)
    ap.add_argument("--quiet", action="store_true", help="only the tables")
    args = ap.parse_args()
    try:
        natlab.check_prerequisites()
    except (natlab.LabUnavailable, RuntimeError) as exc:
        print(f"nat_lab: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    print("load average at start: %.2f %.2f %.2f" % os.getloadavg())
    with natlab.Internet() as lab:
        lab.start_turn()
        urls = {False: lab.start_signaling(SIGNALING_STUN_PORT, *lab.ice_args(turn=False))[1],
                True: lab.start_signaling(SIGNALING_TURN_PORT, *lab.ice_args(turn=True))[1]}
        for rep in range(args.reps):  # rounds alternate the routes, so load changes hit all alike
            for route in ROUTES:
                one_run(lab, urls, route, args.mb, delay=False, verbose=not args.quiet)
        table(ROUTES, "NAT lab, no added delay", args.mb)

        delayed = [Route(r.label, r.owner_nat, r.scientist_nat, r.turn) for r in ROUTES[:2]]
        why = None
        for rep in range(args.reps):
            for route in delayed:
                why = one_run(lab, urls, route, args.mb, delay=True, verbose=not args.quiet)
                if why:
                    break
            if why:
                break
        if why:
            print(f"\nskipped the variant with {DELAY} on each WAN link: tc netem is not available ({why})")
        else:
            table(delayed, f"NAT lab, {DELAY} added on each router's WAN link", args.mb)
    leftovers = natlab.leftover_namespaces()
    print(f"\n{time.monotonic() - started:.0f} s; load average at the end: %.2f %.2f %.2f; namespaces left: %s"
          % (*os.getloadavg(), leftovers or "none"))
    return 0 if not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
