"""Plain-text and HTML tables for reprs, so listings read well in notebooks and terminals.

Every cell is escaped in HTML: names, descriptions and reasons can come from
the other party and are shown as text, never markup.
"""
from __future__ import annotations

import html
from typing import Any, List, Optional, Sequence

from .text import clean


def _cell(value: Any, width: int = 60) -> str:
    text = clean(value, limit=10_000)  # one line, no control or bidi characters
    return text if len(text) <= width else text[: width - 1] + "…"


# Columns whose text must never be cut short (it was shortened, keeping what matters, by its maker).
WHOLE_COLUMNS = frozenset({"operations"})


def _width(header: str, width: int) -> int:
    return 10_000 if header in WHOLE_COLUMNS else width


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: Optional[str] = None) -> str:
    """A fixed-width table for plain Python consoles."""
    cells = [[_cell(c, _width(h, 60)) for h, c in zip(headers, row)] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: Optional[str] = None) -> str:
    """An escaped HTML table for Jupyter's rich display."""
    esc = html.escape
    parts = []
    if title:
        parts.append(f"<b>{esc(title)}</b>")
    parts.append('<table class="duet-table">')
    parts.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(_cell(c, _width(h, 200)))}</td>" for h, c in zip(headers, row)) + "</tr>")
    if not rows:
        parts.append(f'<tr><td colspan="{len(headers)}"><i>none</i></td></tr>')
    parts.append("</tbody></table>")
    return "".join(parts)


def human_bytes(n: Optional[int]) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


STORE_HEADERS = ["name", "description", "tags", "type", "shape", "dtype"]
DP_HEADER = "differential privacy"


def store_rows(listing: Sequence[dict]) -> list:
    """Rows of the store table, shared by the owner's and the scientist's view."""
    with_dp = any(isinstance(a.get("dp"), dict) for a in listing)
    return [
        [
            a["name"],
            a["description"],
            ", ".join(a["tags"]),
            a["type"],
            "×".join(str(s) for s in a["shape"]) if a["shape"] is not None else "",
            a["dtype"] or ("keys: " + ", ".join(map(str, a["keys"])) if a.get("keys") else ""),
        ] + ([dp_text(a.get("dp"))] if with_dp else [])
        for a in listing
    ]


def store_headers(listing: Sequence[dict]) -> List[str]:
    """The store table's columns: a privacy column only when an asset declares one."""
    return STORE_HEADERS + ([DP_HEADER] if any(isinstance(a.get("dp"), dict) for a in listing) else [])


def dp_text(dp: Any) -> str:
    """An asset's DP declaration in a few words (from the listing, so both sides show the same)."""
    if not isinstance(dp, dict):
        return ""
    if dp.get("unit") == "item":
        return "one item per person (DP training)"
    lo, hi = dp.get("lo") or [], dp.get("hi") or []
    if not lo or len(lo) != len(hi):
        return ""
    if len(set(lo)) == 1 and len(set(hi)) == 1:
        span = f"[{lo[0]:g}, {hi[0]:g}]"
    else:
        span = ", ".join(f"[{a:g}, {b:g}]" for a, b in list(zip(lo, hi))[:4]) + (", …" if len(lo) > 4 else "")
    axis = dp.get("axis", 0)
    missing = ", may be missing" if dp.get("missing") else ""
    return f"bounds {span}{missing}, one {'row' if axis == 0 else f'slice of axis {axis}'} per person"
