"""The leak classes of tests/test_leak_classes.py between two real processes over real WebRTC.

The owner process publishes the same private assets and decides nothing; the
scientist (this process) runs each attack and must find every result private.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import duet
from tests.procs.helpers import scientist_of_owner_process
from tests.test_leak_classes import ATTACKS, needs_approval, shape_hidden

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def remote_scientist():
    with scientist_of_owner_process("--leak-assets", name="hostile") as scientist:
        yield scientist


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_holds_over_webrtc(remote_scientist, name):
    attack, what = ATTACKS[name]
    ptr = attack(remote_scientist)
    assert ptr.private and needs_approval(ptr)
    if what == "shape":
        assert shape_hidden(ptr)


def test_random_numbers_over_webrtc_do_not_carry_what_an_earlier_draw_consumed(remote_scientist):
    """poisson draws as many numbers as its private rates demand; later public draws must not notice."""
    s = remote_scientist
    x = s.store["x"]
    draws = []
    for scale in (1.0, 1000.0):  # the same sequence of actions, with very different rates
        s.torch.manual_seed(11)
        s.torch.poisson(x * scale)
        draws.append(s.torch.rand(3).get(timeout=30))
    assert torch.equal(draws[0], draws[1])


def test_numpy_out_by_position_is_refused_over_webrtc(remote_scientist):
    s = remote_scientist
    out = s.send(np.zeros((), dtype=np.float32))
    with pytest.raises(duet.NotAllowed, match="out"):
        s.numpy.dot(s.store["xn"], s.store["xn"], out).get(timeout=30)
    assert float(out.get(timeout=30)) == 0.0


def test_uninitialised_memory_never_crosses_webrtc(remote_scientist):
    s = remote_scientist
    junk = s.store["x"].repeat(20000) * 3.0  # private values in memory about to be freed
    del junk
    s.ping()
    assert not s.torch.empty(200000).get(timeout=30).any()
    mine = s.send(torch.zeros(1))
    mine.resize_as_(s.send(torch.zeros(100000)))
    assert not mine.get(timeout=30).any()
