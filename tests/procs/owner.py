"""A data owner in its own process, for tests and benchmarks.

Prints one JSON line {"code": ...} when ready, then JSON event lines
({"event": "room_closed"}, ...). Serves until its standard input closes.

    python -m tests.procs.owner --signaling URL --big-mb 64 --accept-all

--network: real network ICE (local_only=False) with the ICE servers the signaling service
offers, and a {"event": "connection_failed", "scientist": ..., "message": ...} line for each
pairing whose network path failed (owner.connection_failures).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import threading

import torch

import duet


_emit_lock = threading.Lock()


def emit(**fields: object) -> None:
    line = json.dumps(fields) + "\n"
    with _emit_lock:  # events come from library threads: one whole line at a time
        sys.stdout.write(line)
        sys.stdout.flush()


def report_connection_failures(owner: "duet.Owner") -> None:
    """Emit one event per new entry of owner.connection_failures (a bounded list, newest last)."""
    last: list = [None]  # the newest entry reported, by identity: the list drops its oldest entries
    lock = threading.Lock()

    def changed() -> None:
        with lock:
            failures = list(getattr(owner, "connection_failures", []))
            seen = [i for i, entry in enumerate(failures) if entry is last[0]]
            new = failures[seen[-1] + 1:] if seen else failures  # not there: every entry came after it
            if new:
                last[0] = new[-1]
        for scientist, message in new:
            emit(event="connection_failed", scientist=scientist, message=message)

    owner.subscribe(changed)
    changed()


def seeded_he_model() -> torch.nn.Module:
    """The model --he-model publishes: a seeded Linear(784, 10), the same in every process."""
    torch.manual_seed(784)
    return torch.nn.Linear(784, 10)


def seeded_column(seed: int) -> torch.Tensor:
    """300 numbers in [0, 100): owners with seeds 1 and 2 hold two correlated columns of the same rows."""
    base = torch.rand(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 100
    noise = torch.rand(300, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 50
    return (base * 0.5 + noise).clamp(0, 99.99)


def main(argv: list | None = None) -> int:
    faulthandler.enable()
    ap = argparse.ArgumentParser()
    ap.add_argument("--signaling", default=None)
    ap.add_argument("--name", default="St. Mary's")
    ap.add_argument("--big-mb", type=int, default=0, help="publish a seeded float32 tensor 'big' of this many MiB")
    ap.add_argument("--accept-all", action="store_true", help="auto-approve every release")
    ap.add_argument("--approve-joins", action="store_true")
    ap.add_argument("--leak-assets", action="store_true", help="publish the private assets of tests/test_leak_classes.py")
    ap.add_argument("--python-assets", action="store_true", help="publish Python values under display names")
    ap.add_argument("--dp", type=float, default=None, metavar="EPSILON",
                    help="publish 'cohort' (200 ages, bounds 0-120), give every scientist this privacy budget "
                         "and send differentially private releases by rule")
    ap.add_argument("--federated", type=float, default=None, metavar="VALUE",
                    help="publish 'values' (8 float32 numbers, all VALUE) and 'count' (int64 VALUE) and take part "
                         "in secure sums by rule")
    ap.add_argument("--min-owners", type=int, default=2, help="with --federated: this owner's min_owners")
    ap.add_argument("--pin", default=None, help="with --federated or --column: comma-separated fingerprints of the only peers")
    ap.add_argument("--no-fast-path", action="store_true", help="large transfers over the data channel only")
    ap.add_argument("--he-model", action="store_true", help="publish 'risk-model', seeded_he_model() (784 -> 10)")
    ap.add_argument("--column", default=None, metavar="SEED:NAME",
                    help="publish 'column' (seeded_column(SEED), 300 float64s) and accept shared computations "
                         "(kind smpc); NAME 'deny' denies them instead")
    ap.add_argument("--network", action="store_true",
                    help="ICE over the real network with the servers the signaling service offers (default: loopback only)")
    args = ap.parse_args(argv)

    owner = duet.launch(name=args.name, signaling=args.signaling, local_only=not args.network, display=False,
                        approve_joins=args.approve_joins, fast_path=False if args.no_fast_path else None)
    owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0]), name="ages", description="patient ages")
    if args.big_mb:
        gen = torch.Generator().manual_seed(1234)
        owner.store.add(torch.rand(args.big_mb * 2**18, generator=gen), name="big", description="seeded noise")
    if args.leak_assets:
        from tests.test_leak_classes import SECRET

        owner.store.add(SECRET.clone(), name="x", description="private")
        owner.store.add(SECRET.numpy().copy(), name="xn", description="private, as numpy")
        owner.store.add(torch.tensor([1, 3, 0, 2, 3, 1]), name="ids", description="private indices")
    if args.python_assets:
        owner.store.add({"weights": torch.ones(2, 3), "bias": torch.zeros(2)}, name="pretrained layer")
        owner.store.add([1.5, 2.5, 4.0], name="doses (mg)")
    if args.dp is not None:
        gen = torch.Generator().manual_seed(7)
        owner.store.add(torch.randint(18, 90, (200,), generator=gen).float(), name="cohort", bounds=(0, 120),
                        description="ages of 200 patients")
        owner.privacy.budget(epsilon=args.dp)
        owner.requests.add_handler(action="accept", dp=True)
    if args.federated is not None:
        owner.store.add(torch.full((8,), args.federated, dtype=torch.float32), name="values")
        owner.store.add(torch.tensor(int(args.federated)), name="count")
        owner.pin_federation(args.pin.split(",") if args.pin else None, min_owners=args.min_owners, exact=True)
        owner.requests.add_handler(action="accept", secure_sum=True)
    if args.he_model:
        owner.store.add(seeded_he_model(), name="risk-model", description="a linear model on 28x28 images")
    if args.column is not None:
        seed, _, how = args.column.partition(":")
        owner.store.add(seeded_column(int(seed)), name="column")
        owner.pin_federation(args.pin.split(",") if args.pin else None, exact=True)
        owner.requests.add_handler(action="deny" if how == "deny" else "accept", kind="smpc")
    if args.accept_all:
        owner.requests.add_handler(action="accept", kind=("release", "join"))
    emit(code=owner.code, fingerprint=owner.fingerprint)
    if args.network:
        report_connection_failures(owner)

    def watch_signaling() -> None:
        owner.signaling.closed.wait()  # type: ignore[attr-defined]
        if not owner.closed:
            emit(event="room_closed", reason=owner.signaling.close_reason)  # type: ignore[attr-defined]

    threading.Thread(target=watch_signaling, daemon=True).start()
    sys.stdin.read()  # serve until the parent closes our stdin
    owner.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is closed and flushed. Skip native static destructors, which
    # intermittently abort ("terminate called without an active exception")
    # when torch and aiortc's codecs are both loaded; see README, known issues.
    os._exit(code)
