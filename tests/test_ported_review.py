"""Hostile review of the ported-notebook features (lengths, model methods, Python assets,
distributions, legacy constructors, amended reasons). Each test is a concrete attack that
told two owners apart (or otherwise broke a promise) without any approval; all are closed
(see SECURITY.md)."""
from __future__ import annotations

import pytest
import torch

import duet

from tests.test_noninterference_cases import T, differential


def test_python_number_in_a_dict_asset_is_public_when_indexed(tmp_path):
    """A dict asset of tensors and numbers (`{"w": tensor, "threshold": 0.73}`) is published with
    public structure. Indexing it for the number runs a shadow run in which Python numbers are
    passed through unchanged, so the prediction equals the real (private) number, the result's
    metadata *and value* take only the (empty) metadata lineage, and `.get()` returns it without
    approval."""
    def prog(s):
        d = s.store["d"]
        return {"threshold": lambda: d["threshold"]}
    differential(prog, tmp_path, extra={"d": ({"w": torch.zeros(2), "threshold": 0.25},
                                               {"w": torch.zeros(2), "threshold": 0.75})})


def test_python_list_asset_values_public_after_appending_a_tensor(tmp_path):
    """A published list of numbers: `lst + [public tensor]` keeps public metadata (the shadow run
    predicts it, numbers copied verbatim), and indexing the concatenation for a number is then
    "predicted" to be the private number itself: a public value."""
    def prog(s):
        lst = s.store["lst"]
        both = lst + s.send([torch.zeros(1)])
        return {"first": lambda: both[0]}
    differential(prog, tmp_path, extra={"lst": ([3, 1, 4], [2, 7, 1])})


class _EncDec(torch.nn.Module):
    """forward uses only the encoder; `dec` uses a batch norm that forward never touches."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(8, 8)
        self.bn = torch.nn.BatchNorm1d(8)

    def forward(self, x):
        return self.enc(x)

    def dec(self, z):
        return self.bn(z)


def test_layer_used_only_by_a_method_is_outside_the_model(tmp_path):
    """The owner rebuilds forward as `DuetModel(root, forward_graph)`, which copies only the layers
    forward references; a layer only a method uses lives in `duet_methods` alone, outside the
    model's parameters, buffers and footprint. `m.dec(private)` in training mode writes private
    statistics into that batch norm's running mean unwatched (the model is not tainted), and a
    later `m.dec(public zeros)` in eval mode is public and returns -running_mean/std: private
    values without approval."""
    def prog(s):
        m = s.send(_EncDec())
        m.dec(s.store["x"].reshape(1, 8).expand(2, 8) * s.torch.tensor([[1.0], [3.0]]))
        m.eval()
        out = m.dec(s.send(torch.zeros(1, 8)))
        return {"model": lambda: m, "decoded": lambda: out}
    differential(prog, tmp_path)


def test_distribution_shares_memory_with_its_parameters_unseen(tmp_path):
    """A distribution holds (views of) the tensors it was built from, but footprints do not look
    inside distributions, so `Normal(loc, 1.0)` joins no alias group. Writing private values into
    `loc` afterwards taints `loc` only; the distribution stays public and its `.mean` (a view of
    the same memory) is a public tensor holding the private values."""
    def prog(s):
        loc = s.torch.zeros(8)
        d = s.torch.distributions.Normal(loc, 1.0)
        loc.copy_(s.store["x"])
        return {"mean": lambda: d.mean}
    differential(prog, tmp_path)


def test_distribution_sample_allocates_before_any_size_check(tmp_path):
    """Distribution methods have no shadow run, so sizes are "checked op by op" by the dispatch
    guard, which reads only SymInt[] size arguments. `Categorical.sample((n,))` calls
    `torch.multinomial(probs, n, True)` with an int `num_samples`, which the guard never counts:
    `torch.multinomial` itself is refused before allocating, but through the distribution the owner
    allocates (and fills) n int64s first and refuses only at a later view. Here a scientist limited
    to 16 MB and 10**6 elements makes the owner allocate 800 MB. (`Multinomial(10**12, p).sample()`
    reaches the allocator with an 8 TB request the same way.)"""
    import resource

    from duet.owner.objects import Limits

    owner, s = duet.local_pair(audit_log=tmp_path / "a.jsonl",
                               limits=Limits(max_elements_per_object=10**6, max_bytes=2**24))
    try:
        probs = s.torch.ones(3)
        with pytest.raises(duet.LimitExceeded):
            s.torch.multinomial(probs, 10**8, True).meta(timeout=T)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        with pytest.raises(duet.LimitExceeded):
            s.torch.distributions.Categorical(probs=probs).sample((10**8,)).meta(timeout=60)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**10
        assert grown < 100, f"the owner's peak memory grew by {grown:.0f} MiB for a scientist limited to 16 MiB"
    finally:
        s.close()
        owner.close()
