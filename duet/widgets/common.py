"""What the owner's and the scientist's widgets share: escaping, the kernel check, ipywidgets."""
from __future__ import annotations

import html
from typing import Any

from ..text import clean


def esc(text: Any) -> str:
    """Escaped for HTML, with control and bidi characters replaced (see duet.text)."""
    return html.escape(clean(text, limit=20_000, newlines=True))


def in_kernel() -> bool:
    """True when running inside an IPython kernel (Jupyter), where widgets can render.

    The widget modules call it as `common.in_kernel()`, so a test can pretend to be in a
    kernel by replacing this one name.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def ipywidgets() -> Any:
    """The ipywidgets module (imported on first use; ImportError when it is not installed)."""
    import ipywidgets

    return ipywidgets
