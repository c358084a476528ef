"""One background asyncio loop per process, and a synchronous bridge to it.

The kernel's own loop is blocked while a cell runs, so all networking lives on
this thread. Public calls are synchronous; they submit coroutines here and wait
with a timeout, never blocking the background loop itself.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from typing import Any, Awaitable, Callable, Optional, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: Optional[asyncio.AbstractEventLoop] = None
_thread: Optional[threading.Thread] = None


def loop() -> asyncio.AbstractEventLoop:
    """The process-wide background loop, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is not None and _thread is not None and _thread.is_alive():
            return _loop
        new_loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(new_loop)
            new_loop.call_soon(started.set)
            new_loop.run_forever()

        thread = threading.Thread(target=run, name="duet-runtime", daemon=True)
        thread.start()
        if not started.wait(10):
            raise RuntimeError("the Duet runtime loop did not start within 10 s")
        _loop, _thread = new_loop, thread
        return new_loop


def in_loop_thread() -> bool:
    """True when called from the background loop thread itself."""
    return _thread is not None and threading.current_thread() is _thread


def run(coro: Awaitable[T], timeout: Optional[float] = None, what: str = "operation") -> T:
    """Run a coroutine on the background loop and wait for it, with a timeout.

    Raises TimeoutError naming `what` if it does not finish in time; the
    coroutine is cancelled then, so nothing keeps running unseen.
    """
    if in_loop_thread():
        raise RuntimeError(f"{what}: a blocking call was made from the Duet loop thread")
    fut: "concurrent.futures.Future[Any]" = asyncio.run_coroutine_threadsafe(coro, loop())  # type: ignore[arg-type]
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        if fut.done():  # the coroutine itself raised TimeoutError: keep its message
            raise
        fut.cancel()
        raise TimeoutError(f"{what} did not finish within {timeout} s") from None


def submit(coro: Awaitable[T]) -> "concurrent.futures.Future[T]":
    """Start a coroutine on the background loop without waiting."""
    return asyncio.run_coroutine_threadsafe(coro, loop())  # type: ignore[arg-type]


def call_soon(fn: Callable[..., Any], *args: Any) -> None:
    """Schedule a plain callback on the background loop from any thread."""
    lp = loop()
    if in_loop_thread():
        lp.call_soon(fn, *args)
    else:
        lp.call_soon_threadsafe(fn, *args)


def shutdown(timeout: float = 5.0) -> None:
    """Cancel what still runs on the loop, stop it and join its thread (bounded).

    Registered at exit, so the interpreter never finalizes while the loop
    thread is mid-write (which can abort the process).
    """
    global _loop, _thread
    with _lock:
        lp, thread = _loop, _thread
        _loop, _thread = None, None
    if lp is None or thread is None or not thread.is_alive() or threading.current_thread() is thread:
        return

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    try:
        asyncio.run_coroutine_threadsafe(cancel_all(), lp).result(timeout + 1)
    except Exception:
        pass
    lp.call_soon_threadsafe(lp.stop)
    thread.join(timeout)


atexit.register(shutdown)
