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


def until(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """The same bounded poll, for code outside an event loop: predicate()'s first true value.

    For state another process owns (a file it writes, a server it starts) that offers no
    event to wait on; predicate may raise to stop early (the process died).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)
