"""Shared fixtures: an isolated config dir for every test, and an in-memory pair."""
from __future__ import annotations

import gc
from typing import Iterator, Tuple

import pytest
import torch

import duet


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Identities and audit logs of tests never touch the user's config dir."""
    monkeypatch.setenv("DUET_CONFIG_DIR", str(tmp_path_factory.mktemp("duet-config")))


@pytest.fixture
def pair(tmp_path) -> Iterator[Tuple[duet.Owner, duet.Scientist]]:
    owner, scientist = duet.local_pair(audit_log=tmp_path / "audit.jsonl", owner_name="St. Mary's", scientist_name="Dr. Lee")
    owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0]), name="ages", description="patient ages")
    yield owner, scientist
    scientist.close()
    owner.close()
    gc.collect()
