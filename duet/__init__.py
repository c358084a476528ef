"""Duet: private remote data science in Jupyter.

An owner publishes tensors; a scientist works on them through pointers; no
value derived from private data leaves the owner without approval.
"""
from .api import local_pair
from .connect import join, launch
from .errors import (
    ConnectionFailed,
    ConnectionLost,
    DuetError,
    LimitExceeded,
    NotAllowed,
    PairingError,
    ProtocolError,
    RemoteError,
    RequestDenied,
    RequestTimeout,
    SignalingError,
    UnknownObject,
)
from .owner.host import Owner
from .owner.objects import Limits
from .scientist.client import Scientist
from .scientist.pointer import Pointer
from .scientist.plan import plan

__version__ = "0.1.0"

__all__ = [
    "local_pair",
    "launch",
    "join",
    "Owner",
    "Scientist",
    "Pointer",
    "plan",
    "Limits",
    "DuetError",
    "ConnectionFailed",
    "ConnectionLost",
    "LimitExceeded",
    "NotAllowed",
    "PairingError",
    "ProtocolError",
    "RemoteError",
    "RequestDenied",
    "RequestTimeout",
    "SignalingError",
    "UnknownObject",
]
