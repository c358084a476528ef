"""DP-SGD on the owner (Opacus): a trained copy that leaves without approval, charged up front, and
the ways a scientist could try to carry data around the noise, refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import duet
from duet.datasets import MNIST
from duet.errors import BudgetExceeded


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 5, 2)
        self.fc = nn.Linear(8 * 12 * 12, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


class WithBatchNorm(SmallNet):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


class Smuggler(SmallNet):
    """Writes the mean pixel of each batch into a buffer: data carried around the noise (vmap refuses the
    in-place write into an unbatched buffer, on the public batch of zeros already)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x):
        self.seen.add_(x.mean())
        return super().forward(x)


class Mixer(nn.Module):
    """Every example sees the batch's maximum: with per-layer per-example gradients, one person's
    value would reach every example's gradient, around the clipping."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 2)

    def forward(self, x):
        h = x.amax(0, keepdim=True) + x * 0
        return F.log_softmax(self.fc(h), dim=1)


def test_a_model_that_mixes_its_batch_cannot_move_other_examples_gradients(tmp_path):
    """One example's value is 1 and the rest 0; the model feeds the batch maximum to every example.
    Each example's gradient is computed on its own, so the trained weight moves by about one
    clipped gradient plus noise, not by a batch's worth: without noise (a huge epsilon is not
    allowed, so the noise is compared), the update is the same whether the batch mixes or not."""
    results = []
    for secret in (1.0, 0.0):
        owner, s = duet.local_pair(audit_log=tmp_path / f"audit-{secret}.jsonl")
        try:
            n = 1000
            x = torch.zeros(n, 1)
            x[0, 0] = secret
            owner.store.add(torch.utils.data.TensorDataset(x, torch.zeros(n, dtype=torch.long)), name="d",
                            privacy_unit="item")
            owner.privacy.budget(epsilon=1.0, delta=1e-5)
            local = Mixer()
            nn.init.zeros_(local.fc.weight)
            nn.init.zeros_(local.fc.bias)
            remote = s.send(local)
            opt = s.torch.optim.SGD(remote.parameters(), lr=1.0)
            trained = s.dp.train(remote, opt, "d", epochs=1, batch_size=500, target_epsilon=1.0, max_grad_norm=1.0,
                                 progress=False)
            results.append(trained.get(timeout=30).fc.weight.detach()[:, 0].abs().max().item())
        finally:
            s.close()
            owner.close()
    # One example's clipped gradient (at most 1) over the expected batch (500), two steps: <= 0.004;
    # the noise std is sigma * 1 / 500 per step (sigma about 5 here): about 0.015. A mixing leak moved it by ~0.5.
    assert max(results) < 0.1, results


@pytest.fixture(scope="module")
def mnist():
    return MNIST(train=True, limit=4096), MNIST(train=False, limit=2000)


@pytest.fixture
def dp_pair(tmp_path, mnist):
    owner, scientist = duet.local_pair(audit_log=tmp_path / "audit.jsonl")
    owner.store.add(mnist[0], name="mnist-train", privacy_unit="item")
    owner.store.add(MNIST(train=True, limit=256), name="mnist-undeclared")
    owner.privacy.budget(epsilon=4.0, delta=1e-5)
    yield owner, scientist
    scientist.close()
    owner.close()


def _accuracy(model: nn.Module, test: MNIST) -> float:
    with torch.no_grad():
        return float((model(test.data).argmax(1) == test.targets).float().mean())


def test_a_dp_trained_copy_learns_and_leaves_without_approval(dp_pair, mnist):
    owner, s = dp_pair
    torch.manual_seed(0)
    local = SmallNet()
    initial = {k: v.clone() for k, v in local.state_dict().items()}
    remote = s.send(local)
    opt = s.torch.optim.SGD(remote.parameters(), lr=1.0)
    trained = s.dp.train(remote, opt, "mnist-train", epochs=3, batch_size=256, target_epsilon=2.0, max_grad_norm=1.0,
                         progress=False)
    info = s.dp.last_training
    assert info["epsilon"] <= 2.0 and info["delta"] == 1e-5 and info["sampling_rate"] == 256 / 4096
    assert info["steps"] == 3 * 16 and info["noise_multiplier"] > 0.5
    assert s.privacy.spent == pytest.approx(info["epsilon"], rel=1e-6)
    net = trained.get(timeout=30)  # a DP release: no request waits in the owner's queue
    assert isinstance(net, SmallNet) and not owner.requests.pending
    accuracy = _accuracy(net, mnist[1])
    assert accuracy > 0.5, accuracy  # chance is 0.1
    # The scientist's own model and optimizer were not touched.
    again = remote.get(timeout=30)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in initial.items())
    assert not remote.private and not opt.private
    events = [e for e in owner.audit.read() if e["event"] == "dp_training"]
    assert events and events[0]["asset"] == "mnist-train"


def test_training_over_budget_is_refused_before_it_starts(dp_pair):
    owner, s = dp_pair
    remote = s.send(SmallNet())
    opt = s.torch.optim.SGD(remote.parameters(), lr=0.5)
    with pytest.raises(BudgetExceeded, match="over your budget"):
        s.dp.train(remote, opt, "mnist-train", epochs=50, batch_size=256, noise_multiplier=0.6, progress=False)
    assert s.privacy.spent == 0.0


@pytest.mark.parametrize("model, dataset, match", [
    (WithBatchNorm, "mnist-train", "cannot be trained with DP-SGD"),
    (Smuggler, "mnist-train", "fails on a batch of zeros|writes into its own weights or buffers"),
    (SmallNet, "mnist-undeclared", 'privacy_unit="item"'),
])
def test_what_would_carry_data_around_the_noise_is_refused(dp_pair, model, dataset, match):
    _owner, s = dp_pair
    remote = s.send(model())
    opt = s.torch.optim.SGD(remote.parameters(), lr=0.5)
    with pytest.raises(duet.NotAllowed, match=match):
        s.dp.train(remote, opt, dataset, epochs=1, batch_size=256, noise_multiplier=1.0, progress=False)
    assert s.privacy.spent == 0.0  # refused before anything was charged or read


def test_training_starts_from_weights_the_scientist_owns(dp_pair):
    _owner, s = dp_pair
    remote = s.send(SmallNet())
    opt = s.torch.optim.SGD(remote.parameters(), lr=0.1)
    loader = s.loader("mnist-train", batch_size=64, progress=False)
    xb, yb = next(iter(loader))
    opt.zero_grad()
    s.torch.nn.functional.nll_loss(remote(xb), yb).backward()
    opt.step()  # now the weights derive from private data, without noise
    with pytest.raises(duet.NotAllowed, match="already derive from private data"):
        s.dp.train(remote, opt, "mnist-train", epochs=1, batch_size=256, noise_multiplier=1.0, progress=False)


def test_approximate_dp_needs_a_budget_with_delta(tmp_path, mnist):
    owner, s = duet.local_pair(audit_log=tmp_path / "audit.jsonl")
    try:
        owner.store.add(mnist[0], name="mnist-train", privacy_unit="item")
        owner.privacy.budget(epsilon=4.0)
        remote = s.send(SmallNet())
        opt = s.torch.optim.SGD(remote.parameters(), lr=0.5)
        with pytest.raises(duet.NotAllowed, match="delta"):
            s.dp.train(remote, opt, "mnist-train", epochs=1, batch_size=256, noise_multiplier=1.0, progress=False)
    finally:
        s.close()
        owner.close()


class Lookup(nn.Module):
    """An embedding of each input value: an IndexError only if some value is at least `size`."""

    def __init__(self, size: int, wrong_width: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(size, 2)
        self.fc = nn.Linear(3 if wrong_width else 2, 2)

    def forward(self, x):
        return F.log_softmax(self.fc(self.emb(x.long().squeeze(1))), dim=1)


def test_failures_are_free_only_before_the_data_and_say_nothing_after(tmp_path):
    """A model's own errors show on a batch of zeros, with their reason, before any charge. A failure
    that depends on the data (here: an index out of range, so 'some value >= 50') is charged and
    reaches the scientist without its cause: failures are not a free oracle."""
    owner, s = duet.local_pair(audit_log=tmp_path / "audit.jsonl")
    try:
        x = torch.randint(18, 40, (200, 1)).float()
        x[7, 0] = 93.0
        owner.store.add(torch.utils.data.TensorDataset(x, torch.zeros(200, dtype=torch.long)), name="d",
                        privacy_unit="item")
        owner.privacy.budget(epsilon=3.0, delta=1e-5)

        def train(model: nn.Module) -> None:
            remote = s.send(model)
            opt = s.torch.optim.SGD(remote.parameters(), lr=0.1)
            s.dp.train(remote, opt, "d", epochs=1, batch_size=200, noise_multiplier=5.0, progress=False)

        with pytest.raises(duet.NotAllowed, match="fails on a batch of zeros.*RuntimeError"):
            train(Lookup(256, wrong_width=True))
        assert s.privacy.spent == 0.0
        with pytest.raises(duet.RemoteError, match="withheld") as caught:
            train(Lookup(50))
        assert caught.value.exc_type == "Error"  # not IndexError
        assert s.privacy.spent > 0.0
    finally:
        s.close()
        owner.close()
