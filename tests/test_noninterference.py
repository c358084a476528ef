"""The promise, tested as noninterference: the same random program against two owners whose
private data differ must look the same to the scientist wherever nothing was approved.

A short budget runs here; benchmarks/noninterference.py runs the long one.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    name = "noninterference"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)
def test_no_program_tells_two_owners_apart(tmp_path):
    fuzzer = _load()
    logging.disable(logging.WARNING)
    try:
        result = fuzzer.run(examples=60, steps=20, tmp=tmp_path, seed=20261201)
    finally:
        logging.disable(logging.NOTSET)
    assert result["leaks"] == 0
    assert result["programs"] >= 60 and result["actions"] > 600, result
    assert result["distinct_ops"] > 40, result  # the programs exercised the menu, not one corner


@pytest.mark.timeout(600)
def test_the_fuzzer_finds_a_planted_leak(tmp_path, monkeypatch):
    """The fuzzer is only evidence if it can fail: with effects ignored it must report a leak."""
    fuzzer = _load()
    from duet.owner import executor

    monkeypatch.setattr(executor.Executor, "_apply_effects", lambda self, *a, **k: False)
    logging.disable(logging.WARNING)
    try:
        with pytest.raises(fuzzer.Leak):
            fuzzer.run(examples=100, steps=20, tmp=tmp_path, seed=7, shrink=False)
    finally:
        logging.disable(logging.NOTSET)


def test_a_value_dependent_failure_is_counted_as_the_one_bit_channel(tmp_path):
    """Success in one run and failure in the other is reported separately, not as a leak, and stops the program."""
    fuzzer = _load()
    fuzzer.STATS = fuzzer.Stats()
    fuzzer.Noninterference.tmp = tmp_path
    inside = next(s for s in range(1000) if int(fuzzer._secrets(s)["ids"].max()) < 3)
    outside = next(s for s in range(1000) if int(fuzzer._secrets(s)["ids"].max()) >= 3)
    machine = fuzzer.Noninterference()
    try:
        machine.start(seeds=(inside, outside))
        machine.binary(a=5, b=2, op="getitem")  # ones(3, 4)[ids]: out of range in one run only
        assert machine.diverged
        assert fuzzer.STATS.side_channel["operator.getitem"] == 1
        assert fuzzer.STATS.leaks == 0
    finally:
        machine.teardown()
