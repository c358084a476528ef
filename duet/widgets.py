"""The ui layer: the owner's live panel and the scientist's `.get()` status.

`OwnerPanel` shows, and keeps current, what an owner decides on: connection
state, connected scientists (their chosen name and key fingerprint), published
assets, pending requests with Preview / Accept / Deny buttons, the owner's
rules (removable), and decided requests. It listens to the owner's queue,
store and connections, so it updates from the owner's background threads;
button clicks run in the kernel's main thread whenever the kernel is idle, so
an approval never needs a running cell.

Everything the scientist wrote (their name, their reasons) is escaped and
shown as their words, never as markup.

Outside a kernel the same objects print as text tables; nothing here is
needed by scripts.

`display_owner(owner)` is what `duet.launch()` calls: it shows the panel in a
kernel and returns True, else returns False (launch then prints the code).
When the environment variable DUET_HANDOFF_FILE names a file, it also writes
the join code there (mode 0600), for test harnesses that start the
scientist's notebook or process next to the owner's; see docs/notebooks.md.
"""
from __future__ import annotations

import contextlib
import html
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional

from .owner.opchain import is_selecting
from .tables import STORE_HEADERS, html_table, human_bytes, store_rows, text_table
from .text import clean

if TYPE_CHECKING:
    from .owner.host import Owner
    from .owner.requests import Request, Rule
    from .scientist.requests import RequestHandle

log = logging.getLogger("duet.widgets")

HANDOFF_ENV = "DUET_HANDOFF_FILE"
HISTORY_SHOWN = 50
PREVIEW_CHARS = 4000
STATUS_GRACE = 0.25  # a get() answered faster than this shows no status at all

def _esc(text: Any) -> str:
    """Escaped for HTML, with control and bidi characters replaced (see duet.text)."""
    return html.escape(clean(text, limit=20_000, newlines=True))


def in_kernel() -> bool:
    """True when running inside an IPython kernel (Jupyter), where widgets can render."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _widgets() -> Any:
    import ipywidgets

    return ipywidgets


# -- join-code handoff (tests) -----------------------------------------------------
def write_handoff(owner: "Owner") -> Optional[Path]:
    """Write the join code to $DUET_HANDOFF_FILE, atomically and private, when that is set."""
    target = os.environ.get(HANDOFF_ENV, "").strip()
    if not target or not owner.code:
        return None
    path = Path(target)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(owner.code + "\n")
    os.replace(tmp, path)
    return path


def display_owner(owner: "Owner") -> bool:
    """Show the owner's panel when running in a kernel; False elsewhere (the caller prints the code)."""
    try:
        write_handoff(owner)
    except OSError as exc:
        log.warning("could not write the join code to $%s: %s", HANDOFF_ENV, exc)
    if not in_kernel():
        return False
    try:
        _widgets()
        from IPython.display import display

        display(OwnerPanel.for_owner(owner))
    except Exception:
        log.exception("could not display the owner panel")
        return False
    return True


# -- pieces of HTML ----------------------------------------------------------------
_STYLE = (
    "<style>"
    ".duet-panel table.duet-table{border-collapse:collapse;margin:2px 0 8px 0}"
    ".duet-panel table.duet-table td,.duet-panel table.duet-table th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
    ".duet-words{border-left:3px solid #b58900;margin:4px 0;padding:2px 8px;background:#fdf6e3;white-space:pre-wrap;"
    "max-height:8em;overflow:auto;overflow-wrap:anywhere}"
    ".duet-ops{max-height:8em;overflow:auto;overflow-wrap:anywhere}"
    ".duet-muted{color:#666}"
    "</style>"
)


def _ops_text(ops: Any) -> str:
    """Every distinct operation, in first-use order; nothing is dropped (see duet.owner.opchain)."""
    return " → ".join(str(o) for o in ops)


def _ops_html(ops: Any) -> str:
    """The same, with operations that pick out single values in bold so they cannot hide in a long chain."""
    parts = []
    for op in ops:
        text = _esc(str(op))
        parts.append(f"<b title='picks out individual values'>{text}</b>" if is_selecting(str(op).split(" ×", 1)[0]) else text)
    return " → ".join(parts)


def _what_text(req: "Request") -> str:
    parts = []
    if req.type_name:
        parts.append(req.type_name)
    if req.shape is not None:
        parts.append("shape " + "×".join(str(s) for s in req.shape) if req.shape else "a single number")
    if req.dtype:
        parts.append(req.dtype)
    if req.numel is not None:
        parts.append(f"{req.numel} element{'s' if req.numel != 1 else ''}")
    if req.nbytes is not None:
        parts.append(human_bytes(req.nbytes))
    return ", ".join(parts)


_KIND_TEXT = {
    "join": "asks to join",
    "release": "asks for a value",
    "compute": "asks to run an operation",
}


def request_html(req: "Request") -> str:
    """The facts of one pending request, escaped."""
    rows = [
        ("Who", f"<b>{_esc(req.requester.name)}</b> <span class='duet-muted'>(their chosen name)</span>"
                f"<br><code>{_esc(req.requester.fingerprint)}</code> <span class='duet-muted'>(key fingerprint)</span>"),
    ]
    if req.kind != "join":
        rows.append(("Assets", _esc(", ".join(req.lineage)) or "<i>none</i>"))
        rows.append(("Operations", f"<div class='duet-ops'>{_ops_html(req.ops)}</div>" if req.ops else "<i>none</i>"))
        what = _what_text(req)
        if what:
            rows.append(("What", _esc(what)))
    if req.reason:
        rows.append(("Reason", "<div class='duet-words' title='written by the scientist; unverified'>"
                               f"{_esc(req.reason)}</div><span class='duet-muted'>their words, unverified</span>"))
    else:
        rows.append(("Reason", "<i class='duet-muted'>none given</i>"))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    head = f"<b>Request #{req.id}</b>: {_esc(req.kind)} — {_esc(_KIND_TEXT.get(req.kind, req.kind))}"
    return f"<div class='duet-panel'>{head}<table class='duet-table'>{body}</table></div>"


def request_text(req: "Request") -> str:
    lines = [f"Request #{req.id}: {req.kind} from {req.requester.name} ({req.requester.fingerprint})"]
    if req.kind != "join":
        lines.append(f"  assets: {', '.join(req.lineage) or 'none'}")
        lines.append(f"  operations: {_ops_text(req.ops) or 'none'}")
        what = _what_text(req)
        if what:
            lines.append(f"  what: {what}")
    lines.append(f"  reason (their words): {req.reason!r}" if req.reason else "  reason: none given")
    return "\n".join(lines)


def preview_html(value: Any) -> str:
    """The owner's own look at a value, as escaped, bounded text."""
    try:
        text = repr(value)
    except Exception as exc:  # the owner's own object; still, never break the panel
        text = f"<could not show: {type(exc).__name__}>"
    if len(text) > PREVIEW_CHARS:
        text = text[:PREVIEW_CHARS] + f"\n… ({len(text) - PREVIEW_CHARS} more characters)"
    return ("<div class='duet-panel'><span class='duet-muted'>Preview (only you see this; nothing is sent):</span>"
            f"<pre style='max-height:16em;overflow:auto;margin:2px 0'>{_esc(text)}</pre></div>")


HISTORY_HEADERS = ["id", "kind", "who", "assets", "what", "decision", "by", "note to scientist"]


def _history_rows(history: List["Request"]) -> List[List[Any]]:
    rows = []
    for r in history[-HISTORY_SHOWN:][::-1]:
        rows.append([
            r.id, r.kind, f"{r.requester.name} ({r.requester.fingerprint[:19]})", ", ".join(r.lineage),
            _what_text(r) if r.kind != "join" else "", r.status, r.decided_by, r.deny_reason,
        ])
    return rows


SCIENTIST_HEADERS = ["scientist (their chosen name)", "key fingerprint", "state", "objects", "route"]
FAILURES_SHOWN = 3


def _connection_state(owner: "Owner") -> str:
    if owner.closed:
        return "closed"
    sig = getattr(owner, "signaling", None)
    n = len(owner.scientists)
    serving = f"{n} scientist{'s' if n != 1 else ''} connected"
    if sig is None:
        return f"in-process pair; {serving}"
    closed = getattr(sig, "closed", None)
    if closed is not None and closed.is_set():
        why = getattr(sig, "close_reason", "") or "closed"
        return f"signaling lost ({why}): no new scientist can join; {serving}"
    return f"serving, waiting for scientists to join; {serving}" if n == 0 else f"serving; {serving}"


def _recent_failures(owner: "Owner") -> List[tuple]:
    """The latest pairings whose network path failed, newest first (what to configure is in the text)."""
    return list(getattr(owner, "connection_failures", []))[-FAILURES_SHOWN:][::-1]


# -- the owner's panel ---------------------------------------------------------------
class RequestCard:
    """One pending request: its facts, Preview, Accept, and Deny with a reason."""

    def __init__(self, panel: "OwnerPanel", req: "Request") -> None:
        W = _widgets()
        self.panel = panel
        self.request = req
        self.info = W.HTML(value=request_html(req))
        self.preview_button = W.Button(description="Preview", icon="eye", tooltip="Look at the value yourself; nothing is sent")
        self.accept_button = W.Button(description="Accept", button_style="success", icon="check",
                                      tooltip="Approve: for a value, it is sent to the scientist now")
        self.reason_box = W.Text(placeholder="reason for denying (the scientist reads this)",
                                 layout=W.Layout(width="22em"))
        self.deny_button = W.Button(description="Deny", button_style="danger", icon="times",
                                    tooltip="Refuse, with the reason typed on the left")
        self.preview = W.HTML(value="")
        self.message = W.HTML(value="")
        if req.kind != "release":
            self.preview_button.disabled = True
            self.preview_button.tooltip = "nothing to preview for this kind of request"
        self.preview_button.on_click(lambda _b: self.toggle_preview())
        self.accept_button.on_click(lambda _b: self.accept())
        self.deny_button.on_click(lambda _b: self.deny())
        buttons = W.HBox([self.preview_button, self.accept_button, self.reason_box, self.deny_button])
        self.widget = W.VBox([self.info, buttons, self.preview, self.message],
                             layout=W.Layout(border="1px solid #ddd", padding="4px", margin="4px 0"))

    def toggle_preview(self) -> None:
        if self.preview.value:
            self.preview.value = ""
            self.preview_button.description = "Preview"
        else:
            self.preview.value = preview_html(self.request.preview())
            self.preview_button.description = "Hide preview"

    def _decide(self, action: Callable[[], None], what: str) -> None:
        for b in (self.accept_button, self.deny_button):
            b.disabled = True
        try:
            action()
        except Exception as exc:  # e.g. a rule or the expiry decided it a moment earlier
            self.message.value = f"<span style='color:#b00'>Could not {what}: {_esc(str(exc))}</span>"
            log.info("could not %s request #%s: %s", what, self.request.id, exc)
        self.panel.refresh()

    def accept(self) -> None:
        self._decide(self.request.accept, "accept")

    def deny(self) -> None:
        reason = self.reason_box.value.strip()
        self._decide(lambda: self.request.deny(reason), "deny")

    def close(self) -> None:
        for w in (self.info, self.preview_button, self.accept_button, self.reason_box, self.deny_button,
                  self.preview, self.message, self.widget):
            try:
                w.close()
            except Exception:
                pass


class RuleRow:
    """One owner rule with a Remove button."""

    def __init__(self, panel: "OwnerPanel", rule: "Rule") -> None:
        W = _widgets()
        self.rule = rule
        self.label = W.HTML(value=f"<code>{_esc(rule.describe())}</code>")
        self.remove_button = W.Button(description="Remove", icon="trash", tooltip="Stop applying this rule")
        self.remove_button.on_click(lambda _b: panel.remove_rule(rule))
        self.widget = W.HBox([self.remove_button, self.label])

    def close(self) -> None:
        for w in (self.label, self.remove_button, self.widget):
            try:
                w.close()
            except Exception:
                pass


class OwnerPanel:
    """The owner's live panel; `owner.panel()` returns the one panel of an owner.

    Display it in Jupyter (it is the widget tree in `.widget`); print it in
    plain Python for a text snapshot. `refresh()` brings it up to date; it is
    called on every change of the owner's queue, store and connections.
    """

    _lock_for_cache = threading.Lock()

    def __init__(self, owner: "Owner") -> None:
        W = _widgets()
        self.owner = owner
        self.cards: Dict[int, RequestCard] = {}
        self.rule_rows: List[RuleRow] = []
        self._render_lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._refreshing = False
        self._dirty = False
        self._rendered = threading.Condition()
        self.refreshes = 0
        self.header = W.HTML()
        self.message = W.HTML()
        self.scientists_html = W.HTML()
        self.assets_html = W.HTML()
        self.pending_title = W.HTML()
        self.pending_box = W.VBox()
        self.rules_title = W.HTML()
        self.rules_box = W.VBox()
        self.history_html = W.HTML()
        self.widget = W.VBox(
            [
                W.HTML(value=_STYLE),
                self.header,
                self.message,
                self.scientists_html,
                self.assets_html,
                self.pending_title,
                self.pending_box,
                self.rules_title,
                self.rules_box,
                self.history_html,
            ],
            layout=W.Layout(border="1px solid #bbb", padding="6px"),
        )
        self.widget.add_class("duet-owner-panel")
        self.refresh()
        owner.requests.subscribe(self._changed)
        owner.subscribe(self._changed)
        owner.store.subscribe(self._changed)
        sig = getattr(owner, "signaling", None)
        closed = getattr(sig, "closed", None)
        if closed is not None and hasattr(closed, "wait"):
            threading.Thread(target=self._watch_signaling, args=(closed,), name="duet-panel-signaling",
                             daemon=True).start()

    @classmethod
    def for_owner(cls, owner: "Owner") -> "OwnerPanel":
        """The owner's one panel, created on first use."""
        with cls._lock_for_cache:
            panel = getattr(owner, "_duet_panel", None)
            if panel is None:
                panel = cls(owner)
                owner._duet_panel = panel  # type: ignore[attr-defined]
            return panel

    # -- updates ------------------------------------------------------------------------
    def _watch_signaling(self, closed: threading.Event) -> None:
        closed.wait()
        self._changed()

    def _changed(self) -> None:
        """Called from any thread on any change; renders once per burst of changes."""
        with self._state_lock:
            if self._refreshing:
                self._dirty = True
                return
            self._refreshing = True
        try:
            while True:
                try:
                    self._render()
                except Exception:
                    log.exception("the owner panel failed to update")
                with self._state_lock:
                    if not self._dirty:
                        self._refreshing = False
                        break
                    self._dirty = False
            with self._rendered:
                self._rendered.notify_all()
        except BaseException:
            with self._state_lock:
                self._refreshing = False
            raise

    def refresh(self) -> None:
        """Bring every part of the panel up to date now."""
        self._changed()

    def _render(self) -> None:
        _widgets()  # fails early if ipywidgets is missing
        owner = self.owner
        with self._render_lock:
            self.refreshes += 1
            head = (f"<div class='duet-panel'><b>Duet owner</b> {_esc(owner.name)} "
                    f"<code>{_esc(owner.fingerprint)}</code><br>State: <b>{_esc(_connection_state(owner))}</b>")
            if owner.code and not owner.closed:
                head += ("<br>The scientist runs: <code style='user-select:all'>"
                         f"duet.join({_esc(repr(owner.code))})</code> "
                         "<span class='duet-muted'>(share this code only with them)</span>")
            for who, why in _recent_failures(owner):
                head += (f"<br><span style='color:#b00'>Could not connect to {_esc(who)}:</span> "
                         f"<span class='duet-muted'>{_esc(why)}</span>")
            self.header.value = head + "</div>"
            self.scientists_html.value = "<div class='duet-panel'>" + html_table(
                SCIENTIST_HEADERS, owner._rows(), title="Connected scientists") + "</div>"
            self.assets_html.value = "<div class='duet-panel'>" + html_table(
                STORE_HEADERS, store_rows(owner.store.listing()), title="Published assets") + "</div>"

            pending = owner.requests.pending
            self.pending_title.value = f"<b>Pending requests ({len(pending)})</b>" + (
                "" if pending else " <i class='duet-muted'>none</i>")
            live = {r.id for r in pending}
            for rid in [rid for rid in self.cards if rid not in live]:
                self.cards.pop(rid).close()
            for req in pending:
                if req.id not in self.cards:
                    self.cards[req.id] = RequestCard(self, req)
            children = tuple(self.cards[r.id].widget for r in pending)
            if tuple(self.pending_box.children) != children:
                self.pending_box.children = children

            rules = owner.requests.rules
            if [id(r.rule) for r in self.rule_rows] != [id(r) for r in rules]:
                keep = {id(r.rule): r for r in self.rule_rows}
                rows = []
                for rule in rules:
                    row = keep.pop(id(rule), None) or RuleRow(self, rule)
                    rows.append(row)
                for gone in keep.values():
                    gone.close()
                self.rule_rows = rows
                self.rules_box.children = tuple(r.widget for r in rows)
            self.rules_title.value = f"<b>Rules ({len(rules)})</b>" + (
                " <span class='duet-muted'>decide matching requests automatically</span>" if rules
                else " <i class='duet-muted'>none: you decide every request</i>")

            history = owner.requests.history
            title = "Decided requests" + (f" (latest {HISTORY_SHOWN} of {len(history)})" if len(history) > HISTORY_SHOWN else "")
            self.history_html.value = "<div class='duet-panel'>" + html_table(
                HISTORY_HEADERS, _history_rows(history), title=title) + "</div>"

    def remove_rule(self, rule: "Rule") -> None:
        try:
            rules = self.owner.requests.rules
            if any(r is rule for r in rules):
                # RequestQueue.remove_handler removes by equality; pass the very object.
                self.owner.requests.remove_handler(rule)
            self.message.value = ""
        except Exception as exc:
            self.message.value = f"<span style='color:#b00'>Could not remove the rule: {_esc(str(exc))}</span>"
        self.refresh()

    # -- lookups, for tests and scripts ---------------------------------------------------
    def wait_until(self, predicate: Callable[["OwnerPanel"], bool], timeout: float = 10.0) -> None:
        """Block until `predicate(panel)` holds after a render (changes arrive from other threads)."""
        deadline = time.monotonic() + timeout
        with self._rendered:
            while True:
                with self._render_lock:
                    if predicate(self):
                        return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the owner panel did not reach the expected state within {timeout} s")
                self._rendered.wait(min(left, 0.5))

    def card(self, request_id: int) -> RequestCard:
        """The card of a pending request."""
        with self._render_lock:
            return self.cards[request_id]

    # -- reprs ------------------------------------------------------------------------
    def text(self) -> str:
        owner = self.owner
        lines = [f"Duet owner {owner.name!r} ({owner.fingerprint})", f"State: {_connection_state(owner)}"]
        if owner.code and not owner.closed:
            lines.append(f"The scientist runs: duet.join({owner.code!r})")
        lines.extend(f"Could not connect to {who}: {why}" for who, why in _recent_failures(owner))
        parts = ["\n".join(lines),
                 text_table(SCIENTIST_HEADERS, owner._rows(), title="Connected scientists"),
                 text_table(STORE_HEADERS, store_rows(owner.store.listing()), title="Published assets")]
        pending = owner.requests.pending
        parts.append(f"Pending requests ({len(pending)})" + ("" if pending else "\n(none)"))
        parts.extend(request_text(r) for r in pending)
        rules = owner.requests.rules
        parts.append("Rules: " + ("; ".join(r.describe() for r in rules) if rules else "none"))
        parts.append(text_table(HISTORY_HEADERS, _history_rows(owner.requests.history), title="Decided requests"))
        return "\n\n".join(parts)

    def __repr__(self) -> str:
        return self.text()

    def _repr_mimebundle_(self, **kwargs: Any) -> Dict[str, Any]:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        if isinstance(bundle, tuple):  # (data, metadata)
            data, _meta = bundle
        else:
            data = bundle
        data = dict(data or {})
        data["text/plain"] = self.text()
        return data

    def close(self) -> None:
        """Close the widgets (the owner keeps running)."""
        with self._render_lock:
            for card in self.cards.values():
                card.close()
            for row in self.rule_rows:
                row.close()
            self.widget.close()


# -- the scientist's get() status ------------------------------------------------------
class GetStatus:
    """A one-line live status for a release request: waiting for approval, transferring, done."""

    def __init__(self, handle: "RequestHandle") -> None:
        W = _widgets()
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
            return f"Received {h.label}{where} after {time.monotonic() - self.started:.1f} s"
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
        self.label.value = f"<span style='color:{colour}'>{_esc(self.text())}</span>"
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
    if future.done() or not in_kernel():
        yield None
        return
    try:
        _widgets()
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
    if future.done():
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
        from .errors import RequestDenied, RequestTimeout

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
