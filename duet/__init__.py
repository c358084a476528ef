"""Duet: private remote data science in Jupyter.

An owner publishes tensors; a scientist works on them through pointers; no
value derived from private data leaves the owner without approval.
"""
from .api import local_pair
from .connect import join, launch
from .errors import (
    BudgetExceeded,
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
from .scientist.federation import Federation, SecureSumFailed
from .scientist.pointer import Pointer
from .scientist.plan import plan
from .scientist import smpc

from . import he, views, widgets

# Looked up on each use, so the ui layer's functions can be replaced (tests do).
views.register(owner_panel=lambda owner: widgets.OwnerPanel.for_owner(owner),
               get_status=lambda handle, timeout: widgets.get_status(handle, timeout),
               in_kernel=lambda: widgets.common.in_kernel())

__version__ = "0.1.0"

__all__ = [
    "he",
    "smpc",
    "local_pair",
    "launch",
    "join",
    "Owner",
    "Scientist",
    "Federation",
    "SecureSumFailed",
    "Pointer",
    "plan",
    "Limits",
    "DuetError",
    "BudgetExceeded",
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
