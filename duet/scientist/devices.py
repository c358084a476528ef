"""Device boilerplate in scientists' code (`.to(device)`, `.cpu()`, `.cuda()`): what it means remotely.

The owner computes on its CPU only (it keeps dense CPU tensors and never offers a GPU), so a CPU
device is simply dropped from a call before it is sent, and any other device is refused here with
a message that says what to write instead. `torch.device` values never cross the wire.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from ..errors import NotAllowed

CPU_ONLY = (
    "the owner computes on its CPU only and offers no GPU; keep device = torch.device('cpu') "
    "for remote values (x.to(device) and .cpu() work and change nothing)"
)
REFUSED_METHODS: Dict[str, str] = {
    "cuda": f".cuda(): {CPU_ONLY}",
    "mps": f".mps(): {CPU_ONLY}",
}


def _as_device(value: Any) -> Any:
    """The torch.device a value names, or None when it is not a device (a dtype, a tensor, ...)."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except (RuntimeError, ValueError):
            return None
    return None


def check_cpu(value: Any, what: str) -> None:
    device = _as_device(value)
    if device is None or device.type != "cpu":
        raise NotAllowed(f"{what} with device {value!r}: {CPU_ONLY}")


def without_cpu_device(args: Tuple[Any, ...], kwargs: Dict[str, Any], what: str) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """`args`/`kwargs` of a call with CPU devices removed; any other device is refused."""
    kept = []
    for value in args:
        if _as_device(value) is not None:
            check_cpu(value, what)
        else:
            kept.append(value)
    kw = dict(kwargs)
    if "device" in kw:
        device = kw.pop("device")
        if device is not None:
            check_cpu(device, what)
    return tuple(kept), kw
