"""Training over Duet: models as graphs, plans, remote loaders (the MNIST issue)."""
from __future__ import annotations

import copy
import gc
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import duet
from duet import wire
from duet.datasets import MNIST

N_TRAIN = 512


class Net(nn.Module):
    """The classic MNIST CNN of the PySyft chapter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2, 2)
        x = x.view(-1, 4 * 4 * 50)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


@duet.plan
def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = F.nll_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss


@pytest.fixture(scope="module")
def mnist_small():
    return MNIST(train=True, limit=N_TRAIN)


@pytest.fixture
def mpair(tmp_path, mnist_small):
    owner, scientist = duet.local_pair(audit_log=tmp_path / "audit.jsonl")
    owner.store.add(mnist_small, name="mnist-train", description="first 512 MNIST training images")
    yield owner, scientist
    scientist.close()
    owner.close()
    gc.collect()


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def test_mnist_dataset_reads_and_normalises(mnist_small, tmp_path, monkeypatch):
    x, y = mnist_small.tensors
    assert x.shape == (N_TRAIN, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (N_TRAIN,) and y.dtype == torch.int64 and int(y.max()) <= 9
    assert abs(float(x.min()) - (0 - 0.1307) / 0.3081) < 1e-5
    # the torchvision layout <root>/MNIST/raw/ and DUET_MNIST_DIR are found too
    src = Path(mnist_small.root)
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        os.symlink(src / name, raw / name)
    test = MNIST(root=tmp_path / "tv", train=False)
    assert len(test) == 10000
    monkeypatch.setenv("DUET_MNIST_DIR", str(tmp_path / "tv"))
    assert len(MNIST(train=False, limit=10)) == 10
    with pytest.raises(FileNotFoundError, match="no download"):
        MNIST(root=tmp_path / "nowhere")


def test_model_round_trip(mpair):
    _, scientist = mpair
    torch.manual_seed(1)
    net = Net()
    remote = scientist.send(net)
    assert isinstance(remote, duet.Pointer)
    back = remote.get(reason="mine", timeout=10)  # the scientist's own model: no approval
    assert type(back) is Net and back is not net
    assert _max_diff(back, net) == 0.0
    # the remote model computes what the local one does
    x = torch.randn(3, 1, 28, 28)
    out = remote(scientist.send(x)).get(timeout=10)
    assert torch.allclose(out, net(x), atol=1e-6)


class Sneaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.fft.fft(self.fc(x))


class WithCustomLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.act(self.fc(x)) + self.fc.weight.sum() * 2


def test_refuses_module_with_off_list_call(mpair):
    owner, scientist = mpair
    with pytest.raises(duet.NotAllowed, match=r"model uses torch\.fft\.fft, which is not on the allowlist"):
        scientist.send(Sneaky())
    # attribute reads of parameters and allowlisted leaves are fine
    m = WithCustomLeaf()
    x = torch.randn(5, 2)
    assert torch.allclose(scientist.send(m)(scientist.send(x)).get(timeout=10), m(x))


def _raw_model(scientist, graph):
    """Send a hand-made description, as a hostile scientist would (no client-side checks)."""
    rid = scientist._new_rid()
    scientist.session.send({"t": "model", "rid": rid, "graph": graph})
    return duet.Pointer(scientist, rid, "raw model")


def _linear_graph(**override):
    graph = {
        "format": "duet.fx/1",
        "modules": [{"cls": "torch.nn.Linear", "kwargs": {"in_features": 2, "out_features": 2, "bias": True}}],
        "attrs": [],
        "state": {"m0.weight": torch.zeros(2, 2), "m0.bias": torch.zeros(2)},
        "nodes": [
            ["placeholder", None, [], {}],
            ["call_module", 0, ({"$node": 0},), {}],
            ["call_function", "torch.nn.functional.relu", ({"$node": 1},), {}],
            ["output", None, [{"$node": 2}], {}],
        ],
    }
    graph.update(override)
    return graph


def test_owner_validates_graphs_itself(mpair):
    _, scientist = mpair
    ok = _raw_model(scientist, _linear_graph())
    assert torch.equal(ok(scientist.send(torch.ones(1, 2))).get(timeout=10), torch.zeros(1, 2))
    cases = {
        "torch.save": _linear_graph(nodes=[
            ["placeholder", None, [], {}],
            ["call_function", "torch.save", ({"$node": 0}, "/tmp/x"), {}],
            ["output", None, [{"$node": 1}], {}],
        ]),
        "os.system": _linear_graph(nodes=[
            ["placeholder", None, [], {}],
            ["call_function", "os.system", ("true",), {}],
            ["output", None, [{"$node": 1}], {}],
        ]),
        "torch.zeros": _linear_graph(nodes=[  # factories: sizes would go unchecked
            ["placeholder", None, [], {}],
            ["call_function", "torch.zeros", (10**12,), {}],
            ["output", None, [{"$node": 1}], {}],
        ]),
        "Tensor.__reduce_ex__": _linear_graph(nodes=[
            ["placeholder", None, [], {}],
            ["call_method", "__reduce_ex__", ({"$node": 0}, 2), {}],
            ["output", None, [{"$node": 1}], {}],
        ]),
        "builtins.getattr": _linear_graph(nodes=[
            ["placeholder", None, [], {}],
            ["call_function", "builtins.getattr", ({"$node": 0}, "__class__"), {}],
            ["output", None, [{"$node": 1}], {}],
        ]),
        "torch.nn.Module": _linear_graph(modules=[{"cls": "torch.nn.Module", "kwargs": {}}]),
        "subprocess.Popen": _linear_graph(modules=[{"cls": "subprocess.Popen", "kwargs": {}}]),
        "identifier": _linear_graph(nodes=[
            ["placeholder", None, [], {}],
            ["call_function", "torch.nn.functional.relu", ({"$node": 0},), {"x=__import__('os')": 1}],
            ["output", None, [{"$node": 1}], {}],
        ]),
        "wrong shape": _linear_graph(state={"m0.weight": torch.zeros(3, 3), "m0.bias": torch.zeros(2)}),
        "do not match": _linear_graph(state={"m0.weight": torch.zeros(2, 2)}),
        "does not come before": _linear_graph(nodes=[
            ["placeholder", None, [], {}],
            ["call_function", "torch.nn.functional.relu", ({"$node": 2},), {}],
            ["output", None, [{"$node": 1}], {}],
        ]),
        "huge": _linear_graph(
            modules=[{"cls": "torch.nn.Linear", "kwargs": {"in_features": 10**6, "out_features": 10**6}}]
        ),
    }
    for needle, graph in cases.items():
        ptr = _raw_model(scientist, graph)
        with pytest.raises(duet.DuetError) as info:
            ptr.get(timeout=10)
        if needle != "huge":
            assert needle in str(info.value), (needle, str(info.value))


def _local_epoch(model, ds, batch_size=64):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    x_all, y_all = ds.tensors
    losses = []
    for i in range(0, len(ds), batch_size):
        losses.append(train_step(model, opt, x_all[i:i + batch_size], y_all[i:i + batch_size]).item())
    return losses


def test_training_over_duet_matches_local(mpair, mnist_small):
    owner, scientist = mpair
    torch.manual_seed(0)
    initial = Net()
    remote = scientist.send(initial)
    opt = scientist.torch.optim.SGD(remote.parameters(), lr=0.01, momentum=0.5)
    loader = scientist.loader("mnist-train", batch_size=64, shuffle=False, progress=False)
    assert len(loader) == N_TRAIN // 64
    for epoch in range(2):
        for x, y in loader:
            loss = train_step(remote, opt, x, y)
    assert loss.meta()["private"] and loss.meta()["assets"] == ["mnist-train"]
    handle = remote.request(reason="trained weights")
    req = owner.requests.wait_pending(10)
    assert req.kind == "release" and req.lineage == ("mnist-train",)
    req.accept()
    trained = handle.wait(30)
    assert type(trained) is Net

    local = copy.deepcopy(initial)
    opt_local = torch.optim.SGD(local.parameters(), lr=0.01, momentum=0.5)
    x_all, y_all = mnist_small.tensors
    for epoch in range(2):
        for i in range(0, N_TRAIN, 64):
            train_step(local, opt_local, x_all[i:i + 64], y_all[i:i + 64])
    assert _max_diff(trained, local) <= 1e-5
    assert _max_diff(trained, initial) > 1e-3  # it did train


def test_plan_replay_equals_op_by_op(mpair, mnist_small):
    owner, scientist = mpair
    owner.requests.add_handler(action="accept", datasets=["mnist-train"], max_elements=1)  # scalar losses
    torch.manual_seed(3)
    net = Net()
    results = {}
    for mode in ("plan", "ops"):
        remote = scientist.send(net)
        opt = scientist.torch.optim.SGD(remote.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for x, y in scientist.loader("mnist-train", batch_size=128, shuffle=False, progress=False):
            if mode == "plan":
                loss = train_step(remote, opt, x, y)
            else:
                loss = train_step.fn(remote, opt, x, y)  # the same code, one message per action
            losses.append(loss.get(reason="loss", timeout=10))
        results[mode] = (losses, remote)
    assert all(torch.equal(a, b) for a, b in zip(results["plan"][0], results["ops"][0]))
    for mode in results:
        h = results[mode][1].request("weights")
        owner.requests.wait_pending(10).accept()
        results[mode] = h.wait(10)
    assert _max_diff(results["plan"], results["ops"]) == 0.0
    assert train_step.actions(scientist) == [".zero_grad", "forward", "torch.nn.functional.nll_loss", ".backward", ".step"]


def test_plan_errors_and_constants(mpair):
    _, scientist = mpair

    @duet.plan
    def scale(x, factor):
        return x * factor, x.sum()

    x = scientist.send(torch.tensor([1.0, 2.0]))
    a, s = scale(x, 3.0)
    assert torch.equal(a.get(timeout=10), torch.tensor([3.0, 6.0]))
    assert torch.equal(s.get(timeout=10), torch.tensor(3.0))
    b, _ = scale(x, 0.5)  # another constant: recorded again
    assert torch.equal(b.get(timeout=10), torch.tensor([0.5, 1.0]))
    assert torch.equal(scale(torch.tensor([1.0]), 2.0)[0], torch.tensor([2.0]))  # no pointers: runs locally

    @duet.plan
    def bad(x):
        return torch.fft.fft(x)

    with pytest.raises(duet.NotAllowed, match="allowlist"):
        bad(x)

    @duet.plan
    def fails(x):
        return x.view(3, 7)  # a shape error on the owner

    with pytest.raises(duet.RemoteError, match="view"):
        fails(x).get(timeout=10)
    # a hostile plan definition naming an off-list function is refused action by action
    pid = scientist._new_rid()
    scientist.session.send({"t": "plan_def", "pid": pid, "inputs": 1, "outputs": [1], "actions": [
        {"rid": 1, "kind": "func", "name": "builtins.eval", "args": [wire.Ref(0)], "kwargs": {}}]})
    out = scientist._new_rid()
    scientist.session.send({"t": "plan_run", "pid": pid, "args": [wire.Ref(x._rid)], "out": [out]})
    with pytest.raises(duet.NotAllowed, match="builtins.eval"):
        duet.Pointer(scientist, out, "hostile").get(timeout=10)


def test_loader_covers_every_sample_once_per_epoch(mpair):
    owner, scientist = mpair
    n = 203
    owner.store.add(torch.utils.data.TensorDataset(torch.arange(n), torch.arange(n) * 2), name="ids")
    owner.requests.add_handler(action="accept", datasets=["ids"])
    loader = scientist.loader("ids", batch_size=16, shuffle=True, seed=7, progress=False)
    assert len(loader) == 13
    orders = []
    for epoch in range(2):
        seen = []
        for a, b in loader:
            va, vb = a.get(timeout=10), b.get(timeout=10)
            assert torch.equal(vb, va * 2)
            seen.append(va)
        order = torch.cat(seen)
        assert sorted(order.tolist()) == list(range(n))
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # a new order each epoch
    dropped = scientist.loader("ids", batch_size=16, drop_last=True, progress=False)
    assert len(dropped) == 12 and sum(1 for _ in dropped) == 12
    with pytest.raises(duet.NotAllowed):
        scientist.loader("nope", batch_size=4)


def test_strict_mode_asks_once_per_plan(tmp_path, mnist_small):
    owner, scientist = duet.local_pair(approve="everything", audit_log=tmp_path / "a.jsonl")
    try:
        owner.store.add(mnist_small, name="mnist-train")
        remote = scientist.send(Net())
        # in strict mode every single action is a compute request; approve the two setup ones by rule
        opt = scientist.torch.optim.SGD(remote.parameters(), lr=0.01)
        for _ in range(2):
            owner.requests.wait_pending(10, kind="compute").accept()
        loader = scientist.loader("mnist-train", batch_size=64, progress=False)
        it = iter(loader)
        x, y = next(it)
        loss = train_step(remote, opt, x, y)
        req = owner.requests.wait_pending(10, kind="compute")
        assert req.lineage == ("mnist-train",) and "torch.nn.functional.nll_loss" in req.ops
        assert req.type_name.startswith("plan train_step")
        req.accept()
        for _ in range(3):
            x, y = next(it)
            loss = train_step(remote, opt, x, y)
        scientist.ping()
        assert owner.requests.pending == []
        assert loss.meta()["private"]
    finally:
        scientist.close()
        owner.close()


def test_loss_tracking_through_the_queue(mpair):
    owner, scientist = mpair
    owner.requests.add_handler(action="accept", datasets=["mnist-train"], max_elements=1)
    remote = scientist.send(Net())
    opt = scientist.torch.optim.SGD(remote.parameters(), lr=0.01)
    loader = scientist.loader("mnist-train", batch_size=64, progress=True)
    loader.track_every = 2
    for x, y in loader:
        loss = train_step(remote, opt, x, y)
        loader.track(loss)
    assert loader.last_loss is not None and 0 < loader.last_loss < 5
    with pytest.raises(duet.RequestTimeout):
        remote.get(reason="weights are not scalars", timeout=0.3)  # still needs the owner


def test_training_over_webrtc(mnist_small):
    owner = duet.launch(name="o", local_only=True, display=False)
    scientist = None
    try:
        owner.store.add(mnist_small, name="mnist-train")
        scientist = duet.join(owner.code, name="s", local_only=True)
        torch.manual_seed(5)
        net = Net()
        remote = scientist.send(net)
        opt = scientist.torch.optim.SGD(remote.parameters(), lr=0.01, momentum=0.5)
        loader = scientist.loader("mnist-train", batch_size=64, shuffle=False, progress=False)
        for x, y in loader:
            train_step(remote, opt, x, y)
        h = remote.request("weights")
        owner.requests.wait_pending(20).accept()
        trained = h.wait(60)
        local = copy.deepcopy(net)
        opt_local = torch.optim.SGD(local.parameters(), lr=0.01, momentum=0.5)
        x_all, y_all = mnist_small.tensors
        for i in range(0, N_TRAIN, 64):
            train_step(local, opt_local, x_all[i:i + 64], y_all[i:i + 64])
        assert _max_diff(trained, local) <= 1e-5
    finally:
        if scientist is not None:
            scientist.close()
        owner.close()
