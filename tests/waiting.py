"""Bounded waits for state that has no event to wait on (it lives in another process or loop turn)."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable


async def eventually(predicate: Callable[[], Any], timeout: float) -> None:
    """Poll until predicate() holds; fail with an assertion when the deadline passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def until(predicate: Callable[[], Any], timeout: float) -> None:
    """The same bounded poll, for code outside an event loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
