"""The paired notebooks in notebooks/ run under nbval, owner and scientist side by side.

Each pair runs as two `pytest --nbval` processes (outputs compared with the
committed ones after notebooks/nbval.cfg's sanitizers) against a real
signaling process on 127.0.0.1, connected peer to peer over real WebRTC. The
join code goes from the owner's kernel to the scientist's through
DUET_HANDOFF_FILE / DUET_JOIN_CODE (tests/nbhandoff.py, docs/notebooks.md);
no cell is rewritten. Regenerate the baseline with
`python -m tests.nbhandoff update`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import nbhandoff


@pytest.mark.slow
@pytest.mark.timeout(nbhandoff.PAIR_TIMEOUT + 60)
@pytest.mark.parametrize("topic", nbhandoff.TOPICS)
def test_notebook_pair_under_nbval(topic, tmp_path):
    result = nbhandoff.run_nbval_pair(topic, tmp_path)
    assert result.ok, result.report()
    assert "passed" in result.owner_out and "passed" in result.scientist_out


@pytest.mark.parametrize("topic", nbhandoff.TOPICS)
def test_pairs_are_complete_and_committed_with_outputs(topic):
    folder = nbhandoff.NOTEBOOKS / topic
    for role in nbhandoff.roles(topic):
        nb = json.loads((folder / f"{role}.ipynb").read_text(encoding="utf-8"))
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code and all(c.get("execution_count") for c in code), f"{topic}/{role}: run `python -m tests.nbhandoff update`"
        assert any(c["outputs"] for c in code)
        assert "widgets" not in nb.get("metadata", {}), "widget state holds a live join code; do not commit it"


def test_committed_outputs_hold_no_secret():
    patterns = nbhandoff.sanitize_patterns()
    for path in sorted(Path(nbhandoff.NOTEBOOKS).glob("*/*.ipynb")):
        if path.parent.name not in nbhandoff.TOPICS:
            continue
        text = path.read_text(encoding="utf-8")
        assert nbhandoff.sanitize(text, patterns[:2]) == text, f"{path}: a real join code or fingerprint is committed"


def test_sanitizers_cover_codes_and_fingerprints():
    patterns = nbhandoff.sanitize_patterns()
    text = ("duet.join('H4CTE-0HM6B-6FB91-8Q0YW-WDQF3-905YN-D@http://127.0.0.1:4567') "
            "SHA256:007a:7eb0:53ff:b31a:49f5:f278:8d1c:3f92 Dr. Lee (SHA256:007a:7eb0:53ff)")
    assert nbhandoff.sanitize(text, patterns) == (
        "duet.join('JOIN-CODE') SHA256:FINGERPRINT Dr. Lee (SHA256:FINGERPRINT)")
