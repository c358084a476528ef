"""Everything derived from private data stays private, including through aliasing and mutation."""
from __future__ import annotations

import torch

import duet


def _needs_approval(ptr: duet.Pointer) -> bool:
    try:
        ptr.get(timeout=0.3)
    except duet.RequestTimeout:
        return True
    return False


def test_mixing_asset_and_own_data_needs_approval(pair):
    _, scientist = pair
    mine = scientist.send(torch.ones(4))
    mixed = mine + scientist.store["ages"]
    assert mixed.private and _needs_approval(mixed)
    assert not mine.private and torch.equal(mine.get(timeout=10), torch.ones(4))


def test_in_place_update_taints_the_target(pair):
    _, scientist = pair
    mine = scientist.send(torch.zeros(4))
    mine.add_(scientist.store["ages"])
    assert mine.private and _needs_approval(mine)


def test_setitem_taints_the_target(pair):
    _, scientist = pair
    mine = scientist.send(torch.zeros(4))
    mine[0] = scientist.store["ages"][0]
    assert mine.private


def test_views_share_lineage_after_mutation(pair):
    _, scientist = pair
    mine = scientist.send(torch.zeros(4))
    view = mine[:2]
    mine.mul_(scientist.store["ages"])
    assert view.private, "a view of a tainted tensor shows private data"


def test_backward_taints_parameters_and_grads(pair):
    _, scientist = pair
    w = scientist.send(torch.ones(4)).requires_grad_()
    loss = (w * scientist.store["ages"]).sum()
    assert not w.private
    loss.backward()
    assert w.grad.private
    assert w.private  # conservative: the tensor holding a private .grad is private


def test_training_taints_model_and_optimizer(pair):
    _, scientist = pair
    model = scientist.torch.nn.Linear(4, 1)
    opt = scientist.torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model.weight
    assert not model.private and torch.is_tensor(weight.get(timeout=10))
    x = scientist.store["ages"].view(1, 4)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert model.private and weight.private and _needs_approval(model.weight)


def test_fresh_values_from_own_data_are_public(pair):
    _, scientist = pair
    a = scientist.torch.randn(3)
    b = (a * 2).sum()
    assert not b.private
    assert isinstance(b.get(timeout=10), torch.Tensor)


def test_request_shows_lineage_and_operations(pair):
    owner, scientist = pair
    ptr = (scientist.store["ages"] + scientist.send(torch.ones(4))).std()
    ptr.request("spread")
    req = owner.requests.wait_pending(10)
    assert req.lineage == ("ages",)
    assert "operator.add" in req.ops and req.ops[-1] == "Tensor.std"
    assert req.shape == () and req.dtype == "float32" and req.numel == 1


def test_release_is_a_snapshot_at_request_time(pair):
    owner, scientist = pair
    mine = scientist.send(torch.zeros(2))
    tainted = mine + scientist.store["ages"][:2]
    h = tainted.request("before")
    owner.requests.wait_pending(10)
    tainted.add_(100)
    owner.requests.pending[0].accept()
    assert torch.equal(h.wait(10), torch.tensor([31.0, 45.0]))


def test_asset_is_never_modified_by_the_scientist(pair):
    owner, scientist = pair
    ages = scientist.store["ages"]
    ages.mul_(0)
    scientist.ping()
    assert torch.equal(owner.store["ages"].value, torch.tensor([31.0, 45.0, 52.0, 29.0]))
