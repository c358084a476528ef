"""Random numbers inside a sent model stay random: a traced forward must not freeze them.

`torch.fx` runs forward once to record it; a random call that takes no traced
value (`torch.randn(3)`) would run then and be stored as a constant, so every
remote call would add the same "noise" -- a silently wrong result. Such calls
are recorded as graph nodes and drawn on the owner from the scientist's own
generator; randomness that cannot be recorded (Python's `random`, a random
in-place op on a constant) makes the send fail with a message saying why.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import duet


class Reparameterise(nn.Module):
    """A VAE's sampling step, written as Duet-era notebooks wrote it."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = nn.Linear(4, 2)
        self.logvar = nn.Linear(4, 2)

    def forward(self, x):
        mu, std = self.mu(x), torch.exp(0.5 * self.logvar(x))
        return mu + std * torch.randn(x.shape[0], 2) + 0.01 * torch.rand(2)


def test_random_calls_in_forward_differ_between_calls_and_follow_the_seed(pair):
    _, scientist = pair
    remote = scientist.send(Reparameterise())
    x = torch.randn(5, 4)
    rx = scientist.send(x)
    first, second = remote(rx).get(timeout=10), remote(rx).get(timeout=10)
    assert not torch.equal(first, second), "the noise was frozen at trace time"
    runs = []
    for seed in (7, 7, 8):
        scientist.torch.manual_seed(seed)  # the scientist's own generator on the owner (duet.owner.randomness)
        runs.append(remote(rx).get(timeout=10))
    assert torch.equal(runs[0], runs[1]), "the same seed gave different noise"
    assert not torch.equal(runs[0], runs[2]), "another seed gave the same noise"


def test_the_graph_holds_the_random_call_not_a_constant():
    from duet.scientist.models import describe

    graph = describe(Reparameterise()).graph
    calls = [n[1] for n in graph["nodes"] if n[0] == "call_function"]
    assert "torch.randn" in calls and "torch.rand" in calls
    assert graph["attrs"] == []  # no trace-time tensor was captured


class PythonRandom(nn.Module):
    def forward(self, x):
        return x + random.random()


class NumpyRandom(nn.Module):
    def forward(self, x):
        return x * float(np.random.rand())


class RandomIntoAConstant(nn.Module):
    def forward(self, x):
        return x + torch.ones(3).normal_()


class BuildsAModule(nn.Module):
    def forward(self, x):
        return nn.Tanh()(x)


class BranchesOnData(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize("model, says", [
    (PythonRandom(), "changes from call to call"),
    (NumpyRandom(), "changes from call to call"),
    (RandomIntoAConstant(), r"draws random numbers .*\(normal_\)"),
    (BuildsAModule(), r"builds a module while it runs .* create it in __init__"),
    (BranchesOnData(), r"Python control flow .* depends on a traced value"),
])
def test_what_cannot_be_recorded_is_refused_with_the_reason(pair, model, says):
    _, scientist = pair
    with pytest.raises(duet.NotAllowed, match=says):
        scientist.send(model)


def test_a_remote_call_inside_forward_is_named_as_such(pair):
    _, scientist = pair

    class CallsTheOwner(nn.Module):
        def forward(self, x):
            return scientist.torch.tanh(x)

    with pytest.raises(duet.NotAllowed, match="forward calls the owner"):
        scientist.send(CallsTheOwner())
