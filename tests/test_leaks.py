"""No private value may appear in anything the scientist receives: errors, reprs, logs."""
from __future__ import annotations

import logging

import pytest
import torch

import duet

SECRET_VALUES = [123456.78125, 987654.3125, 55555.5]
NEEDLES = ["123456", "987654", "55555", "1.2346e", "9.8765e"]


def _no_secret(text: str) -> None:
    for needle in NEEDLES:
        assert needle not in text, f"private value leaked: {text!r}"


@pytest.fixture
def private_pair(tmp_path):
    owner, scientist = duet.local_pair(audit_log=tmp_path / "a.jsonl")
    owner.store.add(torch.tensor(SECRET_VALUES), name="salaries", description="private salaries")
    yield owner, scientist
    scientist.close()
    owner.close()


def test_errors_reprs_and_logs_carry_no_values(private_pair, caplog):
    owner, scientist = private_pair
    s = scientist.store["salaries"]
    texts = [repr(s), f"{s}", repr(s * 2), repr(scientist.store), repr(s.meta())]
    top = s.max().item()  # a private Python float on the owner
    failing = [
        scientist._call("func", "operator.getitem", [{"a": 1}, top], {}),  # KeyError(value) on the owner
        scientist._call("func", "operator.getitem", [[1, 2], top], {}),  # TypeError naming the type
        scientist._call("func", "torch.zeros", [s.long()], {}),  # size built from values
        scientist._call("func", "torch.zeros", [top], {}),
        scientist._call("func", "torch.full", [[2], top], {"dtype": torch.int8}),
        scientist._call("func", "numpy.zeros", [s.long().sum().item()], {}),
        s.view(7),  # shape error naming sizes only
        scientist._call("func", "operator.truediv", [1, s.sub(s).sum().item()], {}),
        s.item(),
        s.long().sum().item() + "x",
    ]
    with caplog.at_level(logging.DEBUG, logger="duet.scientist"):
        for ptr in failing:
            with pytest.raises(duet.DuetError) as info:
                ptr.get(timeout=10)
            texts.append(str(info.value))
            texts.append(repr(info.value))
            texts.append(repr(ptr))
    texts.extend(str(e) for e in scientist.failures.values())
    texts.extend(r.getMessage() for r in caplog.records if r.name.startswith("duet.scientist"))
    assert len(texts) > 20
    for text in texts:
        _no_secret(text)


def test_denial_and_pending_requests_carry_no_values(private_pair):
    owner, scientist = private_pair
    ptr = scientist.store["salaries"].sum()
    h = ptr.request("total")
    req = owner.requests.wait_pending(10)
    _no_secret(repr(h))
    req.deny("no")
    with pytest.raises(duet.RequestDenied) as info:
        h.wait(10)
    _no_secret(str(info.value))
    _no_secret(repr(scientist.requests))


def test_metadata_of_private_values_is_not_values(private_pair):
    _, scientist = private_pair
    meta = scientist.store["salaries"][scientist.store["salaries"] > 60000].meta()
    assert meta["shape"] is None and meta["private"] is True and meta["assets"] == ["salaries"]
    _no_secret(repr(meta))
