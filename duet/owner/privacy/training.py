"""DP-SGD on the owner with Opacus: `scientist.dp.train(model, optimizer, "mnist-train", ...)`.

What makes the trained model a differentially private release, and so free to leave:

- It starts from weights and optimizer settings the scientist owns (both public), and trains a copy:
  the scientist's own model and optimizer are untouched.
- The owner computes the sampling rate from its own dataset (batch size / items) and samples each
  step with Opacus's Poisson sampler (`UniformWithReplacementSampler`); no other sampler is
  accepted (a custom one made Opacus miscount privacy by orders of magnitude).
- Per-example gradients are clipped and noised by Opacus (`GradSampleModule`, `DPOptimizer`), the
  noise and the sampling drawn from generators seeded with 63 bits from the OS, never from the
  scientist's seed. Dropout and other random layers draw from the scientist's generator, as in
  every action: known randomness does not weaken DP-SGD, whose clipping bounds each example's
  influence whatever the forward pass does.
- The forward and backward passes run under the effect observer: a model that writes into its own
  weights or buffers (which would carry data around the noise) is refused.
- The whole run is charged to the scientist's budget before the first step (composed by
  dp-accounting's PLD accountant at the budget's delta); a run that fails before any step is
  refunded, one that fails later stays charged.

Progress is reported as steps done, never as losses: a loss is computed from private data.
"""
from __future__ import annotations

import copy
import logging
import math
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ...errors import NotAllowed
from ..effects import Observer, active
from ..footprint import ranges_overlap, tensor_range
from ..randomness import ActionRandomness
from .ledger import Spend, compose

log = logging.getLogger("duet.owner")

LOSSES: Dict[str, Callable[..., torch.Tensor]] = {"nll_loss": F.nll_loss, "cross_entropy": F.cross_entropy}
MAX_EPOCHS = 1000
MAX_BATCH = 1 << 16
PROGRESS_EVERY = 1.0  # seconds between progress notices


@dataclass(frozen=True)
class Spec:
    """A DP training request, checked."""

    epochs: int
    batch_size: int
    max_grad_norm: float
    noise_multiplier: Optional[float]
    target_epsilon: Optional[float]
    loss: str

    @staticmethod
    def parse(msg: Dict[str, Any]) -> "Spec":
        epochs, batch = msg.get("epochs"), msg.get("batch_size")
        if type(epochs) is not int or not 1 <= epochs <= MAX_EPOCHS:
            raise NotAllowed(f"epochs must be an int between 1 and {MAX_EPOCHS}")
        if type(batch) is not int or not 1 <= batch <= MAX_BATCH:
            raise NotAllowed(f"batch_size must be an int between 1 and {MAX_BATCH}")
        clip = _number(msg.get("max_grad_norm"), "max_grad_norm")
        sigma, target = msg.get("noise_multiplier"), msg.get("target_epsilon")
        if (sigma is None) == (target is None):
            raise NotAllowed("give exactly one of noise_multiplier and target_epsilon")
        loss = msg.get("loss", "nll_loss")
        if loss not in LOSSES:
            raise NotAllowed(f"loss must be one of {', '.join(LOSSES)}")
        return Spec(epochs, batch, clip, _number(sigma, "noise_multiplier") if sigma is not None else None,
                    _number(target, "target_epsilon") if target is not None else None, str(loss))


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise NotAllowed(f"{what} must be a finite number > 0")
    return float(value)


def noise_for(target_epsilon: float, sampling_rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier (to 1%) whose run alone costs at most target_epsilon at delta."""
    def cost(sigma: float) -> float:
        return compose([Spend.dpsgd(sampling_rate, sigma, steps)], delta)[0]

    low, high = 0.3, 1.0
    while cost(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1000:
            raise NotAllowed(f"no noise multiplier reaches epsilon {target_epsilon:g} in {steps} steps")
    while high - low > 0.01 * high:
        mid = (low + high) / 2
        if cost(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def check_model(model: Any) -> None:
    """Refuse what Opacus cannot make private (batch norm mixes examples, for one)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise NotAllowed("this model cannot be trained with DP-SGD: " + "; ".join(str(e) for e in errors[:3]))


def rebuild_optimizer(optimizer: torch.optim.Optimizer, params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """A fresh optimizer of the same type and settings over other parameters (no state carried over)."""
    if len(optimizer.param_groups) != 1:
        raise NotAllowed("DP training takes an optimizer with one parameter group")
    settings = {k: v for k, v in optimizer.param_groups[0].items() if k in optimizer.defaults}
    return type(optimizer)(params, **settings)


@dataclass
class Outcome:
    """A finished DP training run."""

    model: torch.nn.Module
    steps: int
    sampling_rate: float
    noise_multiplier: float
    epsilon: float  # of this run alone, at delta
    delta: float
    seconds: float


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataset: Any, spec: Spec, delta: float,
          reserve: Callable[[Spend], Any], randomness: ActionRandomness,
          progress: Callable[[int, int], None]) -> Outcome:
    """Train a copy of `model` with DP-SGD on `dataset`; `reserve(spend)` charges the ledger first."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    n = len(dataset)
    if n == 0:
        raise NotAllowed("the dataset is empty")
    rate = min(1.0, spec.batch_size / n)
    sample_gen = torch.Generator().manual_seed(secrets.randbits(63))
    noise_gen = torch.Generator().manual_seed(secrets.randbits(63))
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=rate, generator=sample_gen)
    steps = spec.epochs * len(sampler)
    if delta <= 0:
        raise NotAllowed("DP training needs a budget with delta > 0; ask the owner to set one")
    sigma = spec.noise_multiplier if spec.noise_multiplier is not None else noise_for(spec.target_epsilon or 0.0, rate, steps, delta)
    spend = Spend.dpsgd(rate, sigma, steps)
    epsilon = compose([spend], delta)[0]

    trained = copy.deepcopy(model)  # the scientist's own model stays as it was
    check_model(trained)
    reservation = reserve(spend)  # BudgetExceeded here: nothing ran, nothing charged
    started = time.monotonic()
    done = 0
    try:
        gsm = GradSampleModule(trained)
        opt = DPOptimizer(rebuild_optimizer(optimizer, list(trained.parameters())), noise_multiplier=sigma,
                          max_grad_norm=spec.max_grad_norm, expected_batch_size=spec.batch_size, generator=noise_gen)
        guarded = _guarded_ranges(trained)
        loss_fn = LOSSES[spec.loss]
        gsm.train()
        last = time.monotonic()
        for _epoch in range(spec.epochs):
            for indices in sampler:
                x, y = _batch(dataset, indices)
                opt.zero_grad(set_to_none=True)
                observer = Observer(randomness, track=True)
                with active(observer), warnings.catch_warnings():
                    # Opacus's hooks fire on module outputs when inputs need no gradient: expected here.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss = loss_fn(gsm(x), y)
                    loss.backward()
                if ranges_overlap(guarded, observer.written):
                    raise NotAllowed("the model writes into its own weights or buffers while it runs; "
                                     "DP training refuses it (the writes would carry data around the noise)")
                opt.step()
                done += 1
                if time.monotonic() - last >= PROGRESS_EVERY:
                    progress(done, steps)
                    last = time.monotonic()
        progress(done, steps)
        gsm._close()
    except BaseException:
        if done == 0:
            reservation.refund()  # no step touched the data
        else:
            reservation.commit()  # when in doubt, charge
        raise
    reservation.commit()
    _scrub(trained)
    return Outcome(trained, steps, rate, sigma, epsilon, delta, time.monotonic() - started)


def _batch(dataset: Any, indices: List[int]) -> Any:
    """The examples at these indices, as (inputs, labels); a TensorDataset is indexed at once."""
    if isinstance(dataset, torch.utils.data.TensorDataset):
        idx = torch.as_tensor(indices, dtype=torch.long)
        parts = [t[idx] for t in dataset.tensors]
    else:
        samples = [dataset[int(i)] for i in indices]
        if not samples:
            first = dataset[0]
            parts = [torch.as_tensor(v).new_empty((0, *torch.as_tensor(v).shape)) for v in first]
        else:
            parts = list(torch.utils.data.default_collate(samples))
    if len(parts) != 2:
        raise NotAllowed("DP training takes a dataset of (input, label) pairs")
    return parts[0], parts[1]


def _guarded_ranges(model: torch.nn.Module) -> List[Any]:
    """Memory of the weights and buffers: only the optimizer may write there."""
    out = []
    for t in list(model.parameters()) + list(model.buffers()):
        r = tensor_range(t)
        if r is not None:
            out.append(r)
    return out


def _scrub(model: torch.nn.Module) -> None:
    """Drop what Opacus attached (per-example gradients are not private) and the last noisy gradients."""
    for p in model.parameters():
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
