"""The owner's panel and the scientist's get() status, driven as a user would: by clicking.

Widgets are plain Python objects here (no browser); `Button.click()` runs the
same handlers a click in JupyterLab runs. Changes made by the scientist reach
the panel from the owner's worker thread, so tests wait on the panel with
`wait_until`, never on sleeps.
"""
from __future__ import annotations

import threading
import types

import pytest
import torch

import duet
from duet import widgets
from duet.scientist.requests import RequestHandle

HOSTILE = "<script>alert('x')</script> & <b>bold</b>"


@pytest.fixture
def owner_pair(tmp_path):
    owner, scientist = duet.local_pair(audit_log=tmp_path / "audit.jsonl", owner_name="St. Mary's", scientist_name="Dr. Lee")
    owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0]), name="ages", description="patient ages")
    yield owner, scientist
    scientist.close()
    owner.close()


def _pending_card(panel, n=1, timeout=10):
    panel.wait_until(lambda p: len(p.cards) == n, timeout)
    return panel.cards[max(panel.cards)]


def test_panel_is_one_object_and_shows_the_session(owner_pair):
    owner, scientist = owner_pair
    panel = owner.panel()
    assert panel is owner.panel()
    assert "St. Mary" in panel.header.value and owner.fingerprint in panel.header.value
    assert "in-process pair; 1 scientist connected" in panel.header.value
    panel.wait_until(lambda p: "Dr. Lee" in p.scientists_html.value)
    assert scientist.identity.fingerprint in panel.scientists_html.value
    assert "ages" in panel.assets_html.value and "patient ages" in panel.assets_html.value
    assert "31" not in panel.assets_html.value  # descriptions, never values
    owner.store.add(torch.zeros(2, 3), name="zeros", description="new")
    assert "zeros" in panel.assets_html.value and "2×3" in panel.assets_html.value
    assert "none" in panel.pending_title.value


def test_pending_request_shows_what_the_owner_decides_on(owner_pair):
    owner, scientist = owner_pair
    panel = owner.panel()
    m = (scientist.store["ages"] * 2).mean()
    m.request(reason=HOSTILE)
    card = _pending_card(panel)
    info = card.info.value
    assert "Dr. Lee" in info and scientist.identity.fingerprint in info
    assert "release" in info and "ages" in info
    assert "ages → operator.mul → Tensor.mean" in info
    assert "Tensor" in info and "float32" in info and "1 element" in info and "4 B" in info
    assert "their words" in info
    assert "<script>" not in info and "&lt;script&gt;" in info and "&lt;b&gt;bold&lt;/b&gt;" in info
    assert card.accept_button.description == "Accept" and card.deny_button.description == "Deny"
    assert "Pending requests (1)" in panel.pending_title.value


def test_preview_shows_the_owners_value_and_sends_nothing(owner_pair):
    owner, scientist = owner_pair
    panel = owner.panel()
    handle = scientist.store["ages"].sum().request(reason="sum")
    card = _pending_card(panel)
    card.preview_button.click()
    assert "tensor(157.)" in card.preview.value and "nothing is sent" in card.preview.value
    assert handle.status == "pending" and owner.requests.pending
    card.preview_button.click()
    assert card.preview.value == ""


def test_accept_click_releases_and_moves_to_history(owner_pair):
    owner, scientist = owner_pair
    panel = owner.panel()
    m = scientist.store["ages"].mean()
    handle = m.request(reason="mean")
    card = _pending_card(panel)
    card.accept_button.click()
    assert torch.equal(handle.wait(10), torch.tensor(39.25))
    assert panel.cards == {} and panel.pending_box.children == ()
    assert "accepted" in panel.history_html.value and "by</th>" in panel.history_html.value
    assert owner.requests.history[0].decided_by == "owner"


def test_deny_click_sends_the_typed_reason(owner_pair):
    owner, scientist = owner_pair
    panel = owner.panel()
    handle = scientist.store["ages"].max().request(reason="max")
    card = _pending_card(panel)
    card.reason_box.value = "  one patient's exact age  "
    card.deny_button.click()
    with pytest.raises(duet.RequestDenied, match="one patient's exact age"):
        handle.wait(10)
    assert "denied" in panel.history_html.value and "one patient&#x27;s exact age" in panel.history_html.value
    assert panel.cards == {}


def test_stale_card_reports_instead_of_raising(owner_pair):
    owner, scientist = owner_pair
    panel = owner.panel()
    scientist.store["ages"].min().request(reason="min")
    card = _pending_card(panel)
    card.request.deny("decided in code")  # e.g. in a cell, a moment before the click
    card.accept_button.click()
    assert "already denied" in card.message.value
    assert owner.requests.history[0].status == "denied"


def test_join_requests_can_be_accepted_in_the_panel(tmp_path):
    result = {}
    owner = duet.Owner(name="St. Mary's", approve_joins=True, audit_log=tmp_path / "a.jsonl",
                       identity=duet.identity.Identity.ephemeral())
    panel = owner.panel()

    def click_when_asked():
        card = _pending_card(panel)
        result["info"] = card.info.value
        result["preview_disabled"] = card.preview_button.disabled
        card.accept_button.click()

    clicker = threading.Thread(target=click_when_asked)
    clicker.start()
    from duet.api import _random_fingerprint
    from duet.identity import HandshakeContext
    from duet.session import Session
    from duet.transport.memory import memory_pair
    import secrets

    a, b = memory_pair()
    ctx = HandshakeContext(secrets.token_hex(16), secrets.token_bytes(16), _random_fingerprint(), _random_fingerprint(),
                           "St. Mary's", HOSTILE)
    owner.attach(Session(a), ctx)
    scientist = duet.Scientist(Session(b), name=HOSTILE, identity=duet.identity.Identity.ephemeral())
    try:
        scientist.handshake(ctx, 10, reason="let me in")
        clicker.join(10)
        assert "asks to join" in result["info"] and "let me in" in result["info"]
        assert result["preview_disabled"]
        panel.wait_until(lambda p: "&lt;script&gt;" in p.scientists_html.value)
        assert "<script>" not in panel.scientists_html.value
        assert "<script>" not in panel.history_html.value
    finally:
        scientist.close()
        owner.close()


def test_rules_added_in_code_show_and_can_be_removed_in_the_panel(owner_pair):
    owner, scientist = owner_pair
    panel = owner.panel()
    assert "none: you decide every request" in panel.rules_title.value
    rule = owner.requests.add_handler(action="accept", datasets=["ages"], max_elements=1)
    assert len(panel.rule_rows) == 1 and "accept release of ages only up to 1 elements" in panel.rule_rows[0].label.value
    assert torch.equal(scientist.store["ages"].sum().get(reason="auto", timeout=10), torch.tensor(157.0))
    panel.wait_until(lambda p: "rule: accept" in p.history_html.value)
    panel.rule_rows[0].remove_button.click()
    assert owner.requests.rules == [] and panel.rule_rows == [] and panel.rules_box.children == ()
    assert rule not in owner.requests.rules
    scientist.store["ages"].sum().request(reason="now asks")
    _pending_card(panel)


def test_remove_targets_the_clicked_rule_among_equal_ones(owner_pair):
    owner, _ = owner_pair
    panel = owner.panel()
    first = owner.requests.add_handler(action="deny", kind="compute")
    second = owner.requests.add_handler(action="deny", kind="compute")
    assert first == second and first is not second
    panel.rule_rows[1].remove_button.click()
    assert len(owner.requests.rules) == 1 and len(panel.rule_rows) == 1


def test_text_repr_in_plain_python(owner_pair):
    owner, scientist = owner_pair
    panel = owner.panel()
    scientist.store["ages"].mean().request(reason=HOSTILE)
    _pending_card(panel)
    text = repr(panel)
    assert 'Duet owner "St. Mary\'s"' in text and "Connected scientists" in text and "Dr. Lee" in text
    assert "Published assets" in text and "patient ages" in text
    assert "Pending requests (1)" in text and "reason (their words)" in text
    assert "Rules: none" in text and "Decided requests" in text
    bundle = panel._repr_mimebundle_()
    assert bundle["text/plain"] == panel.text()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_display_owner_outside_a_kernel_writes_only_the_handoff(tmp_path, monkeypatch):
    owner = types.SimpleNamespace(code="ABCDE-FGHIJ@http://127.0.0.1:1")
    target = tmp_path / "code.txt"
    monkeypatch.delenv(widgets.HANDOFF_ENV, raising=False)
    assert widgets.display_owner(owner) is False and not target.exists()
    monkeypatch.setenv(widgets.HANDOFF_ENV, str(target))
    assert widgets.display_owner(owner) is False
    assert target.read_text().strip() == owner.code
    assert target.stat().st_mode & 0o777 == 0o600


def test_display_owner_in_a_kernel_shows_the_panel(owner_pair, monkeypatch):
    owner, _ = owner_pair
    shown = []
    monkeypatch.setattr(widgets.common, "in_kernel", lambda: True)
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    assert widgets.display_owner(owner) is True
    assert shown == [owner.panel()]


def test_signaling_loss_shows_in_the_state(tmp_path):
    owner = duet.Owner(name="o", audit_log=tmp_path / "a.jsonl", identity=duet.identity.Identity.ephemeral())
    owner.code = "CODE"
    owner.signaling = types.SimpleNamespace(closed=threading.Event(), close_reason="the room expired")
    try:
        panel = owner.panel()
        assert "serving, waiting for scientists" in panel.header.value and "duet.join(" in panel.header.value
        owner.signaling.closed.set()
        panel.wait_until(lambda p: "signaling lost (the room expired)" in p.header.value)
    finally:
        owner.close()


def test_failed_connections_show_newest_first_escaped_in_panel_and_text(tmp_path):
    owner = duet.Owner(name="o", audit_log=tmp_path / "a.jsonl", identity=duet.identity.Identity.ephemeral())
    try:
        panel = owner.panel()
        assert "Could not connect" not in panel.header.value
        for i in range(5):
            owner.record_connection_failure(f"sci{i}", f"no network route to the scientist ({i}); a TURN server is needed")
        owner.record_connection_failure(HOSTILE, "why " + HOSTILE)
        panel.wait_until(lambda p: "Could not connect to &lt;script&gt;" in p.header.value)
        assert "<script>" not in panel.header.value
        value = panel.header.value
        assert value.index("&lt;script&gt;") < value.index("sci4") < value.index("sci3")
        assert "sci2" not in value, "only the latest few are shown"
        assert "Could not connect to sci4: no network route to the scientist (4); a TURN server is needed" in panel.text()
        assert len(owner.connection_failures) == 6
        for i in range(30):
            owner.record_connection_failure("x", str(i))
        assert len(owner.connection_failures) == 20 and owner.connection_failures[-1] == ("x", "29")
    finally:
        owner.close()


def test_panel_updates_are_coalesced(owner_pair):
    owner, _ = owner_pair
    panel = owner.panel()
    before = panel.refreshes
    # A render already in progress absorbs any number of changes into one more render.
    panel._refreshing = True
    for _ in range(50):
        panel._changed()
    assert panel.refreshes == before and panel._dirty
    panel._refreshing = False
    panel._dirty = False


# -- the scientist's get() status ---------------------------------------------------------
class Shown(list):
    """What `display()` received; `event` is set on the first display."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def __call__(self, obj) -> None:
        self.append(obj)
        self.event.set()


@pytest.fixture
def fake_kernel(monkeypatch):
    shown = Shown()
    monkeypatch.setattr(widgets.common, "in_kernel", lambda: True)
    monkeypatch.setattr(widgets.status, "_show", shown)
    return shown


def _decide_once_shown(owner, shown, decide):
    """The owner decides only after the status is on screen (as a person would, much later)."""

    def run():
        req = owner.requests.wait_pending(10)
        assert shown.event.wait(10)
        decide(req)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_get_status_while_waiting_for_approval(owner_pair, fake_kernel):
    owner, scientist = owner_pair
    m = scientist.store["ages"].mean()

    t = _decide_once_shown(owner, fake_kernel, lambda req: req.accept())
    assert torch.equal(m.get(reason="mean", timeout=10), torch.tensor(39.25))
    t.join(10)
    (status,) = fake_kernel
    assert isinstance(status, widgets.GetStatus) and status.state == "done"
    assert "Received mean(ages)" in status.label.value
    assert "text/plain" not in status._repr_mimebundle_()


def test_get_status_is_shown_as_the_widget_view_only(monkeypatch):
    import concurrent.futures
    import IPython.display

    published = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: published.append((obj, raw)))
    handle = RequestHandle("x", "", concurrent.futures.Future(), lambda raw: raw)
    widgets.status._show(widgets.GetStatus(handle))
    ((bundle, raw),) = published
    assert raw and list(bundle) == ["application/vnd.jupyter.widget-view+json"]


def test_get_status_on_denial(owner_pair, fake_kernel):
    owner, scientist = owner_pair
    t = _decide_once_shown(owner, fake_kernel, lambda req: req.deny("no"))
    with pytest.raises(duet.RequestDenied):
        scientist.store["ages"].max().get(reason="max", timeout=10)
    t.join(10)
    assert fake_kernel[0].state == "denied" and "Denied" in fake_kernel[0].label.value


def test_get_status_on_timeout_then_again(owner_pair, fake_kernel):
    owner, scientist = owner_pair
    m = scientist.store["ages"].sum()
    with pytest.raises(duet.RequestTimeout):
        m.get(reason="sum", timeout=0.5)
    assert fake_kernel[0].state == "timeout" and "call .get() again" in fake_kernel[0].text()
    owner.requests.wait_pending(10).accept()
    assert torch.equal(m.get(timeout=10), torch.tensor(157.0))


def test_no_status_for_values_that_need_no_approval(owner_pair, fake_kernel):
    _, scientist = owner_pair
    assert torch.equal((scientist.send(torch.tensor([1.0])) * 2).get(timeout=10), torch.tensor([2.0]))
    assert fake_kernel == []


def test_no_status_outside_a_kernel(owner_pair, monkeypatch):
    owner, scientist = owner_pair
    shown = []
    monkeypatch.setattr(widgets.status, "_show", shown.append)
    t = threading.Thread(target=lambda: owner.requests.wait_pending(10).accept())
    t.start()
    scientist.store["ages"].mean().get(reason="m", timeout=10)
    t.join(10)
    assert shown == []


def test_get_status_progress_is_coalesced():
    import concurrent.futures

    handle = RequestHandle("mean(ages)", "r", concurrent.futures.Future(), lambda raw: raw)
    handle.owner_request_id = 7
    status = widgets.GetStatus(handle)
    assert status.text() == "Asking the owner for mean(ages)…"
    status.update("waiting")
    assert "Waiting for the owner to approve mean(ages) (owner's request #7)" in status.text()
    labels = []
    status.label.observe(lambda change: labels.append(change["new"]), "value")
    for received in range(0, 1_000_001, 1000):  # 1001 progress events
        status.on_progress(received, 1_000_000)
    assert status.state == "transferring" and status.bar.value == 1.0
    assert len(labels) <= 101
    assert "Transferring mean(ages): 976.6 KiB of 976.6 KiB" in status.text()
    assert status.bar.layout.visibility == "visible"


def test_get_status_follows_the_owners_queue_notice(monkeypatch):
    """When the owner says "queued", the status turns to waiting for approval, then done."""
    import concurrent.futures

    shown = Shown()
    monkeypatch.setattr(widgets.common, "in_kernel", lambda: True)
    monkeypatch.setattr(widgets.status, "_show", shown)
    future: concurrent.futures.Future = concurrent.futures.Future()
    handle = RequestHandle("mean(ages)", "r", future, lambda raw: raw)

    def owner_side():
        assert shown.event.wait(10)
        handle.owner_request_id = 3  # what the client does on a "queued" message
        handle.on_change(handle)
        seen.append(shown[0].text())
        future.set_result("value")

    seen = []
    t = threading.Thread(target=owner_side)
    t.start()
    assert handle.wait(10) == "value"
    t.join(10)
    assert seen == ["Waiting for the owner to approve mean(ages) (owner's request #3)…"]
    assert shown[0].state == "done" and handle.on_change is None


# -- differential privacy ------------------------------------------------------------------------
@pytest.fixture
def dp_owner_pair(tmp_path):
    owner, scientist = duet.local_pair(audit_log=tmp_path / "audit.jsonl", owner_name="St. Mary's", scientist_name="Dr. Lee")
    owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0]), name="ages", bounds=(0, 120))
    owner.privacy.budget(epsilon=3.0)
    yield owner, scientist
    scientist.close()
    owner.close()


def test_the_panel_shows_budgets_and_the_epsilon_of_a_dp_request(dp_owner_pair):
    owner, scientist = dp_owner_pair
    panel = owner.panel()
    assert "bounds [0, 120]" in panel.assets_html.value
    handle = scientist.store["ages"].mean().request(reason="mean age", dp=0.5)
    card = _pending_card(panel)
    assert "ε 0.5" in card.info.value and "noisy value" in card.info.value and "discrete Laplace" in card.info.value
    panel.wait_until(lambda p: "Dr. Lee" in p.privacy_html.value)
    assert "2.5" in panel.privacy_html.value  # reserved while it waits: 0.5 of 3 counted as spent
    card.toggle_preview()
    assert "tensor(" in card.preview.value  # the noisy value, for the owner's eyes
    card.accept_button.click()
    handle.wait(10)
    panel.wait_until(lambda p: not p.cards)
    assert "differentially private, ε 0.5" in panel.history_html.value
    text = panel.text()
    assert "Privacy ledger: default budget epsilon 3" in text and "Dr. Lee" in text


def test_a_dp_get_shows_its_charge_even_when_a_rule_answers_at_once(dp_owner_pair, fake_kernel):
    owner, scientist = dp_owner_pair
    owner.requests.add_handler(action="accept", dp=True)
    scientist.store["ages"].mean().get(dp=0.5, timeout=10)
    (status,) = fake_kernel
    assert status.state == "done" and "charged ε 0.5; 2.5 of ε 3 left" in status.text()
