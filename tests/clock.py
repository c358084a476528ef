"""A clock a test moves by hand, for code that takes an injected clock instead of reading time itself."""
from __future__ import annotations

import threading


class FakeClock:
    """Callable like time.time/time.monotonic; returns `now` until a test advances it. Thread safe."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self._now = float(now)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._now += seconds
            return self._now
