"""The join-code handoff for test harnesses: the code written to $DUET_HANDOFF_FILE.

When that variable names a file, `display_owner` (what `duet.launch()` calls) writes
the join code there, atomically and readable by the owner alone, so a harness can
start the scientist's notebook or process next to the owner's; see docs/notebooks.md.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ..owner.host import Owner

HANDOFF_ENV = "DUET_HANDOFF_FILE"


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
