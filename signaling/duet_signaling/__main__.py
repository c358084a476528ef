"""Command line: ``duet-signaling --host H --port P`` or ``python -m duet_signaling``.

Prints exactly one line, ``duet-signaling listening on http://H:P``, once the
socket is listening (so scripts and tests can wait for it and read the port when
``--port 0`` was asked for), then serves until SIGINT or SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import List, Optional

from .ice import DEFAULT_TTL_SECONDS, IceOffer
from .service import Limits, start

DEFAULT_PORT = 8765


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate so its help can be tested and documented."""
    d = Limits()
    p = argparse.ArgumentParser(
        prog="duet-signaling",
        description="Duet signaling service: relays sealed pairing messages between "
        "a data owner and scientists. It never sees the join secret.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--prefix", default="", help="URL path prefix, e.g. /signaling (default: none)")
    p.add_argument("--max-rooms", type=_positive_int, default=d.max_rooms)
    p.add_argument("--max-connections", type=_positive_int, default=d.max_connections)
    p.add_argument("--peers-per-room", type=_positive_int, default=d.peers_per_room)
    p.add_argument("--max-message-bytes", type=_positive_int, default=d.max_message_bytes)
    p.add_argument("--messages-per-second", type=_positive_float, default=d.messages_per_second)
    p.add_argument("--burst-messages", type=_positive_int, default=d.burst_messages)
    p.add_argument("--room-idle-seconds", type=_positive_float, default=d.room_idle_seconds)
    p.add_argument("--room-ttl-seconds", type=_positive_float, default=d.room_ttl_seconds)
    p.add_argument("--handshake-timeout-seconds", type=_positive_float, default=d.handshake_timeout_seconds)
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="a STUN server handed to every peer, e.g. stun:turn.example.org:3478 (repeatable)")
    p.add_argument("--turn-url", action="append", default=[], metavar="URL",
                   help='a TURN server handed to every peer with credentials made for it, e.g. '
                        '"turn:turn.example.org:3478?transport=tcp" (repeatable; needs --turn-secret)')
    p.add_argument("--turn-secret", default=None,
                   help="coturn's static-auth-secret (use-auth-secret); or $DUET_TURN_SECRET, which no process list shows")
    p.add_argument("--turn-ttl-seconds", type=_positive_float, default=DEFAULT_TTL_SECONDS,
                   help="how long the TURN credentials handed out stay valid (default: %(default)g)")
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level for stderr (default: %(default)s); logs never contain payloads",
    )
    return p


async def _serve(host: str, port: int, limits: Limits, prefix: str, ice: Optional[IceOffer] = None) -> int:
    try:
        service = await start(host=host, port=port, limits=limits, prefix=prefix, ice=ice)
    except OSError as exc:
        print(f"duet-signaling: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: List[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover - Windows
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    print(f"duet-signaling listening on {service.url}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await service.stop()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``duet-signaling`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        limits = Limits(
            max_message_bytes=args.max_message_bytes,
            messages_per_second=args.messages_per_second,
            burst_messages=args.burst_messages,
            peers_per_room=args.peers_per_room,
            max_rooms=args.max_rooms,
            max_connections=args.max_connections,
            room_idle_seconds=args.room_idle_seconds,
            room_ttl_seconds=args.room_ttl_seconds,
            handshake_timeout_seconds=args.handshake_timeout_seconds,
        )
        ice = IceOffer(stun_urls=args.ice_server, turn_urls=args.turn_url,
                       turn_secret=args.turn_secret or os.environ.get("DUET_TURN_SECRET") or None,
                       ttl_seconds=args.turn_ttl_seconds)
    except ValueError as exc:
        print(f"duet-signaling: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(args.host, args.port, limits, args.prefix, ice))
    except KeyboardInterrupt:  # pragma: no cover - signal arrived before handlers were set
        return 0


if __name__ == "__main__":
    sys.exit(main())
