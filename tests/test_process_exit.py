"""A script that pairs and exits at once must exit cleanly.

After the first join the owner warms torch's meta registrations in a background thread; a daemon thread still inside
torch's imports when the interpreter finalizes used to abort the process (exit status 134,
"terminate called without an active exception").
"""
from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import duet
owner, scientist = duet.local_pair(audit_log={audit!r})
print("made")
"""


def test_pairing_and_exiting_at_once_exits_with_status_zero(tmp_path):
    for i in range(2):
        done = subprocess.run([sys.executable, "-c", SCRIPT.format(audit=str(tmp_path / f"audit{i}.jsonl"))],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "DUET_CONFIG_DIR": str(tmp_path)})
        assert done.returncode == 0, done.stderr[-2000:]
        assert "made" in done.stdout and "terminate called" not in done.stderr
