"""Duet signaling service: an untrusted WebSocket relay of sealed pairing messages.

The service only pairs connections by an opaque room id and forwards text
frames between a room's owner and its scientists. Clients derive the room id
from a secret the service never sees, and seal every payload with a key derived
from that secret, so the service can neither read, swap nor replay them. It keeps
everything in memory and never logs payloads or full room ids.

This package deliberately does not import ``duet``: it knows nothing of tensors
and can be deployed (or mounted in a Jupyter server) on its own.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .service import (
    ERROR_CODES,
    FATAL_CODES,
    PROTOCOL_VERSION,
    Limits,
    RunningService,
    SignalingState,
    make_app,
    make_handlers,
    start,
)

__all__ = [
    "__version__",
    "ERROR_CODES",
    "FATAL_CODES",
    "PROTOCOL_VERSION",
    "Limits",
    "RunningService",
    "SignalingState",
    "make_app",
    "make_handlers",
    "start",
]
