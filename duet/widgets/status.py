"""The scientist's side: a live one-line status while `.get()` waits for the owner.

In a kernel, a release request that is not answered within STATUS_GRACE seconds
shows under the cell: asking, waiting for approval (with the owner's request
number), transferring (a progress bar), then done, denied, failed or still
pending after the timeout. Elsewhere nothing is shown (duet.scientist.requests
prints a text progress bar for large transfers instead).
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

from ..tables import human_bytes
from . import common
from .common import esc

if TYPE_CHECKING:
    from ..scientist.requests import RequestHandle

STATUS_GRACE = 0.25  # a get() answered faster than this shows no status at all


class GetStatus:
    """A one-line live status for a release request: waiting for approval, transferring, done."""

    def __init__(self, handle: "RequestHandle") -> None:
        W = common.ipywidgets()
        self.handle = handle
        self.state = "asking"
        self.started = time.monotonic()
        self.label = W.HTML(value="")
        self.bar = W.FloatProgress(value=0.0, min=0.0, max=1.0, layout=W.Layout(width="16em", visibility="hidden"))
        self.widget = W.HBox([self.bar, self.label])
        self._last_progress = 0.0
        self._total = 0
        self.update()

    def text(self) -> str:
        h = self.handle
        where = f" (owner's request #{h.owner_request_id})" if h.owner_request_id else ""
        if self.state == "waiting":
            return f"Waiting for the owner to approve {h.label}{where}…"
        if self.state == "transferring":
            got = int(self.bar.value * self._total)
            return f"Transferring {h.label}: {human_bytes(got)} of {human_bytes(self._total)}"
        if self.state == "done":
            charge = h.charge_text()
            return f"Received {h.label}{where} after {time.monotonic() - self.started:.1f} s" + (f"; {charge}" if charge else "")
        if self.state == "denied":
            return f"Denied by the owner: {h.label}{where}"
        if self.state == "failed":
            return f"Failed: {h.label}{where}"
        if self.state == "timeout":
            return f"Still pending after the timeout: {h.label}{where}; call .get() again to keep waiting"
        return f"Asking the owner for {h.label}…"

    def update(self, state: Optional[str] = None) -> None:
        if state is not None:
            self.state = state
        colour = {"done": "#080", "denied": "#b00", "failed": "#b00", "timeout": "#b58900"}.get(self.state, "#333")
        self.label.value = f"<span style='color:{colour}'>{esc(self.text())}</span>"
        self.bar.layout.visibility = "visible" if self.state == "transferring" else "hidden"

    def on_progress(self, received: int, total: int) -> None:
        if total <= 0:
            return
        frac = min(1.0, received / total)
        self._total = total
        if self.state in ("asking", "waiting"):
            self.state = "transferring"
        if frac - self._last_progress >= 0.01 or frac >= 1.0:  # coalesce: at most ~100 updates
            self._last_progress = frac
            self.bar.value = frac
            self.update()

    def __repr__(self) -> str:
        return self.text()

    def _repr_mimebundle_(self, **kwargs: Any) -> Dict[str, Any]:
        # Only the widget view: the text would be a stale snapshot in a saved notebook.
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        return {k: v for k, v in dict(data or {}).items() if k != "text/plain"}


def _show(status: GetStatus) -> None:
    """Display the widget view only (raw): a text snapshot would go stale in a saved notebook."""
    from IPython.display import display

    display(status._repr_mimebundle_(), raw=True)


@contextlib.contextmanager
def get_status(handle: "RequestHandle", timeout: float) -> Iterator[Optional[GetStatus]]:
    """Show a live status while `handle.wait()` blocks, in a kernel; nothing elsewhere.

    A request answered within STATUS_GRACE seconds (your own data, an owner
    rule) shows nothing; otherwise the status appears under the cell.
    """
    future = handle._future
    if (future.done() and handle.dp is None) or not common.in_kernel():
        yield None
        return
    try:
        common.ipywidgets()
    except ImportError:
        yield None
        return
    queued = threading.Event()
    future.add_done_callback(lambda _f: queued.set())
    previous_on_change = handle.on_change

    def on_change(h: "RequestHandle") -> None:
        queued.set()
        if previous_on_change is not None:
            previous_on_change(h)

    handle.on_change = on_change
    if handle.owner_request_id is None:
        queued.wait(min(STATUS_GRACE, max(timeout, 0)))
    if future.done() and handle.dp is None:  # (a DP release always shows what it cost)
        handle.on_change = previous_on_change
        yield None
        return
    status = GetStatus(handle)
    status.state = "waiting" if handle.owner_request_id else "asking"

    def on_change_live(h: "RequestHandle") -> None:
        if status.state == "asking":
            status.update("waiting")
        else:
            status.update()
        if previous_on_change is not None:
            previous_on_change(h)

    handle.on_change = on_change_live
    transport = getattr(handle, "progress_source", None)
    previous_progress = getattr(transport, "on_progress", None) if transport is not None else None
    if transport is not None:
        transport.on_progress = status.on_progress
    status.update()
    _show(status)
    try:
        yield status
    except Exception as exc:
        from ..errors import RequestDenied, RequestTimeout

        if isinstance(exc, RequestTimeout):
            status.update("timeout")
        elif isinstance(exc, RequestDenied):
            status.update("denied")
        else:
            status.update("failed")
        raise
    else:
        status.update("done")
    finally:
        handle.on_change = previous_on_change
        if transport is not None and getattr(transport, "on_progress", None) == status.on_progress:
            transport.on_progress = previous_progress
