"""Text from the other party, made safe to show: no control characters, no bidi tricks, bounded length.

A scientist chooses their name, the reason of each request and the names of
their plans; an owner chooses theirs. Shown in a table, a terminal or the
panel, such text could otherwise move the cursor (ANSI escapes), reorder what
the reader sees (bidi overrides such as U+202E), hide characters (zero-width
joiners) or push the Accept and Deny buttons out of sight. Every such
character is replaced by U+FFFD, so tampering stays visible.
"""
from __future__ import annotations

import unicodedata

REPLACEMENT = "\ufffd"
_SPACE_LIKE = {"\t": " ", "\u2028": " ", "\u2029": " "}


def clean(text: object, limit: int = 2000, newlines: bool = False) -> str:
    """Untrusted text with control and format characters replaced; at most `limit` characters."""
    s = "" if text is None else str(text)
    if len(s) > limit:
        s = s[:limit]
    out = []
    for ch in s:
        if ch == "\n":
            out.append("\n" if newlines else " ")
            continue
        if ch in _SPACE_LIKE:
            out.append(_SPACE_LIKE[ch])
            continue
        category = unicodedata.category(ch)
        if category in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(REPLACEMENT)
        else:
            out.append(ch)
    return "".join(out)


def is_clean(text: str) -> bool:
    """Whether text already has nothing `clean` would replace (names Duet produced itself)."""
    return clean(text, limit=len(text) + 1, newlines=True) == text
