"""Each leak class a hostile review found, as the attack a scientist would run, on local_pair().

The owner decides nothing in these tests: anything derived from the private
asset must either need approval (``.get()`` times out) or be refused. The
same attacks between two real processes over WebRTC are in
tests/test_leak_classes_p2p.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import duet

SECRET = torch.tensor([31.0, 45.0, 52.0, 29.0, 67.0, 18.0, 3.0, 5.0, 2.0, 7.0])


@pytest.fixture
def spair(tmp_path):
    owner, scientist = duet.local_pair(audit_log=tmp_path / "a.jsonl")
    owner.store.add(SECRET.clone(), name="x", description="private")
    owner.store.add(SECRET.numpy().copy(), name="xn", description="private, as numpy")
    owner.store.add(torch.tensor([1, 3, 0, 2, 3, 1]), name="ids", description="private indices")
    yield owner, scientist
    scientist.close()
    owner.close()


def needs_approval(ptr: duet.Pointer) -> bool:
    """True if the value cannot be read without the owner (times out or is refused)."""
    try:
        ptr.get(timeout=0.3)
    except (duet.RequestTimeout, duet.NotAllowed, duet.RemoteError, duet.LimitExceeded):
        return True
    return False


def shape_hidden(ptr: duet.Pointer) -> bool:
    try:
        ptr.shape
    except duet.NotAllowed:
        return True
    return False


# -- 1. library calls that write into other arguments -----------------------------------------
def test_batch_norm_running_stats_of_the_scientist_become_private(spair):
    _, s = spair
    x = s.store["x"].view(5, 2)
    rm, rv = s.send(torch.zeros(2)), s.send(torch.ones(2))
    s.torch.nn.functional.batch_norm(x, rm, rv, training=True)
    assert rm.private and rv.private and needs_approval(rm) and needs_approval(rv)


def test_batch_norm_in_eval_mode_leaves_the_stats_public(spair):
    _, s = spair
    rm, rv = s.send(torch.zeros(2)), s.send(torch.ones(2))
    s.torch.nn.functional.batch_norm(s.store["x"].view(5, 2), rm, rv, training=False)
    assert not rm.private and torch.equal(rm.get(timeout=10), torch.zeros(2))


def test_instance_norm_running_stats_become_private(spair):
    _, s = spair
    x = s.store["x"].view(1, 2, 5)
    rm, rv = s.send(torch.zeros(2)), s.send(torch.ones(2))
    s.torch.nn.functional.instance_norm(x, running_mean=rm, running_var=rv, use_input_stats=True)
    assert rm.private and needs_approval(rm)


def test_embedding_max_norm_renormalises_the_scientists_weight(spair):
    _, s = spair
    w = s.send(torch.full((4, 3), 10.0))
    s.torch.nn.functional.embedding(s.store["ids"], w, max_norm=1.0)
    assert w.private and needs_approval(w)


# -- 2. shapes built from private values ------------------------------------------------------
def test_sizes_from_private_values_hide_the_shape(spair):
    _, s = spair
    sizes = [0] + s.store["x"][6:10].long().tolist()
    z = s.torch.zeros(sizes)
    assert shape_hidden(z)
    assert z.meta()["shape"] is None and z.meta()["dtype"] is None
    assert needs_approval(z)


def test_resize_as_to_a_private_shape(spair):
    _, s = spair
    x = s.store["x"]
    mine = s.send(torch.zeros(1))
    mine.resize_as_(x[x > 30])
    assert shape_hidden(mine) and needs_approval(mine)


@pytest.mark.parametrize("op", ["where1", "nonzero", "bincount", "one_hot", "repeat_interleave", "unique", "masked"])
def test_data_dependent_shapes_are_private(spair, op):
    _, s = spair
    x, ids = s.store["x"], s.store["ids"]
    F = s.torch.nn.functional
    ptr = {
        "where1": lambda: s.torch.where(x > 30)[0],
        "nonzero": lambda: s.torch.nonzero(x > 30),
        "bincount": lambda: s.torch.bincount(ids),
        "one_hot": lambda: F.one_hot(ids),
        "repeat_interleave": lambda: s.torch.repeat_interleave(ids),
        "unique": lambda: s.torch.unique(ids),
        "masked": lambda: x[x > 30],
    }[op]()
    assert shape_hidden(ptr), op


@pytest.mark.parametrize("op", ["nonzero", "unique", "flatnonzero", "extract", "compress", "bincount"])
def test_numpy_data_dependent_shapes_are_private(spair, op):
    _, s = spair
    xn = s.store["xn"]
    np_ = s.numpy
    ptr = {
        "nonzero": lambda: np_.nonzero(xn > 30)[0],
        "unique": lambda: np_.unique(xn),
        "flatnonzero": lambda: np_.flatnonzero(xn > 30),
        "extract": lambda: np_.extract(xn > 30, xn),
        "compress": lambda: np_.compress(xn > 30, xn),
        "bincount": lambda: np_.bincount(xn.astype("int64")),
    }[op]()
    assert shape_hidden(ptr), op


def test_indexing_with_a_list_built_from_a_private_mask(spair):
    _, s = spair
    x = s.store["x"]
    mask = (x > 30).tolist()  # a private Python list on the owner
    mine = s.send(torch.arange(10.0))
    picked = mine[mask]
    assert shape_hidden(picked) and needs_approval(picked)


def test_picking_from_a_list_by_a_private_index(spair):
    _, s = spair
    choices = s.send([torch.zeros(1), torch.zeros(7)])
    idx = (s.store["x"].sum() > 100).long().item()  # private 0/1
    picked = choices[idx]
    assert shape_hidden(picked) and needs_approval(picked)


def test_public_shapes_stay_public(spair):
    """Sizes computed only from public shapes stay visible: the shadow run on meta tensors proves it."""
    _, s = spair
    x = s.store["x"]
    assert (x * 2 + 1).shape == torch.Size([10])
    assert x.view(2, 5).sum(dim=0).shape == torch.Size([5])
    assert s.torch.sort(x)[0].shape == torch.Size([10])
    assert x.size(0).get(timeout=10) == 10  # a size derived from a public shape is public
    assert s.torch.nn.functional.one_hot(s.store["ids"], 5).shape == torch.Size([6, 5])
    assert x[s.store["ids"]].shape == torch.Size([6])  # integer indices: the shape is the index's


# -- 3. gradients ------------------------------------------------------------------------------
def test_backward_by_keyword_taints_the_leaf(spair):
    _, s = spair
    w = s.send(torch.ones(10)).requires_grad_()
    loss = (w * s.store["x"]).sum()
    s.torch.autograd.backward(tensors=[loss])
    assert w.grad.private and needs_approval(w.grad)


def test_retained_non_leaf_gradient_is_private(spair):
    _, s = spair
    w = s.send(torch.ones(10)).requires_grad_()
    h = w * 2
    h.retain_grad()
    (h * s.store["x"]).sum().backward()
    assert h.grad.private and needs_approval(h.grad)


def test_backward_inputs_taint_the_gradient_holder(spair):
    _, s = spair
    w = s.send(torch.ones(10)).requires_grad_()
    h = w * 3
    (h * s.store["x"]).sum().backward(inputs=[h])
    assert h.grad.private and needs_approval(h.grad)


def test_backward_after_a_hidden_write_is_refused(spair):
    """A tensor saved for backward and then overwritten through `.data` must not carry private values into grads."""
    _, s = spair
    w = s.send(torch.ones(10)).requires_grad_()
    m = s.send(torch.ones(10))
    loss = (w * m).sum()
    m.data.copy_(s.store["x"])
    loss.backward()
    g = w.grad
    # autograd must either refuse (the saved tensor changed) or the gradient must be private
    assert needs_approval(g) or g.get(timeout=10) is None


# -- 4. a sent model's forward that writes into its inputs ----------------------------------------
class CopyInto(nn.Module):
    def forward(self, src, dst):
        dst.copy_(src)
        return src.sum()


def test_model_forward_writing_into_an_input(spair):
    _, s = spair
    model = s.send(CopyInto())
    dst = s.send(torch.zeros(10))
    model(s.store["x"], dst)
    assert dst.private and needs_approval(dst)


def test_public_model_on_private_data_stays_public(spair):
    """Evaluating a model on private data changes nothing in the model: its weights stay public."""
    _, s = spair
    model = s.send(nn.Sequential(nn.Linear(10, 3), nn.ReLU()).eval())
    out = model(s.store["x"].view(1, 10))
    assert out.private and not model.private


# -- 5. memory sharing created without a result -------------------------------------------------
def test_load_state_dict_assign_ties_the_scientists_tensors(spair):
    _, s = spair
    model = s.torch.nn.Linear(10, 1)
    w, b = s.send(torch.zeros(1, 10)), s.send(torch.zeros(1))
    model.load_state_dict({"weight": w, "bias": b}, assign=True)
    opt = s.torch.optim.SGD(model.parameters(), lr=0.1)
    model(s.store["x"].view(1, 10)).sum().backward()
    opt.step()
    assert w.private and needs_approval(w)


def test_optimizer_load_state_dict_with_the_scientists_tensors(spair):
    _, s = spair
    model = s.torch.nn.Linear(10, 1)
    opt = s.torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    m_w, m_b = s.send(torch.zeros(1, 10)), s.send(torch.zeros(1))
    opt.load_state_dict({"state": {0: {"momentum_buffer": m_w}, 1: {"momentum_buffer": m_b}},
                         "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0,
                                           "nesterov": False, "maximize": False, "foreach": None,
                                           "differentiable": False, "fused": None, "params": [0, 1]}]})
    model(s.store["x"].view(1, 10)).sum().backward()
    opt.step()
    assert m_w.private and needs_approval(m_w)


def test_state_dict_destination(spair):
    _, s = spair
    model = s.torch.nn.Linear(10, 1)
    opt = s.torch.optim.SGD(model.parameters(), lr=0.1)
    dest = s.send({})
    model.state_dict(destination=dest)
    model(s.store["x"].view(1, 10)).sum().backward()
    opt.step()
    assert dest.private and needs_approval(dest["weight"])


# -- 6. numpy writes -----------------------------------------------------------------------------
def test_numpy_dot_into_an_output_argument(spair):
    _, s = spair
    out = s.send(np.zeros((), dtype=np.float32))
    xn = s.store["xn"]
    r = s.numpy.dot(xn, xn, out)
    with pytest.raises(duet.NotAllowed, match="out"):
        r.get(timeout=10)
    assert not needs_approval(out) and float(out.get(timeout=10)) == 0.0


def test_numpy_in_place_write_taints(spair):
    _, s = spair
    mine = s.send(np.zeros(10, dtype=np.float32))
    mine[0] = s.store["xn"][4]
    assert mine.private and needs_approval(mine)
    other = s.send(np.zeros(10, dtype=np.float32))
    other += s.store["xn"]
    assert other.private


# -- 7. uninitialised memory -----------------------------------------------------------------------
def test_empty_is_zeroed(spair):
    _, s = spair
    big = s.store["x"].repeat(10000) * 1.5  # private values in freshly freed memory
    del big
    s.ping()
    for e in (s.torch.empty(100000), s.torch.empty_like(s.send(torch.ones(1000))), s.numpy.empty(5000),
              s.send(torch.ones(3)).new_empty(50000)):
        v = e.get(timeout=10)
        assert not np.asarray(v).any()


def test_resize_as_never_shows_old_memory(spair):
    _, s = spair
    junk = (s.store["x"].repeat(5000) + 1000.0)
    del junk
    s.ping()
    mine = s.send(torch.zeros(1))
    mine.resize_as_(s.send(torch.zeros(50000)))
    assert not mine.get(timeout=10).any()


# -- randomness: a shared stream would carry private facts into public numbers ---------------------
def _public_random_after(secret: torch.Tensor, tmp_path, op: str) -> torch.Tensor:
    owner, s = duet.local_pair(audit_log=tmp_path / f"{op}-{float(secret.sum())}.jsonl")
    try:
        owner.store.add(secret, name="x")
        s.torch.manual_seed(7)
        x = s.store["x"]
        if op == "poisson":
            s.torch.poisson(x)
        elif op == "randint":
            s.torch.randint(0, (x.max() + 2).long().item(), (3,))
        elif op == "numpy_randint":
            s.numpy.random.randint(0, (x.max() + 2).long().item())
        return s.torch.rand(4).get(timeout=10)
    finally:
        s.close()
        owner.close()


@pytest.mark.parametrize("op", ["poisson", "randint", "numpy_randint"])
def test_random_numbers_after_private_sampling_do_not_depend_on_private_data(tmp_path, op):
    a = _public_random_after(torch.tensor([1.0, 2.0]), tmp_path, op)
    b = _public_random_after(torch.tensor([90.0, 2.0**40]), tmp_path, op)
    assert torch.equal(a, b)


# -- the same attacks, as data, for the run between two processes over WebRTC -------------------
def _attack_batch_norm(s):
    rm, rv = s.send(torch.zeros(2)), s.send(torch.ones(2))
    s.torch.nn.functional.batch_norm(s.store["x"].view(5, 2), rm, rv, training=True)
    return rm


def _attack_sizes(s):
    return s.torch.zeros([0] + s.store["x"][6:10].long().tolist())


def _attack_backward_keyword(s):
    w = s.send(torch.ones(10)).requires_grad_()
    s.torch.autograd.backward(tensors=[(w * s.store["x"]).sum()])
    return w.grad


def _attack_model_writes_input(s):
    dst = s.send(torch.zeros(10))
    s.send(CopyInto())(s.store["x"], dst)
    return dst


def _attack_load_assign(s):
    model = s.torch.nn.Linear(10, 1)
    w, b = s.send(torch.zeros(1, 10)), s.send(torch.zeros(1))
    model.load_state_dict({"weight": w, "bias": b}, assign=True)
    opt = s.torch.optim.SGD(model.parameters(), lr=0.1)
    model(s.store["x"].view(1, 10)).sum().backward()
    opt.step()
    return w


def _attack_numpy_in_place(s):
    mine = s.send(np.zeros(10, dtype=np.float32))
    mine[0] = s.store["xn"][4]
    return mine


# name -> (attack, what must hold: "value" needs approval, "shape" is hidden too)
ATTACKS = {
    "batch_norm running stats": (_attack_batch_norm, "value"),
    "sizes from private values": (_attack_sizes, "shape"),
    "backward(tensors=...)": (_attack_backward_keyword, "value"),
    "sent model writes its input": (_attack_model_writes_input, "value"),
    "load_state_dict(assign=True)": (_attack_load_assign, "value"),
    "numpy in-place write": (_attack_numpy_in_place, "value"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_table_holds_locally(spair, name):
    _, s = spair
    attack, what = ATTACKS[name]
    ptr = attack(s)
    assert ptr.private and needs_approval(ptr)
    if what == "shape":
        assert shape_hidden(ptr)


def test_operations_never_name_a_private_type(spair):
    """Picked by a private index, a value is a tensor in one run and an array in another: labels must not tell."""
    owner, s = spair
    choices = s.send([torch.zeros(2), np.zeros(2), 3])
    picked = choices[(s.store["x"].sum() > 100).long().item()]
    total = picked.mean()
    assert total.meta()["ops"] is None  # a history whose shape depends on the private type is the owner's to see
    total.request("the mean")
    ops = owner.requests.wait_pending(10).ops
    assert "(private type).mean" in ops and not any(op in ops for op in ("Tensor.mean", "ndarray.mean"))
    refused = choices[(s.store["x"].sum() > 100).long().item() * 2].abs()  # the int has no abs method
    with pytest.raises(duet.NotAllowed) as info:
        refused.get(timeout=10)
    assert "int" not in str(info.value) and "private" in str(info.value)
