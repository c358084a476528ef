"""The owner's live panel: what an owner decides on, kept current.

`OwnerPanel` shows connection state, connected scientists (their chosen name
and key fingerprint), published assets, pending requests with Preview / Accept
/ Deny buttons, the owner's rules (removable), and decided requests. It listens
to the owner's queue, store and connections, so it updates from the owner's
background threads; button clicks run in the kernel's main thread whenever the
kernel is idle, so an approval never needs a running cell.

Outside a kernel the same object prints as text tables.

`display_owner(owner)` is what `duet.launch()` calls: it writes the join-code
handoff (`duet.widgets.handoff`), shows the panel in a kernel and returns True,
else returns False (launch then prints the code).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List

from ..owner.privacy.privacy import PRIVACY_HEADERS
from ..tables import html_table, store_headers, store_rows, text_table
from . import common
from .approval import HISTORY_HEADERS, HISTORY_SHOWN, STYLE, history_rows, preview_html, request_html, request_text
from .common import esc
from .handoff import HANDOFF_ENV, write_handoff

if TYPE_CHECKING:
    from ..owner.host import Owner
    from ..owner.requests import Request, Rule

log = logging.getLogger("duet.widgets")


def display_owner(owner: "Owner") -> bool:
    """Show the owner's panel when running in a kernel; False elsewhere (the caller prints the code)."""
    try:
        write_handoff(owner)
    except OSError as exc:
        log.warning("could not write the join code to $%s: %s", HANDOFF_ENV, exc)
    if not common.in_kernel():
        return False
    try:
        common.ipywidgets()
        from IPython.display import display

        display(OwnerPanel.for_owner(owner))
    except Exception:
        log.exception("could not display the owner panel")
        return False
    return True


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
        W = common.ipywidgets()
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
            self.message.value = f"<span style='color:#b00'>Could not {what}: {esc(str(exc))}</span>"
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
        W = common.ipywidgets()
        self.rule = rule
        self.label = W.HTML(value=f"<code>{esc(rule.describe())}</code>")
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
        W = common.ipywidgets()
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
        self.privacy_html = W.HTML()
        self.pending_title = W.HTML()
        self.pending_box = W.VBox()
        self.rules_title = W.HTML()
        self.rules_box = W.VBox()
        self.history_html = W.HTML()
        self.widget = W.VBox(
            [
                W.HTML(value=STYLE),
                self.header,
                self.message,
                self.scientists_html,
                self.assets_html,
                self.privacy_html,
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
        owner.privacy.subscribe(self._changed)
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
        common.ipywidgets()  # fails early if ipywidgets is missing
        owner = self.owner
        with self._render_lock:
            self.refreshes += 1
            head = (f"<div class='duet-panel'><b>Duet owner</b> {esc(owner.name)} "
                    f"<code>{esc(owner.fingerprint)}</code><br>State: <b>{esc(_connection_state(owner))}</b>")
            if owner.code and not owner.closed:
                head += ("<br>The scientist runs: <code style='user-select:all'>"
                         f"duet.join({esc(repr(owner.code))})</code> "
                         "<span class='duet-muted'>(share this code only with them)</span>")
            for who, why in _recent_failures(owner):
                head += (f"<br><span style='color:#b00'>Could not connect to {esc(who)}:</span> "
                         f"<span class='duet-muted'>{esc(why)}</span>")
            self.header.value = head + "</div>"
            self.scientists_html.value = "<div class='duet-panel'>" + html_table(
                SCIENTIST_HEADERS, owner._rows(), title="Connected scientists") + "</div>"
            self.assets_html.value = "<div class='duet-panel'>" + html_table(
                store_headers(owner.store.listing()), store_rows(owner.store.listing()), title="Published assets") + "</div>"
            privacy = owner.privacy
            self.privacy_html.value = ("<div class='duet-panel'>" + html_table(
                PRIVACY_HEADERS, privacy.rows(), title="Privacy budgets (differential privacy)")
                + f"<span class='duet-muted'>{esc(privacy.head())}</span></div>") if privacy.active else ""

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
                HISTORY_HEADERS, history_rows(history), title=title) + "</div>"

    def remove_rule(self, rule: "Rule") -> None:
        try:
            rules = self.owner.requests.rules
            if any(r is rule for r in rules):
                # RequestQueue.remove_handler removes by equality; pass the very object.
                self.owner.requests.remove_handler(rule)
            self.message.value = ""
        except Exception as exc:
            self.message.value = f"<span style='color:#b00'>Could not remove the rule: {esc(str(exc))}</span>"
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
                 text_table(store_headers(owner.store.listing()), store_rows(owner.store.listing()), title="Published assets")]
        if owner.privacy.active:
            parts.append(repr(owner.privacy))
        pending = owner.requests.pending
        parts.append(f"Pending requests ({len(pending)})" + ("" if pending else "\n(none)"))
        parts.extend(request_text(r) for r in pending)
        rules = owner.requests.rules
        parts.append("Rules: " + ("; ".join(r.describe() for r in rules) if rules else "none"))
        parts.append(text_table(HISTORY_HEADERS, history_rows(owner.requests.history), title="Decided requests"))
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
