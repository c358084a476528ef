"""Handles for release requests: non-blocking, waitable again after a timeout."""
from __future__ import annotations

import asyncio
import contextlib
import concurrent.futures
import time
from typing import Any, Callable, Dict, Iterator, Optional

from ..errors import RequestDenied, RequestTimeout
from ..protocol import Status
from ..tables import html_table, text_table

DEFAULT_GET_TIMEOUT = 300.0

HEADERS = ["pointer", "reason", "status", "owner request"]


class RequestHandle:
    """A request to release a value. `.status`, `.wait(timeout)`, or `await handle`."""

    def __init__(self, label: str, reason: str, future: "concurrent.futures.Future[Any]", decode: Callable[[Any], Any],
                 dp: Optional[float] = None) -> None:
        self.label = label
        self.reason = reason
        self.dp = dp  # the epsilon asked for, for a differentially private release
        self.charge: Optional[Dict[str, Any]] = None  # what a DP release cost, once it arrived
        self.created = time.time()
        self.owner_request_id: Optional[int] = None
        self._future = future
        self._decode = decode
        self._value: Any = None
        self._decoded = False
        self.delivered = False  # the outcome reached the caller of wait(); a new get() asks anew
        self.on_change: Optional[Callable[["RequestHandle"], None]] = None
        self.progress_source: Any = None  # the transport, whose on_progress a live status may watch

    @property
    def status(self) -> str:
        """pending, accepted, denied, or failed."""
        if not self._future.done():
            return Status.PENDING
        exc = self._future.exception()
        if exc is None:
            return Status.ACCEPTED
        return Status.DENIED if isinstance(exc, RequestDenied) else Status.FAILED

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: Optional[float] = None) -> Any:
        """The released value. On timeout the request stays pending: wait again later."""
        timeout = DEFAULT_GET_TIMEOUT if timeout is None else timeout
        with _live_status(self, timeout):
            return self._wait(timeout)

    def _wait(self, timeout: float) -> Any:
        try:
            raw = self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            where = f" (owner's request #{self.owner_request_id})" if self.owner_request_id else ""
            raise RequestTimeout(
                f"no decision within {timeout} s for {self.label}{where}; the request is still pending, "
                "call .wait() or .get() again"
            ) from None
        except BaseException:
            self.delivered = True
            raise
        if not self._decoded:
            if isinstance(raw, dict) and isinstance(raw.get("dp"), dict):
                self.charge = {k: v for k, v in raw["dp"].items() if isinstance(k, str) and isinstance(v, (int, float, str))}
            self._value = self._decode(raw)
            self._decoded = True
        self.delivered = True
        return self._value

    def __await__(self) -> Any:
        async def waiter() -> Any:
            await asyncio.wrap_future(self._future)
            return self.wait(0)

        return waiter().__await__()

    def _row(self) -> list:
        label = self.label + (f" (DP, ε {self.dp:g})" if self.dp is not None else "")
        return [label, self.reason, self.status, self.owner_request_id or ""]

    def charge_text(self) -> str:
        """What a differentially private release cost: '' for an exact one or before it arrived."""
        c = self.charge
        if not c:
            return ""
        text = f"charged ε {c.get('epsilon', 0):g}"
        if isinstance(c.get("left_epsilon"), (int, float)):
            text += f"; {c['left_epsilon']:.4g} of ε {c.get('budget_epsilon', 0):g} left"
        if isinstance(c.get("noise_std"), (int, float)):
            text += f"; noise std ≈ {c['noise_std']:.3g}"
        return text

    def __repr__(self) -> str:
        charge = self.charge_text()
        return f"<Request for {self.label}: {self.status}{'; ' + charge if charge else ''}>"

    def _repr_html_(self) -> str:
        return html_table(HEADERS, [self._row()])


def _live_status(handle: RequestHandle, timeout: float) -> Any:
    """In a Jupyter kernel, duet.widgets shows what a waiting get() is doing; elsewhere a text progress bar."""
    if handle._future.done() and handle.dp is None:  # (a DP release always shows what it cost)
        return contextlib.nullcontext()
    from .. import views  # the ui layer sits above and registers its views there

    if views.get_status is None or not views.in_kernel():
        return _text_progress(handle)
    return views.get_status(handle, timeout)


PROGRESS_MIN_BYTES = 4 * 2**20  # smaller transfers finish before a bar would help


@contextlib.contextmanager
def _text_progress(handle: RequestHandle) -> Iterator[None]:
    """A tqdm bar for a large value arriving while we wait (chained to any existing listener)."""
    transport = handle.progress_source
    if transport is None:
        yield
        return
    previous = transport.on_progress
    bar: Any = None

    def on_progress(received: int, total: int) -> None:
        nonlocal bar
        if previous is not None:
            previous(received, total)
        if total < PROGRESS_MIN_BYTES:
            return
        if bar is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"receiving {handle.label}", leave=False)
        bar.update(received - bar.n)

    transport.on_progress = on_progress
    try:
        yield
    finally:
        transport.on_progress = previous
        if bar is not None:
            bar.close()


class RequestList(list):
    """The scientist's requests, shown as a table."""

    def __repr__(self) -> str:
        return text_table(HEADERS, [h._row() for h in self], title="Your requests")

    def _repr_html_(self) -> str:
        return html_table(HEADERS, [h._row() for h in self], title="Your requests")
