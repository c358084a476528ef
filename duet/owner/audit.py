"""Append-only audit log (JSON lines) of every decision and every release."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


class AuditLog:
    """One JSON object a line; opened in append mode so history is never rewritten."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.close(fd)

    def append(self, event: str, **fields: Any) -> Dict[str, Any]:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
        if self.path is not None:
            line = json.dumps(record, default=str, sort_keys=True)
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
        return record

    def read(self) -> List[Dict[str, Any]]:
        """Every record so far, oldest first (for tests and for the owner's review)."""
        if self.path is None or not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
