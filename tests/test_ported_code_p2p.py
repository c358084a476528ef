"""Patterns of ported Duet-era notebooks between two real processes over real WebRTC (a representative few).

The owner process publishes tensors and Python values and accepts every release; the scientist is this
process. See tests/test_ported_code.py for every pattern on local_pair().
"""
from __future__ import annotations

import pytest
import torch

import duet
from tests.procs.helpers import scientist_of_owner_process
from tests.test_ported_code import VAE, Recurrent

pytestmark = pytest.mark.slow
T = 30


@pytest.fixture(scope="module")
def remote():
    with scientist_of_owner_process("--accept-all", "--python-assets", name="porter") as scientist:
        yield scientist


def test_vae_unpacks_and_decodes_over_webrtc(remote):
    torch.manual_seed(0)
    local = VAE()
    vae = remote.send(local)
    x, z = torch.rand(4, 8), torch.rand(3, 2)
    recon, mu, logvar = vae(remote.send(x))
    assert torch.allclose(mu.get(timeout=T), local.encode(x)[0], atol=1e-6)
    assert torch.allclose(vae.decode(remote.send(z)).get(timeout=T), local.decode(z), atol=1e-6)
    remote.torch.manual_seed(5)
    first = vae(remote.send(x))[0].get(timeout=T)
    remote.torch.manual_seed(5)
    assert torch.equal(vae(remote.send(x))[0].get(timeout=T), first)  # seeded noise, reproducible
    assert not torch.equal(vae(remote.send(x))[0].get(timeout=T), first)  # and not frozen


def test_lstm_model_over_webrtc(remote):
    torch.manual_seed(3)
    local = Recurrent("lstm")
    x = torch.randn(2, 5, 4)
    assert torch.allclose(remote.send(local)(remote.send(x)).get(timeout=T), local(x), atol=1e-6)


def test_python_assets_by_position_and_display_name_over_webrtc(remote):
    assert remote.store.keys() == ["ages", "pretrained layer", "doses (mg)"]
    layer = remote.store[1]
    out = remote.send(torch.ones(1, 3)) @ layer["weights"].t() + layer["bias"]
    assert torch.equal(out.get(reason="a layer's output", timeout=T), torch.tensor([[3.0, 3.0]]))
    low, mid, high = remote.store["doses (mg)"]
    assert (high + low).get(timeout=T) == 5.5


def test_distribution_and_unpacking_over_webrtc(remote):
    ages = remote.store["ages"]
    values, idx = ages.reshape(2, 2).max(dim=1)
    assert torch.equal(idx.get(timeout=T), torch.tensor([1, 0]))
    m = remote.torch.distributions.Categorical(logits=ages)
    remote.torch.manual_seed(2)
    a = m.sample((5,)).get(timeout=T)
    remote.torch.manual_seed(2)
    assert torch.equal(m.sample((5,)).get(timeout=T), a)
    with pytest.raises(duet.NotAllowed, match="CPU only"):
        ages.cuda()
