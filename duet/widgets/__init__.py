"""The ui layer: the owner's live panel and the scientist's `.get()` status.

One module per job:

- `panel`: `OwnerPanel`, the owner's live panel (pending requests with Preview /
  Accept / Deny, rules, connected scientists, assets, decided requests), and
  `display_owner`, what `duet.launch()` calls to show it.
- `approval`: how a request reads for the owner who decides it (`request_html`,
  `request_text`, `preview_html`).
- `status`: `GetStatus` and `get_status`, the scientist's live status while a
  `.get()` waits for approval and the value arrives.
- `handoff`: the join code written to $DUET_HANDOFF_FILE for test harnesses.
- `common`: what these share (HTML escaping, `in_kernel`, the ipywidgets import).

Everything the scientist wrote (their name, their reasons) is escaped and
shown as their words, never as markup. Outside a kernel the same objects print
as text tables; nothing here is needed by scripts.
"""
from __future__ import annotations

from . import approval, common, handoff, panel, status
from .approval import preview_html, request_html, request_text
from .common import in_kernel
from .handoff import HANDOFF_ENV, write_handoff
from .panel import OwnerPanel, RequestCard, RuleRow, display_owner
from .status import GetStatus, get_status

__all__ = [
    "HANDOFF_ENV",
    "GetStatus",
    "OwnerPanel",
    "RequestCard",
    "RuleRow",
    "approval",
    "common",
    "display_owner",
    "get_status",
    "handoff",
    "in_kernel",
    "panel",
    "preview_html",
    "request_html",
    "request_text",
    "status",
    "write_handoff",
]
