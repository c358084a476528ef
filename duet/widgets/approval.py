"""How a request reads for the owner who decides it: its facts as escaped HTML and as text.

Everything the scientist wrote (their name, their reasons) is escaped and shown
as their words, never as markup; every distinct operation is listed, with the
ones that pick out single values in bold (see duet.owner.opchain).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List

from ..owner.opchain import is_selecting
from ..tables import human_bytes
from .common import esc

if TYPE_CHECKING:
    from ..owner.requests import Request

HISTORY_SHOWN = 50
PREVIEW_CHARS = 4000

STYLE = (
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
        text = esc(str(op))
        parts.append(f"<b title='picks out individual values'>{text}</b>" if is_selecting(str(op).split(" ×", 1)[0]) else text)
    return " → ".join(parts)


def _what_text(req: "Request") -> str:
    parts = []
    if req.dp_epsilon is not None:
        parts.append(f"differentially private, ε {req.dp_epsilon:g}")
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
    "secure_sum": "asks you to add a value to a secure sum across owners",
    "smpc": "asks you to compute with other owners on secret shares of a value",
}


def request_html(req: "Request") -> str:
    """The facts of one pending request, escaped."""
    rows = [
        ("Who", f"<b>{esc(req.requester.name)}</b> <span class='duet-muted'>(their chosen name)</span>"
                f"<br><code>{esc(req.requester.fingerprint)}</code> <span class='duet-muted'>(key fingerprint)</span>"),
    ]
    if req.kind != "join":
        rows.append(("Assets", esc(", ".join(req.lineage)) or "<i>none</i>"))
        rows.append(("Operations", f"<div class='duet-ops'>{_ops_html(req.ops)}</div>" if req.ops else "<i>none</i>"))
        what = _what_text(req)
        if what:
            rows.append(("What", esc(what)))
        if req.kind == "smpc":
            rows += _smpc_rows(req)
        elif req.participants:
            owners = "<br>".join(f"<code>{esc(fp)}</code>" for fp in req.participants)
            rows.append(("Summed with", f"{owners}<br><span class='duet-muted'>{len(req.participants)} owners, this one "
                                        f"included; the scientist learns only the sum, and only if at least "
                                        f"{req.threshold} of them stay</span>"))
            if req.weights:
                rows.append(("Weights", esc(_weights_text(req.weights))))
            if req.dp_epsilon is None:
                rows.append(("Exact sum", "<b>the scientist chose what every other owner adds</b>: a sum of exact "
                                          "values protects yours only if those are real contributions"))
        if req.dp_epsilon is not None:
            rows.append(("Privacy", f"<b>ε {req.dp_epsilon:g}</b> from this scientist's budget "
                                    "<span class='duet-muted'>(reserved now; refunded if you deny)</span>"
                                    f"<br>{esc(req.dp_mechanism)}; Preview shows the noisy value that would be sent"))
    if req.reason:
        rows.append(("Reason", "<div class='duet-words' title='written by the scientist; unverified'>"
                               f"{esc(req.reason)}</div><span class='duet-muted'>their words, unverified</span>"))
    else:
        rows.append(("Reason", "<i class='duet-muted'>none given</i>"))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    kind_text = "asks for a noisy value (differential privacy)" if req.dp_epsilon is not None \
        else _KIND_TEXT.get(req.kind, req.kind)
    head = f"<b>Request #{req.id}</b>: {esc(req.kind)} — {esc(kind_text)}"
    return f"<div class='duet-panel'>{head}<table class='duet-table'>{body}</table></div>"


def _smpc_rows(req: "Request") -> list:
    """A share in a secret-shared computation: with whom, on what, and who deals."""
    owners = "<br>".join(f"<code>{esc(fp)}</code>" for fp in req.participants)
    rows = [("Computed with", f"{owners}<br><span class='duet-muted'>{len(req.participants)} owners, this one included; "
                              "your value leaves only as shares sealed to them; the scientist learns only the result</span>")]
    if req.computed_with:
        rows.append(("Their values", "<br>".join(esc(line) for line in req.computed_with)
                     + "<br><span class='duet-muted'>as each owner signed it</span>"))
    if req.unpinned:
        rows.append(("Keys not pinned", f"<b>{len(req.unpinned)}</b>: if one is the scientist's own, it reads your whole "
                                        "vector from the shares it receives; no rule decides this, only you"))
    if req.dealer:
        rows.append(("Dealer", f"<code>{esc(req.dealer)}</code><br><span class='duet-muted'>makes the random triples; if it "
                               "colluded with another owner, that owner would learn your values</span>"))
    return rows


def _weights_text(weights: "tuple") -> str:
    """Each owner's weight, in order; equal weights said once."""
    if len(set(weights)) == 1:
        return f"all {weights[0]:g}"
    return ", ".join(f"{w:g}" for w in weights)


def request_text(req: "Request") -> str:
    lines = [f"Request #{req.id}: {req.kind} from {req.requester.name} ({req.requester.fingerprint})"]
    if req.kind != "join":
        lines.append(f"  assets: {', '.join(req.lineage) or 'none'}")
        lines.append(f"  operations: {_ops_text(req.ops) or 'none'}")
        what = _what_text(req)
        if what:
            lines.append(f"  what: {what}")
        if req.kind == "smpc":
            lines.append(f"  computed with {len(req.participants)} owners: {', '.join(req.participants)}")
            lines += [f"    {line}" for line in req.computed_with]
            lines.append(f"  dealer: {req.dealer or 'none'} (must not collude with any owner)")
            if req.unpinned:
                lines.append(f"  keys not pinned: {len(req.unpinned)} (one of them the scientist's own would read your "
                             "whole vector; no rule decides this)")
        elif req.participants:
            lines.append(f"  summed with {len(req.participants)} owners (this one included; at least {req.threshold} "
                         f"must stay): {', '.join(req.participants)}")
            if req.weights:
                lines.append(f"  weights: {_weights_text(req.weights)}")
            if req.dp_epsilon is None:
                lines.append("  exact sum: the scientist chose what every other owner adds")
        if req.dp_epsilon is not None:
            lines.append(f"  privacy: epsilon {req.dp_epsilon:g} from this scientist's budget ({req.dp_mechanism})")
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
            f"<pre style='max-height:16em;overflow:auto;margin:2px 0'>{esc(text)}</pre></div>")


HISTORY_HEADERS = ["id", "kind", "who", "assets", "what", "decision", "by", "note to scientist"]


def history_rows(history: List["Request"]) -> List[List[Any]]:
    """The latest decided requests, newest first, as table rows."""
    rows = []
    for r in history[-HISTORY_SHOWN:][::-1]:
        rows.append([
            r.id, r.kind, f"{r.requester.name} ({r.requester.fingerprint[:19]})", ", ".join(r.lineage),
            _what_text(r) if r.kind != "join" else "", r.status, r.decided_by, r.deny_reason,
        ])
    return rows
