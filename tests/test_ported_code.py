"""What Duet-era notebooks do, ported to this API: each defect they exposed and each pattern they need.

Every test here failed before its fix (the issue "Real notebooks run").
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.optim as optim

import duet
from duet.errors import NotAllowed

T = 10


# -- defect 2: recurrent layers whose constructors take *args ------------------------------
class Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "lstm":
            self.rnn = nn.LSTM(4, 6, num_layers=2, batch_first=True, dropout=0.0)
        elif kind == "gru":
            self.rnn = nn.GRU(4, 6, bidirectional=True)
        else:
            self.rnn = nn.RNN(4, 6, nonlinearity="relu", bias=False)
        self.fc = nn.Linear(12 if kind == "gru" else 6, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_recurrent_layers_build_and_train_like_local(pair, kind):
    _, scientist = pair
    torch.manual_seed(3)
    local = Recurrent(kind)
    remote = scientist.send(local)
    x, y = torch.randn(3, 5, 4), torch.randn(3, 1)
    assert torch.allclose(remote(scientist.send(x)).get(timeout=T), local(x), atol=1e-6)
    # one step of training: the layer's flat weights are the parameters the optimizer moves
    ropt = scientist.torch.optim.SGD(remote.parameters(), lr=0.1)
    loss = scientist.torch.nn.functional.mse_loss(remote(scientist.send(x)), scientist.send(y))
    loss.backward()
    ropt.step()
    lopt = optim.SGD(local.parameters(), lr=0.1)
    nn.functional.mse_loss(local(x), y).backward()
    lopt.step()
    back = remote.get(timeout=T)
    assert back.rnn.nonlinearity == local.rnn.nonlinearity if kind == "rnn" else True
    for (k, a), (_, b) in zip(back.state_dict().items(), local.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k


# -- defect 3: send(module) copies before it uploads ------------------------------------------
class KeepsTorch(nn.Module):
    """Older code kept a reference to the torch module (and so could not be deep-copied)."""

    def __init__(self) -> None:
        super().__init__()
        self.th = torch
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x)


class KeepsALock(KeepsTorch):
    def __init__(self) -> None:
        super().__init__()
        import threading

        self.lock = threading.Lock()


def test_a_module_that_keeps_the_torch_module_can_be_sent(pair):
    _, scientist = pair
    local = KeepsTorch()
    back = scientist.send(local).get(timeout=T)
    assert type(back) is KeepsTorch and back.th is torch
    assert torch.equal(back.fc.weight, local.fc.weight)


def test_a_module_that_cannot_be_copied_is_refused_before_upload(pair):
    owner, scientist = pair
    with pytest.raises(TypeError, match="cannot be copied"):
        scientist.send(KeepsALock())
    scientist.ping(timeout=T)
    assert len(owner.scientists[0].objects) == 0  # nothing was uploaded, so nothing is orphaned


# -- defect 6: a new reason after a timed-out get reaches the owner ---------------------------
def test_asking_again_with_a_reason_after_a_timeout_updates_the_pending_request(pair):
    owner, scientist = pair
    from tests.waiting import until

    m = scientist.store["ages"].mean()
    with pytest.raises(duet.RequestTimeout):
        m.get(timeout=0.2)  # no reason given the first time
    req = owner.requests.wait_pending(T)
    assert req.reason == ""
    handle = m.request(reason="average age for the cohort table")
    until(lambda: req.reason == "average age for the cohort table", T, "the new reason on the owner")
    assert len(owner.requests.pending) == 1 and handle.reason == req.reason  # still one request
    req.accept()
    assert torch.allclose(handle.wait(T), torch.tensor(39.25))
    assert [r.reason for r in owner.requests.history] == ["average age for the cohort table"]


# -- defect 7: a refused operation on a model pointer fails where it is written ---------------
def test_refused_operation_on_a_model_pointer_fails_at_the_call_site(pair):
    owner, scientist = pair
    model = scientist.send(nn.Linear(2, 2))
    with pytest.raises(NotAllowed, match=r"Module\.numpy is not on the owner's allowlist; a module has no values"):
        model.numpy()
    with pytest.raises(NotAllowed, match=r"Module\.sum is not on the owner's allowlist"):
        model.sum
    assert not hasattr(model, "tolist")  # refusals are attribute errors too (completion, hasattr)
    opt = scientist.torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NotAllowed, match=r"Optimizer\.add_param_group"):
        opt.add_param_group
    # the owner's own check still holds for a client that skips this one
    bad = scientist._call("method", "numpy", [model], {})
    with pytest.raises(NotAllowed, match=r"Linear\.numpy|Module\.numpy"):
        bad.get(timeout=T)
    assert scientist.store["ages"].numpy is not None  # a tensor's methods are still there


# -- device boilerplate ---------------------------------------------------------------------
def test_device_boilerplate_runs_on_the_owners_cpu(pair):
    owner, scientist = pair
    th = scientist.torch
    device = th.device("cuda" if th.cuda.is_available() else "cpu")
    assert device == torch.device("cpu") and th.cuda.device_count() == 0
    model = scientist.send(nn.Linear(4, 1)).to(device)
    x = scientist.send(torch.ones(2, 4)).to(device).cpu().to(torch.float64).to(device, torch.float32)
    z = th.zeros(2, 4, device=device) + x
    out = model.cpu()(z)
    assert out.get(timeout=T).shape == (2, 1)
    assert x.to("cpu").get(timeout=T).dtype == torch.float32
    with pytest.raises(NotAllowed, match="CPU only"):
        x.cuda()
    with pytest.raises(NotAllowed, match="CPU only"):
        model.cuda()
    with pytest.raises(NotAllowed, match="CPU only"):
        x.to("cuda:0")
    with pytest.raises(NotAllowed, match="CPU only"):
        th.zeros(2, device="cuda")
