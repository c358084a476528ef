"""What Duet-era notebooks do, ported to this API: each defect they exposed and each pattern they need.

Every test here failed before its fix (the issue "Real notebooks run").
"""
from __future__ import annotations

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
    if kind == "rnn":
        assert back.rnn.nonlinearity == local.rnn.nonlinearity == "relu"
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


# -- a VAE: tuple outputs, random ops in forward, a custom decode ----------------------------
class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.mu = nn.Linear(6, 2)
        self.logvar = nn.Linear(6, 2)
        self.fc3 = nn.Linear(2, 8)

    def encode(self, x):
        h = torch.relu(self.fc1(x))
        return self.mu(h), self.logvar(h)

    def reparameterize(self, mu, logvar):
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z):
        return torch.sigmoid(self.fc3(z))

    def forward(self, x):
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    def save_to(self, path):  # not traceable with a traced path: unavailable remotely, and says why
        with open(path, "wb") as f:
            torch.save(self.state_dict(), f)


def test_vae_outputs_unpack_and_custom_methods_run_remotely(pair):
    _, scientist = pair
    torch.manual_seed(0)
    local = VAE()
    vae = scientist.send(local)
    x = torch.rand(4, 8)
    recon, mu, logvar = vae(scientist.send(x))  # known from the graph: no round trip
    lmu, llogvar = local.encode(x)
    assert torch.allclose(mu.get(timeout=T), lmu, atol=1e-6)
    assert torch.allclose(logvar.get(timeout=T), llogvar, atol=1e-6)
    assert recon.get(timeout=T).shape == (4, 8)
    rmu, rlogvar = vae.encode(scientist.send(x))
    assert torch.allclose(rmu.get(timeout=T), lmu, atol=1e-6)
    z = torch.randn(3, 2)
    assert torch.allclose(vae.decode(scientist.send(z)).get(timeout=T), local.decode(z), atol=1e-6)
    assert "decode" in dir(vae)
    with pytest.raises(NotAllowed, match="save_to of the sent model cannot run remotely"):
        vae.save_to
    # training through a custom method moves the shared layers
    opt = scientist.torch.optim.SGD(vae.parameters(), lr=0.5)
    vae.decode(scientist.send(z)).sum().backward()
    opt.step()
    back = vae.get(timeout=T)
    assert not torch.equal(back.fc3.weight, local.fc3.weight)
    assert torch.equal(back.fc1.weight, local.fc1.weight)  # decode does not use fc1


def test_send_with_named_methods_fails_loudly_for_one_that_cannot_be_traced(pair):
    _, scientist = pair
    with pytest.raises(NotAllowed, match="method save_to"):
        scientist.send(VAE(), methods=["decode", "save_to"])
    with pytest.raises(ValueError, match="no public method 'nope'"):
        scientist.send(VAE(), methods=["nope"])
    vae = scientist.send(VAE(), methods=["decode"])
    with pytest.raises(NotAllowed, match=r"Module\.encode is not on the owner's allowlist"):
        vae.encode


def test_owner_refuses_a_method_that_was_not_sent(pair):
    _, scientist = pair
    vae = scientist.send(VAE(), methods=["decode"])
    sneaky = scientist._call("call", "encode", [vae, scientist.send(torch.rand(1, 8))], {})
    with pytest.raises(NotAllowed, match="not a method sent with this model"):
        sneaky.get(timeout=T)
    bad = scientist._call("call", "__init__", [vae], {})
    with pytest.raises(NotAllowed, match="not a method sent"):
        bad.get(timeout=T)


def test_unpacking_results_whose_structure_is_public(pair):
    _, scientist = pair
    ages = scientist.store["ages"]
    values, indices = ages.reshape(2, 2).max(dim=1)
    low, high = ages.chunk(2)
    first, *rest = ages.split(1)
    assert len(rest) == 3
    rows = list(ages.reshape(2, 2))
    assert len(rows) == 2
    assert values.private and indices.private and low.private  # unpacked, still private
    with pytest.raises(NotAllowed, match="depends on private values"):
        list(ages[ages > 40])  # how many items there are is private


def test_unpacking_a_private_structure_looks_the_same_for_any_data(tmp_path):
    from tests.test_noninterference_cases import differential

    def prog(s):
        x = s.store["x"]

        def unpack():
            a, b = x[x > 50].split(1)
            return a

        return {"split": lambda: list(x.chunk(3)), "masked": unpack, "n": lambda: len(list(x.unbind()))}

    differential(prog, tmp_path)


# -- owners publish Python values; store[0]; display names -----------------------------------
def test_owner_publishes_python_numbers_lists_and_dicts(pair):
    owner, scientist = pair
    owner.store.add(412, name="Number of patients")
    owner.store.add([1.5, 2.5, 4.0], name="doses (mg)")
    owner.store.add({"weights": torch.ones(2, 3), "bias": torch.zeros(2), "scale": 0.5}, name="pretrained layer")
    listing = {a["name"]: a for a in scientist.store.listing()}
    assert listing["Number of patients"]["type"] == "int" and listing["doses (mg)"]["shape"] == [3]
    assert listing["pretrained layer"]["keys"] == ["weights", "bias", "scale"]
    assert "412" not in repr(scientist.store) and "keys: weights, bias, scale" in repr(scientist.store)

    n = scientist.store["Number of patients"]
    doubled = n * 2 + 1
    assert doubled.private
    h = doubled.request(reason="cohort size")
    owner.requests.wait_pending(T).accept()
    assert h.wait(T) == 825

    layer = scientist.store["pretrained layer"]
    w = layer["weights"]
    assert w.private
    with pytest.raises(NotAllowed, match="depends on private values"):
        w.shape  # the dict holds numbers, which are values: nothing computed from it has public metadata
    owner.store.add({"w": torch.ones(2, 3)}, name="tensors only")
    assert scientist.store["tensors only"]["w"].shape == (2, 3)  # only tensors: shapes as public as theirs
    out = scientist.send(torch.ones(4, 3)) @ w.t() + layer["bias"]
    doses = scientist.torch.tensor(scientist.store["doses (mg)"])
    first, second, third = scientist.store["doses (mg)"]  # its length is public
    h = out.sum().request()
    owner.requests.wait_pending(T).accept()
    assert h.wait(T) == 24.0
    h = (doses.sum() + third).request()
    owner.requests.wait_pending(T).accept()
    assert h.wait(T) == 12.0


def test_publishing_refuses_what_it_cannot_carry():
    store = duet.owner.store.AssetStore()
    for bad in ([object()], {"k": "a string"}, {1: 2.0}, 2**70, [[[[[[1]]]]]]):
        with pytest.raises(TypeError):
            store.add(bad, name="bad")
    for name in ("", " padded", "tab\there", "\u202eevil", "x" * 65):
        with pytest.raises(ValueError, match="not valid"):
            store.add(1, name=name)


def test_assets_by_position_and_by_exact_display_name(pair):
    owner, scientist = pair
    owner.store.add(torch.tensor([1.0, 2.0]), name="blood pressure (mmHg)")
    assert scientist.store.keys() == ["ages", "blood pressure (mmHg)"]
    assert scientist.store[0].meta(timeout=T)["assets"] == ["ages"]
    assert scientist.store[-1].meta(timeout=T)["assets"] == ["blood pressure (mmHg)"]
    with pytest.raises(IndexError, match="2 asset"):
        scientist.store[2]
    with pytest.raises(KeyError):
        scientist.store["blood pressure"]  # lookup is exact
    with pytest.raises(TypeError):
        scientist.store[1.0]


# -- torch.distributions ---------------------------------------------------------------------
def test_distributions_construct_sample_and_score_remotely_with_lineage(pair):
    owner, scientist = pair
    D = scientist.torch.distributions
    ages = scientist.store["ages"]
    normal = D.Normal(ages, 1.0)
    assert normal.mean.private and normal.log_prob(ages).private  # derived from the asset
    scientist.torch.manual_seed(7)
    a = D.Normal(scientist.send(torch.zeros(3)), 1.0).sample((2,)).get(timeout=T)
    scientist.torch.manual_seed(7)
    b = D.Normal(scientist.send(torch.zeros(3)), 1.0).sample((2,)).get(timeout=T)
    assert a.shape == (2, 3) and torch.equal(a, b)  # the scientist's own generator, seeded
    c = D.Normal(scientist.send(torch.zeros(3)), 1.0).sample((2,)).get(timeout=T)
    assert not torch.equal(a, c)  # and random: not frozen

    # REINFORCE: a policy's Categorical, an action, its log-probability, the entropy
    probs = scientist.send(torch.tensor([[0.1, 0.9], [0.5, 0.5]]))
    m = D.Categorical(probs)
    action = m.sample()
    logp = m.log_prob(action).get(timeout=T)
    local = torch.distributions.Categorical(torch.tensor([[0.1, 0.9], [0.5, 0.5]]))
    act = action.get(timeout=T)
    assert torch.allclose(logp, local.log_prob(act))
    assert torch.allclose(m.entropy().get(timeout=T), local.entropy())
    kl = D.kl_divergence(D.Bernoulli(scientist.send(torch.tensor([0.3]))), D.Bernoulli(scientist.send(torch.tensor([0.6]))))
    want = torch.distributions.kl_divergence(torch.distributions.Bernoulli(torch.tensor([0.3])),
                                             torch.distributions.Bernoulli(torch.tensor([0.6])))
    assert torch.allclose(kl.get(timeout=T), want)
    with pytest.raises(NotAllowed, match=r"Distribution\.expand is not on the owner's allowlist"):
        m.expand
    with pytest.raises(NotAllowed, match="cannot be released"):
        m.get(timeout=T)
    with pytest.raises(duet.LimitExceeded, match="would allocate"):
        D.Normal(scientist.send(torch.zeros(1)), 1.0).sample((10**6, 10**6)).get(timeout=T)  # checked before allocating


def test_distributions_look_the_same_for_any_private_data(tmp_path):
    from tests.test_noninterference_cases import differential

    def prog(s):
        x = s.store["x"]
        D = s.torch.distributions
        return {
            "normal": lambda: D.Normal(x, 1.0).sample(),
            "invalid scale": lambda: D.Normal(0.0, x - 50).log_prob(s.send(torch.zeros(8))),  # validation reads values
            "categorical": lambda: D.Categorical(logits=x).sample((3,)),
            "entropy": lambda: D.Categorical(logits=x).entropy(),
            "public part": lambda: D.Normal(s.send(torch.zeros(2)), 1.0).sample(),
        }

    differential(prog, tmp_path)


# -- allowlist gaps met in practice ------------------------------------------------------------
class SuperResolution(nn.Module):
    """The super-resolution example: sub-pixel convolution."""

    def __init__(self, upscale: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, upscale**2, 3, padding=1)
        self.shuffle = nn.PixelShuffle(upscale)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        y = self.shuffle(self.conv2(torch.relu(self.conv1(x))))
        return y + self.up(x)


class CellLoop(nn.Module):
    """A recurrent cell unrolled over a fixed number of steps (the time series example)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(1, 4)
        self.gru = nn.GRUCell(4, 4)
        self.rnn = nn.RNNCell(4, 4, nonlinearity="relu")
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h, c = self.lstm(x[:, 0])
        h = self.gru(h)
        for t in range(1, 3):
            h, c = self.lstm(x[:, t], (h, c))
        return self.out(self.rnn(h))


@pytest.mark.parametrize("model,shape", [(SuperResolution, (2, 1, 6, 6)), (CellLoop, (2, 3, 1))])
def test_layers_that_were_missing_run_like_local(pair, model, shape):
    _, scientist = pair
    torch.manual_seed(0)
    local = model()
    x = torch.randn(*shape)
    assert torch.allclose(scientist.send(local)(scientist.send(x)).get(timeout=T), local(x), atol=1e-5)


def test_legacy_constructors_and_casts(pair):
    _, scientist = pair
    th = scientist.torch
    assert torch.equal(th.Tensor([1, 2]).get(timeout=T), torch.tensor([1.0, 2.0]))
    assert torch.equal(th.Tensor(2, 3).get(timeout=T), torch.zeros(2, 3))  # zeros, never uninitialised memory
    assert th.LongTensor([1, 2]).get(timeout=T).dtype == torch.int64
    assert torch.equal(th.FloatTensor((2,)).get(timeout=T), torch.tensor([2.0]))  # a tuple is data, as in torch
    x = th.tensor([1.5, 2.5])
    assert x.type(torch.float64).get(timeout=T).dtype == torch.float64
    assert x.long().get(timeout=T).dtype == torch.int64 and x.to(dtype=torch.int32).get(timeout=T).dtype == torch.int32
    with pytest.raises(duet.LimitExceeded):
        th.Tensor(10**6, 10**6).get(timeout=T)


def test_refusals_name_the_operation_and_the_alternative(pair):
    _, scientist = pair
    x = scientist.send(torch.ones(2))
    with pytest.raises(NotAllowed, match=r"Tensor\.data_ptr is not on the owner's allowlist; memory addresses"):
        x.data_ptr()
    with pytest.raises(AttributeError, match="torch.save is not on the owner's allowlist; ask for the value with .get()"):
        scientist.torch.save
    with pytest.raises(NotAllowed, match="hooks are Python functions"):
        x.register_hook


def test_a_plan_unpacks_a_sent_models_outputs_and_calls_its_methods(pair):
    _, scientist = pair
    torch.manual_seed(0)
    local = VAE()
    vae = scientist.send(local)

    @duet.plan
    def step(vae, x, z):
        recon, mu, logvar = vae(x)  # known from the model's graph, also while a plan is recorded
        return recon.sum() + mu.sum() * 0 + vae.decode(z).sum()

    x, z = torch.rand(2, 8), torch.rand(2, 2)
    scientist.torch.manual_seed(1)
    a = step(vae, scientist.send(x), scientist.send(z)).get(timeout=T)
    scientist.torch.manual_seed(1)
    b = step(vae, scientist.send(x), scientist.send(z)).get(timeout=T)  # replayed: same seed, same noise
    assert torch.equal(a, b) and a.shape == ()


def test_amended_reasons_are_capped_and_legacy_data_is_not_a_size(pair):
    owner, scientist = pair
    from duet.owner.requests import MAX_AMENDMENTS
    from tests.waiting import until

    m = scientist.store["ages"].sum()
    with pytest.raises(duet.RequestTimeout):
        m.get(timeout=0.1)
    req = owner.requests.wait_pending(T)
    for i in range(MAX_AMENDMENTS + 5):
        m.request(reason=f"reason {i}")
    scientist.ping(timeout=T)
    until(lambda: req.amendments == MAX_AMENDMENTS, T, "the amendments")
    assert req.reason == f"reason {MAX_AMENDMENTS - 1}"  # later ones are not applied (nor audited)
    assert scientist.torch.LongTensor([2**62]).get(timeout=T).item() == 2**62
