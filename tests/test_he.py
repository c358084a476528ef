"""Homomorphic encryption (CKKS, TenSEAL): the owner computes on the scientist's ciphertexts with its
private model, never holding the secret key; results leave only with approval, and only the
scientist can open them.

The done-means case: a 784-input linear model on MNIST images, encrypted, equals the plain result
within duet.scientist.he.PRECISION, on one process pair and across two processes over WebRTC.
"""
from __future__ import annotations

import msgpack
import pytest
import torch

import duet
import duet.he
from duet import wire
from duet.ciphertext import CONTEXT, VECTOR, Ciphertext
from duet.datasets import MNIST
from duet.errors import NotAllowed, ProtocolError
from duet.scientist.he import PRECISION
from tests.procs.helpers import start_owner, start_signaling

tenseal = pytest.importorskip("tenseal")


def trained_linear(seed: int = 0) -> torch.nn.Linear:
    """A 784-input linear model fitted for a few steps on 2,000 MNIST images (realistic weights)."""
    torch.manual_seed(seed)
    data = MNIST(train=True, limit=2000)
    model = torch.nn.Linear(784, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = data.data.reshape(len(data.data), -1), data.targets
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.fixture
def he_pair(tmp_path):
    owner, scientist = duet.local_pair(audit_log=tmp_path / "audit.jsonl")
    model = trained_linear()
    owner.store.add(model, name="risk-model", description="a linear model on 28x28 images")
    yield owner, scientist, model
    scientist.close()
    owner.close()


def test_encrypted_inference_on_mnist_equals_the_plain_result(he_pair):
    owner, scientist, model = he_pair
    owner.requests.add_handler(action="accept", kind="release", datasets=["risk-model"])
    he = scientist.he.context(progress=False)
    images = MNIST(train=False, limit=8)
    remote_model = scientist.store["risk-model"]
    for image, label in zip(images.data, images.targets):
        x = image.reshape(-1)
        y = remote_model(scientist.send(he.encrypt(x)))
        encrypted_result = y.get(reason="my prediction", timeout=60)
        assert isinstance(encrypted_result, Ciphertext) and encrypted_result.size == 10
        got = he.decrypt(encrypted_result)
        plain = model(x).detach().double()
        assert float((got - plain).abs().max()) < PRECISION
        assert int(got.argmax()) == int(plain.argmax())
    conn = owner._connections[0]
    assert conn.he_context is not None and not conn.he_context.context.is_private()  # never the secret key
    # The owner only ever saw ciphertext: its copy of the context cannot decrypt.
    with pytest.raises(ValueError, match="secret"):
        tenseal.ckks_vector_from(conn.he_context.context, encrypted_result.parts[0]).decrypt()


def test_results_computed_with_private_weights_need_approval(he_pair):
    owner, scientist, _model = he_pair
    he = scientist.he.context(progress=False)
    values = torch.rand(784)
    x = scientist.send(he.encrypt(values))
    mine = (x * 2 + 1).sum()  # only the scientist's own data: no approval
    assert float(he.decrypt(mine.get(timeout=30))[0]) == pytest.approx(float((values.double() * 2 + 1).sum()), abs=1e-3)
    assert not owner.requests.history
    y = scientist.store["risk-model"](x)
    handle = y.request(reason="prediction")
    req = owner.requests.wait_pending(timeout=10, kind="release")
    assert req.lineage == ("risk-model",) and "encrypted model call" in req.ops
    req.deny("not today")
    with pytest.raises(duet.RequestDenied, match="not today"):
        handle.wait(10)


def test_a_context_with_the_secret_key_is_refused_and_not_kept(he_pair):
    owner, scientist, _model = he_pair
    ctx = tenseal.context(tenseal.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    raw = ctx.serialize(save_secret_key=True)
    import hashlib

    private = Ciphertext(CONTEXT, hashlib.sha256(raw).digest(), (raw,))
    with pytest.raises(duet.NotAllowed, match="secret key"):
        scientist.session.call({"kind": "he_context", "context": private}, 30, "context")
    assert owner._connections[0].he_context is None


def test_ciphertexts_of_another_context_and_unlisted_operations_are_refused(he_pair):
    _owner, scientist, _model = he_pair
    first = scientist.he.context(progress=False)
    stale = first.encrypt(torch.ones(4))
    second = scientist.he.context(progress=False)  # a new context replaces the first on the owner
    with pytest.raises(duet.NotAllowed, match="another encryption context"):
        (scientist.send(stale) * 2).get(timeout=30)
    x = scientist.send(second.encrypt(torch.ones(4)))
    with pytest.raises(duet.NotAllowed, match="not among the operations"):
        x.exp().get(timeout=30)
    with pytest.raises(duet.NotAllowed, match="4 encrypted"):
        (x + torch.ones(3)).get(timeout=30)
    with pytest.raises(duet.NotAllowed, match="cannot run on encrypted data"):
        scientist.send(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))(x).get(timeout=30)


def test_a_model_the_scientist_sends_runs_on_its_own_ciphertext(he_pair):
    _owner, scientist, _model = he_pair
    he = scientist.he.context(progress=False)
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(784, 8), duet.he.Square())
    x = torch.rand(784)
    y = scientist.send(net)(scientist.send(he.encrypt(x))).get(timeout=60)
    assert float((he.decrypt(y) - net(x).detach().double()).abs().max()) < PRECISION


def test_a_published_polynomial_activation_runs_by_polyval(he_pair):
    owner, scientist, _model = he_pair
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(784, 5), duet.he.Polynomial([0.5, 0.197, 0.0, -0.004]))
    owner.store.add(net, name="scorer")
    owner.requests.add_handler(action="accept", kind="release", datasets=["scorer"])
    # a degree-3 polynomial after a Linear layer needs three levels: a larger context (~117 MiB)
    he = scientist.he.context(poly_modulus=16384, coeff_bits=(60, 40, 40, 40, 60), progress=False)
    assert he.depth == 3
    x = torch.rand(784) * 0.1
    y = scientist.store["scorer"](scientist.send(he.encrypt(x))).get(timeout=60)
    assert float((he.decrypt(y) - net(x).detach().double()).abs().max()) < PRECISION


def test_ciphertexts_travel_as_a_typed_wire_value():
    c = Ciphertext(VECTOR, bytes(32), (b"\x01" * 10, b"\x02" * 3), (4, 1))
    assert wire.decode(wire.encode({"x": c})) == {"x": c}
    assert repr(c) == "<Ciphertext: 5 encrypted numbers (CKKS), 0 KiB>"
    bad_payloads = [
        ["ckks-vector", bytes(31), [b"x"], [1]],  # digest of the wrong length
        ["ckks-vector", bytes(32), [b"x"], [1, 2]],  # sizes do not match parts
        ["ckks-vector", bytes(32), [], []],  # nothing
        ["rsa", bytes(32), [b"x"], [1]],  # unknown kind
        ["ckks-context", bytes(32), [b"x", b"y"], []],  # a context in two parts
        ["ckks-vector", bytes(32), ["text"], [1]],  # a part that is not bytes
    ]
    for payload in bad_payloads:
        data = msgpack.packb(msgpack.ExtType(wire.EXT_CIPHERTEXT, msgpack.packb(payload, use_bin_type=True)))
        with pytest.raises(ProtocolError):
            wire.decode(data)


def test_modules_are_published_privately(he_pair):
    owner, scientist, model = he_pair
    listing = {a["name"]: a for a in scientist.store.listing()}
    assert listing["risk-model"]["type"] == "Module" and listing["risk-model"]["shape"] is None
    out = scientist.store["risk-model"](scientist.send(torch.rand(784)))
    assert out.private
    with pytest.raises(NotAllowed, match="private"):
        out.shape  # its shape follows the private architecture
    with pytest.raises(TypeError, match="publish"):
        owner.store.add(torch.nn.Linear(2, 2).to("meta"), name="on meta")
    scientist.store["risk-model"].weight.add_(1)  # the scientist's copy; the published model is unchanged
    assert torch.equal(owner.store["risk-model"].value.weight, model.weight)


@pytest.mark.slow
def test_encrypted_inference_across_two_processes(tmp_path):
    proc, url = start_signaling()
    owner_proc, info = start_owner("--signaling", url, "--he-model", "--accept-all")
    try:
        scientist = duet.join(info["code"], name="clinic", local_only=True)
        he = scientist.he.context(progress=False)
        x = MNIST(train=False, limit=1).data[0].reshape(-1)
        y = scientist.store["risk-model"](scientist.send(he.encrypt(x))).get(reason="prediction", timeout=120)
        from tests.procs.owner import seeded_he_model

        assert float((he.decrypt(y) - seeded_he_model()(x).detach().double()).abs().max()) < PRECISION
        scientist.close()
    finally:
        assert owner_proc.stop() == 0, "".join(owner_proc.stderr[-40:])
        proc.stop()


def _every_slot(he, raw: bytes) -> torch.Tensor:
    """All slots of a released CKKS vector, opened with the secret key (what a scientist can do)."""
    from tenseal import sealapi

    ctx = he._context
    vec = tenseal.ckks_vector_from(ctx, raw)
    plain = sealapi.Plaintext()
    sealapi.Decryptor(ctx.data.seal_context(), ctx.data.secret_key()).decrypt(vec.data.ciphertext()[0], plain)
    return torch.tensor(sealapi.CKKSEncoder(ctx.data.seal_context()).decode_double(plain), dtype=torch.float64)


def test_a_released_prediction_carries_its_outputs_only_not_partial_sums_of_the_weights(he_pair):
    """TenSEAL sums n numbers by rotations over n, leaving partial sums of x_i * w_i in the other
    slots; from one prediction a least-squares solve gave every weight and the bias. Every slot of
    each released output now holds that output, whatever the scientist put past its input."""
    owner, scientist, model = he_pair
    owner.requests.add_handler(action="accept", kind="release", datasets=["risk-model"])
    he = scientist.he.context(progress=False)
    x = MNIST(train=False, limit=1).data[0].reshape(-1).double()
    from duet.owner.he import with_size

    full = he.encrypt(torch.cat([x, torch.rand(he.slots - 784)]))  # the padding filled too ...
    sneaky = Ciphertext(VECTOR, full.context, (with_size(full.parts[0], 784),), (784,))  # ... said to be 784
    for sent in (he.encrypt(x), sneaky):
        y = scientist.store["risk-model"](scientist.send(sent)).get(timeout=60)
        expected = model(x.float()).detach().double()
        for k, raw in enumerate(y.parts):
            slots = _every_slot(he, raw)
            assert float((slots - expected[k]).abs().max()) < PRECISION, k


def test_copies_of_a_result_never_meet_the_scientists_padding(he_pair):
    """A sum's result holds its number in every slot, a ciphertext the scientist made holds their
    own numbers past its size. Combining the two (or a Linear layer on one-number ciphertexts the
    scientist made) would answer the computation for inputs the release does not show: refused."""
    owner, scientist, _model = he_pair
    from duet.errors import RemoteError

    owner.store.add(torch.nn.Linear(3, 2), name="small")
    he = scientist.he.context(progress=False)
    total = scientist.send(he.encrypt(torch.rand(784))).sum()
    one = scientist.send(he.encrypt(torch.rand(1)))
    with pytest.raises(NotAllowed, match="combines only"):
        (total + one).get(timeout=30)
    assert float((he.decrypt((total + total).get(timeout=30)))[0]) != 0.0  # results with results: fine
    parts = [he.encrypt(torch.rand(1)).parts[0] for _ in range(3)]
    singles = scientist.send(Ciphertext(VECTOR, he.digest, tuple(parts), (1, 1, 1)))
    with pytest.raises(RemoteError, match="withheld"):  # (the model is private: the reason is the owner's)
        scientist.store["small"](singles).get(timeout=30)


def test_an_encrypted_release_counts_the_plain_numbers_it_was_computed_with(he_pair):
    """Against keys the scientist made itself (Galois keys of its choosing), one approved prediction
    gives the model's weights and bias exactly (a review did it): CKKS has no circuit privacy. So the
    request counts them, says so, and a rule for ten-number results does not let it out."""
    owner, scientist, _model = he_pair
    owner.requests.add_handler(action="accept", kind="release", datasets=["risk-model"], max_elements=10)
    he = scientist.he.context(progress=False)
    y = scientist.store["risk-model"](scientist.send(he.encrypt(torch.rand(784))))
    handle = y.request(reason="one prediction")
    req = owner.requests.wait_pending(timeout=30)
    assert req.numel == 10 + 784 * 10 + 10
    assert "7850 plain numbers" in req.type_name and "own keys" in req.type_name
    req.accept()
    assert isinstance(handle.wait(30), Ciphertext)


def test_ciphertexts_that_are_not_fresh_and_contexts_with_extra_keys_are_refused(he_pair, monkeypatch):
    """A ciphertext of 16 polynomials costs 3 MiB of memory from 400 bytes on the wire, and Galois
    keys of zeros compress to nothing: refused before they are used, and contexts are charged for
    what they hold in memory."""
    _owner, scientist, _model = he_pair
    he = scientist.he.context(progress=False)
    fresh = tenseal.ckks_vector(he._context, [1.0, 2.0])
    squared = fresh * fresh  # (relinearized and rescaled: one level down)
    bad = Ciphertext(VECTOR, he.digest, (squared.serialize(),), (2,))
    with pytest.raises(NotAllowed, match="not fresh"):
        scientist.send(bad).sum().get(timeout=30)
    import hashlib

    from duet.owner import he as owner_he

    raw = scientist_context_bytes(he)
    sent = Ciphertext(CONTEXT, hashlib.sha256(raw).digest(), (raw,))
    assert owner_he.HEContext(sent).nbytes >= 30 << 20  # what the keys hold in memory
    monkeypatch.setattr(owner_he, "honest_galois_keys", lambda degree: 10)  # as if these were 14 extra keys
    with pytest.raises(NotAllowed, match="Galois keys"):
        owner_he.HEContext(sent)


def scientist_context_bytes(he) -> bytes:
    public = he._context.copy()
    public.make_context_public()
    return public.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True)


def test_one_action_on_ciphertexts_is_bounded_in_work_and_memory(he_pair, monkeypatch):
    """A scientist's model could apply a wide layer at each of 20,000 graph nodes: days of work and
    terabytes held before anything is stored. Every vector an action makes counts."""
    from duet.errors import LimitExceeded
    from duet.owner import he as owner_he

    _owner, scientist, _model = he_pair
    he = scientist.he.context(progress=False)
    v = torch.rand(8, dtype=torch.float64)
    x = scientist.send(he.encrypt(v))
    monkeypatch.setattr(owner_he, "MAX_PARTS_PER_ACTION", 5)
    with pytest.raises(NotAllowed, match="at most 5 CKKS vectors"):
        (x @ torch.rand(8, 6)).get(timeout=30)
    monkeypatch.setattr(owner_he, "MAX_PARTS_PER_ACTION", 10_000)
    scientist_conn = _owner._connections[0]
    monkeypatch.setattr(scientist_conn.objects.limits, "max_bytes", scientist_conn.objects.budget.bytes + (2 << 20))
    with pytest.raises(LimitExceeded, match="memory limit"):
        (x @ torch.rand(8, 64)).get(timeout=30)  # 64 vectors of ~0.4 MiB: over a 2 MiB allowance
    assert torch.allclose(he.decrypt((x @ torch.eye(8)[:, :2]).get(timeout=30)), v[:2], atol=PRECISION)  # small ones run


def test_sums_of_fresh_ciphertexts_count_each_number_once(he_pair):
    """TenSEAL repeats a short vector's numbers across the slots past it: a sum over every slot
    counted them thousands of times (8191 for 1 + 2 + 3). Vectors whose padding may not be zeros are
    masked before a sum."""
    _owner, scientist, _model = he_pair
    he = scientist.he.context(progress=False)
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    x = scientist.send(he.encrypt(v))
    cases = {"x.sum()": (x.sum(), v.sum()), "(x + 1).sum()": ((x + 1).sum(), (v + 1).sum()),
             "(x * x).sum()": ((x * x).sum(), (v * v).sum()), "(x * 2).sum()": ((x * 2).sum(), (v * 2).sum()),
             "x.sum().sum()": (x.sum().sum(), v.sum()), "(x.sum() + x.sum()).sum()": ((x.sum() + x.sum()).sum(), 2 * v.sum())}
    for label, (pointer, expected) in cases.items():
        got = he.decrypt(pointer.get(timeout=30))
        assert got.shape == (1,) and abs(float(got[0]) - float(expected)) < PRECISION, (label, float(got[0]))
