"""Views the ui layer provides to the layers below it.

Owner and scientist code must not import the ui layer (`duet.widgets` sits above them). Instead
the package registers the ui layer's views here when `duet` is imported, and lower layers look
them up, falling back to plain text when none is registered.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Optional

# owner -> its live panel (ipywidgets)
owner_panel: Optional[Callable[[Any], Any]] = None
# (request handle, timeout) -> a context manager showing a waiting get() in a notebook
get_status: Optional[Callable[[Any, float], ContextManager[Any]]] = None
# whether this process is a Jupyter kernel that can show widgets
in_kernel: Callable[[], bool] = lambda: False


def register(*, owner_panel: Callable[[Any], Any], get_status: Callable[[Any, float], ContextManager[Any]],
             in_kernel: Callable[[], bool]) -> None:
    """Called once by the package with the ui layer's views."""
    globals().update(owner_panel=owner_panel, get_status=get_status, in_kernel=in_kernel)
