"""Attacks found by a hostile review of lineage from effects, each as a differential test.

Each program runs against two owners whose private `x` differs (same shape and
dtype); nothing is approved. Everything the scientist observes (metadata
replies, values of public objects, error types and messages) must be the same.
Before the fixes each of these told the two owners apart; see SECURITY.md.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import numpy as np
import pytest
import torch

import duet
from duet.scientist.pointer import Pointer
from duet.wire import Ref

T = 10
A = torch.tensor([10.0, 20, 1, 99.1234, 5, 1, 1, 1])
B = torch.tensor([99.0, 60, 70, 77.5678, 80, 1, 1, 1])


def observe(value: Any) -> Any:
    """What a scientist sees of a value without approval."""
    if isinstance(value, Pointer):
        try:
            meta = value.meta(timeout=T)
        except duet.DuetError as exc:
            return ("error", type(exc).__name__, str(exc))
        if meta["private"]:
            return ("private", meta)
        got = value.get(timeout=T)
        return ("public", meta, repr(got))
    if isinstance(value, (list, tuple)):
        return [observe(v) for v in value]
    if isinstance(value, dict):
        return {k: observe(v) for k, v in value.items()}
    return value


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        return observe(fn())
    except duet.DuetError as exc:
        return ("raised", type(exc).__name__, str(exc))


def differential(prog: Callable[[duet.Scientist], Dict[str, Any]], tmp_path, extra: Dict[str, Any] = None) -> None:
    seen = []
    for i, x in enumerate((A, B)):
        owner, s = duet.local_pair(audit_log=tmp_path / f"{i}.jsonl")
        try:
            owner.store.add(x.clone(), name="x")
            for name, values in (extra or {}).items():
                owner.store.add(values[i], name=name)
            s.torch.manual_seed(0)
            seen.append({k: outcome(v) for k, v in prog(s).items()})
        finally:
            s.close()
            owner.close()
    for key in seen[0]:
        assert seen[0][key] == seen[1][key], f"{key} tells the owners apart:\n  {seen[0][key]}\n  {seen[1][key]}"


def test_empty_storage_that_grows_and_is_shared(tmp_path):
    def prog(s):
        x = s.store["x"]
        lst = s.send([torch.zeros(0)])
        e = lst[0]
        e.resize_as_(s.torch.zeros(8))
        e.copy_(x)
        return {"list": lambda: lst}
    differential(prog, tmp_path)


def test_numpy_writes_into_a_tensor_it_was_given(tmp_path):
    def prog(s):
        q = s.send(np.zeros(1))
        q[:] = s.store["x"][3:4]
        pub = s.send(torch.arange(999.0, -1.0, -1.0, dtype=torch.float64))
        r = s.numpy.percentile(pub, q, overwrite_input=True, method="lower")
        return {"result": lambda: r, "tensor": lambda: pub}
    differential(prog, tmp_path)


def test_failure_part_way_through_a_module(tmp_path):
    def prog(s):
        nn = s.torch.nn
        bn = nn.BatchNorm1d(4)
        seq = nn.Sequential(nn.Embedding(50, 4), bn, nn.Linear(5, 1))  # fails in the embedding iff x >= 50
        out = seq(s.store["x"].long())
        return {"forward": lambda: out, "batch norm": lambda: bn}
    differential(prog, tmp_path)


def test_refusal_messages_do_not_embed_private_dtypes(tmp_path):
    def prog(s):
        i = s.store["x"][0].long().clamp(0, 99).item()
        words = s.send(["a" * (k + 1) for k in range(100)])
        return {"array": lambda: s.numpy.array(words[i])}
    differential(prog, tmp_path)


class Records(torch.utils.data.Dataset):
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return torch.ones(self.lengths[i])


def test_loader_batches_of_a_dataset_with_private_shapes(tmp_path):
    def prog(s):
        batches = [b for _, b in zip(range(4), s.loader("recs", batch_size=1, progress=False))]
        return {f"batch {i}": (lambda b=b: b) for i, b in enumerate(batches)}
    differential(prog, tmp_path, extra={"recs": (Records([3, 9, 1, 4]), Records([5, 2, 7, 6]))})


def test_setitem_of_a_small_private_int(tmp_path):
    def prog(s):
        lst = s.send([0, 0, 0])
        lst[0] = (s.store["x"][0] > 50).long().item()  # 0 or 1: CPython shares both objects
        return {"list": lambda: lst}
    differential(prog, tmp_path)


def test_the_same_object_reached_through_two_pointers(tmp_path):
    def prog(s):
        x = s.store["x"]
        lst = s.send([torch.zeros(1)])
        p = lst[0]
        p.resize_as_(x[x > 50])  # a private shape, written into the object the list holds
        return {"again": lambda: lst[0], "p": lambda: p}
    differential(prog, tmp_path)


def test_a_model_graph_choosing_what_to_write_from_tolist(tmp_path):
    def prog(s):
        x = s.store["x"]
        bufs = [s.send(torch.ones(1)) for _ in range(4)]
        node = lambda j: {"$node": j}  # noqa: E731
        nodes = [["placeholder", None, [], {}] for _ in range(5)]
        nodes += [
            ["call_function", "operator.getitem", [node(0), 0], {}],
            ["call_method", "long", [node(5)], {}],
            ["call_method", "clamp", [node(6), 0, 3], {}],
            ["call_method", "tolist", [node(7)], {}],
            ["call_function", "operator.getitem", [[node(i) for i in range(1, 5)], node(8)], {}],
            ["call_method", "zero_", [node(9)], {}],
            ["output", None, [None], {}],
        ]
        rid = s._new_rid()
        s._send_with_frees({"t": "model", "rid": rid, "graph": {"format": "duet.fx/1", "modules": [], "attrs": [],
                                                              "state": {}, "nodes": nodes, "training": True}})
        out = Pointer(s, rid, "model")(x, *bufs)
        return {"out": lambda: out, **{f"buf {i}": (lambda b=b: b) for i, b in enumerate(bufs)}}
    differential(prog, tmp_path)


@duet.plan
def _probe(x, w, torch_ns):
    torch_ns.index_select(w, 0, x[0:1].long())  # fails iff x[0] >= 50
    torch_ns.index_select(w, 0, (x[1:2] * 2).long())  # fails iff x[1] >= 25
    return torch_ns.nn.functional.embedding(x[0:1].long() * 0 + 1000, w)  # always fails


def test_a_plan_failing_part_way(tmp_path):
    def prog(s):
        w = s.send(torch.zeros(50, 1))
        out = _probe(s.store["x"], w, s.torch)
        return {"plan": lambda: out, "weights": lambda: w, "later random": lambda: s.torch.rand(2)}
    differential(prog, tmp_path)


@pytest.mark.parametrize("flag", ["train", "requires_grad_"])
def test_module_state_set_from_a_private_bool(tmp_path, flag):
    def prog(s):
        bit = (s.store["x"][0] > 50).item()
        child = s.torch.nn.Linear(2, 2)
        parent = s.torch.nn.Sequential(child)
        getattr(parent, flag)(bit)
        return {"training": lambda: child.training, "weight": lambda: child.weight}
    differential(prog, tmp_path)


def test_refusals_read_the_same_whichever_check_refused(tmp_path):
    """Found by the long fuzzer run: "a" is also a dtype name, so a private pick refused by the dtype
    check in one run and by the result check in the other; the two wordings told the runs apart."""
    def prog(s):
        words = s.send(["a", "aaaaa"])
        picked = words[(s.store["x"][0] > 50).long().item()]
        return {"array": lambda: s.numpy.array(picked), "zeros": lambda: s.numpy.zeros(2, dtype=picked)}
    differential(prog, tmp_path)


def test_resize_of_a_tensor_shared_with_numpy_never_reads_beyond_its_memory(tmp_path):
    """Found by the long fuzzer run: torch resized the sizes and then failed to grow the storage
    (shared with numpy), leaving a tensor larger than its memory; reading it showed stale heap bytes."""
    def prog(s):
        small = s.torch.randn(2, 2).min()
        s.numpy.clip(small, small, small)  # numpy views the tensor's memory, which stops it growing
        small.resize_as_(s.torch.zeros(64, 64))
        return {"small": lambda: small}
    differential(prog, tmp_path)


def test_a_skipped_pointer_whose_twin_knows_less(tmp_path):
    """Found by the second review: an action whose receiver already carried every asset it read was
    not watched, yet another pointer to the same object (with public metadata) saw the change."""
    def prog(s):
        x = s.store["x"]
        lst = s.send([torch.zeros(1)])
        twin = lst[0]
        same = lst[(x[0] * 0).long().item()]  # the same tensor, picked by a private index (always 0)
        same.resize_as_(x[x > 50])  # a private length
        return {"twin": lambda: twin, "list": lambda: lst}
    differential(prog, tmp_path)


def _call_into(s: duet.Scientist, rid: int, kind: str, name: str, args: list, kwargs: dict) -> None:
    """A call whose result a hostile scientist stores under an id it already uses."""
    s._send_with_frees({"t": "call", "rid": rid, "kind": kind, "name": name,
                        "args": s._encode_args(args), "kwargs": s._encode_args(kwargs)})


def test_a_result_stored_under_the_id_of_what_it_aliases(tmp_path):
    """Found by the second review: the old object was freed before its alias group was looked up,
    so a view stored under its base's id started a fresh, public group."""
    def prog(s):
        base = s.torch.zeros(8)
        view = base.view(8)
        _call_into(s, base._rid, "method", "view", [base, 8], {})
        view.copy_(s.store["x"])
        return {"base": lambda: base}
    differential(prog, tmp_path)


@duet.plan
def _view_of(t):
    return t.view(8)


def test_a_plan_output_stored_under_the_id_of_its_input(tmp_path):
    def prog(s):
        base = s.torch.zeros(8)
        view = base.view(8)
        _view_of(base)  # records the plan in this session
        rec = _view_of._recorded[s][0]
        s.session.send({"t": "plan_run", "pid": rec.pid, "args": [Ref(base._rid)], "out": [base._rid]})
        view.copy_(s.store["x"])
        return {"base": lambda: base}
    differential(prog, tmp_path)


def test_operations_of_an_object_whose_type_is_private(tmp_path):
    """Found by the long fuzzer run: a tensor joins its inputs' alias group, a numpy scalar does not,
    so how often an operation was counted in an object's history told which one a private index picked."""
    def prog(s):
        x = s.store["x"]
        picked = s.send([torch.zeros(2), np.zeros(2)])[(x[0] > 50).long().item()].sum()
        twice = (picked + 0) + (picked + 0)
        return {"twice": lambda: twice, "picked": lambda: picked}
    differential(prog, tmp_path)


def test_alias_groups_do_not_depend_on_a_private_type(tmp_path):
    """Found by the long fuzzer run: a result was tied to the inputs that had memory, and whether the
    value a private index picked had any (a tensor or a Python int) decided which groups merged."""
    def prog(s):
        x = s.store["x"]
        choices = s.send([torch.zeros(2), 3])
        other = s.store["ids"].float()[:2]
        picked = choices[(x[0] > 50).long().item()]
        total = picked + other
        return {"choices": lambda: choices, "total": lambda: total, "other": lambda: other,
                "later": lambda: other + 1}
    differential(prog, tmp_path, extra={"ids": (torch.arange(4), torch.arange(4))})


# -- found by the fourth review ------------------------------------------------------------


def test_a_gradient_holder_reached_only_through_a_list(tmp_path):
    """requires_grad was set through a pointer freed before backward; the list's stored footprint
    still said "no gradient", so the gradient it received was not watched."""
    def prog(s):
        lst = s.send([torch.zeros(8)])
        e = lst[0]
        e.requires_grad_()
        y = (e * s.store["x"]).sum()
        del e
        y.backward()
        return {"grad": lambda: lst[0].grad, "list": lambda: lst}
    differential(prog, tmp_path)


def test_a_numpy_write_makes_saved_tensors_stale(tmp_path):
    """numpy wrote private values into memory autograd had saved; without a version bump, backward
    used them and the gradient stayed public."""
    def prog(s):
        p = s.send(torch.zeros(8, requires_grad=True))
        q = s.send(torch.ones(8))
        y = (p * q).sum()
        a = q.numpy()
        a[:] = s.store["x"]
        y.backward()
        return {"grad": lambda: p.grad, "q": lambda: q}
    differential(prog, tmp_path)


@pytest.mark.parametrize("call", ["requires_grad_", "transpose_"])
def test_a_private_python_argument_that_changes_nothing(tmp_path, call):
    """A private bool or int that changes only metadata (or nothing) must taint like one that does:
    whether the metadata came out private told the private bit."""
    def prog(s):
        if call == "requires_grad_":
            bit = (s.store["x"][0] > 50).item()
            t = s.torch.zeros(1)
            t.requires_grad_(bit)
        else:
            t = s.torch.zeros(0, 3)
            t.transpose_(0, (s.store["x"][0] > 50).long().item())
        return {"t": lambda: t}
    differential(prog, tmp_path)


def test_every_failure_on_private_inputs_reads_the_same(tmp_path):
    """A size guard refused in one run (LimitExceeded) where torch failed in the other (RemoteError)."""
    def prog(s):
        out = s.torch.bincount((s.store["x"][:1] - 50).long() * 10**8)
        return {"bincount": lambda: out}
    differential(prog, tmp_path)
