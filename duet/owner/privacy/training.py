"""DP-SGD on the owner with Opacus: `scientist.dp.train(model, optimizer, "mnist-train", ...)`.

What makes the trained model a differentially private release, and so free to leave:

- It starts from weights and optimizer settings the scientist owns (both public), and trains a copy:
  the scientist's own model and optimizer are untouched.
- The owner computes the sampling rate from its own dataset (batch size / items) and samples each
  step with Opacus's Poisson sampler (`UniformWithReplacementSampler`); no other sampler is
  accepted (a custom one made Opacus miscount privacy by orders of magnitude).
- Per-example gradients come from torch.func (`vmap` of `grad` over examples, each forward run on
  a batch of one), so a model that mixes its batch (a maximum or a softmax over dim 0, a
  concatenation) cannot make one example's gradient depend on another's; Opacus's `DPOptimizer`
  clips each and adds the noise, drawn, like the sampling, from generators seeded with 63 bits
  from the OS, never from the scientist's seed. Dropout draws from the scientist's generator, as
  in every action: known randomness does not weaken DP-SGD once each example's gradient is its own.
- The forward and backward passes run under the effect observer: a model that writes into its own
  weights or buffers (which would carry data around the noise) is refused.
- The model is first run on a public batch of zeros, so that its own errors show with their
  reasons before anything is charged or read; the whole run is then charged to the scientist's
  budget before the first step (composed by dp-accounting's privacy loss distributions at the
  budget's delta). A failure after that stays charged and reaches the scientist without its cause.

Progress is reported as steps done, never as losses: a loss is computed from private data.
"""
from __future__ import annotations

import copy
import logging
import math
import secrets
import time
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


class TrainingFailed(Exception):
    """DP training failed after it read private data: the charge stands, the cause stays on the owner."""


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataset: Any, spec: Spec, delta: float,
          reserve: Callable[[Spend], Any], randomness: ActionRandomness,
          progress: Callable[[int, int], None]) -> Outcome:
    """Train a copy of `model` with DP-SGD on `dataset`; `reserve(spend)` charges the ledger first.

    Everything that can fail on the model alone is tried first on a public batch of zeros, before
    anything is charged or any private example is read; a failure after that is charged and
    raised as TrainingFailed (its cause, which may depend on the data, is logged, not sent).
    """
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    x_all, y_all = _tensors(dataset)
    n = int(x_all.shape[0])
    if n == 0:
        raise NotAllowed("the dataset is empty")
    if delta <= 0:
        raise NotAllowed("DP training needs a budget with delta > 0; ask the owner to set one")
    rate = min(1.0, spec.batch_size / n)
    sample_gen = torch.Generator().manual_seed(secrets.randbits(63))
    noise_gen = torch.Generator().manual_seed(secrets.randbits(63))
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=rate, generator=sample_gen)
    steps = spec.epochs * len(sampler)
    sigma = spec.noise_multiplier if spec.noise_multiplier is not None else noise_for(spec.target_epsilon or 0.0, rate, steps, delta)
    spend = Spend.dpsgd(rate, sigma, steps)
    epsilon = compose([spend], delta)[0]

    trained = copy.deepcopy(model)  # the scientist's own model stays as it was
    check_model(trained)
    trained.train()
    opt = DPOptimizer(rebuild_optimizer(optimizer, [p for p in trained.parameters() if p.requires_grad]),
                      noise_multiplier=sigma, max_grad_norm=spec.max_grad_norm, expected_batch_size=spec.batch_size,
                      generator=noise_gen)
    per_example = _PerExample(trained, LOSSES[spec.loss], randomness)
    # The model alone, on public zeros: its errors (shapes, types, writes into its weights) show here,
    # with their reasons, before anything is charged or read.
    try:
        per_example(torch.zeros((1, *x_all.shape[1:]), dtype=x_all.dtype),
                    torch.zeros((1, *y_all.shape[1:]), dtype=y_all.dtype))
    except NotAllowed:
        raise
    except Exception as exc:  # the scientist's own model on zeros: its error holds nothing private
        raise NotAllowed(f"the model fails on a batch of zeros shaped like the dataset's items, before any "
                         f"data is read ({type(exc).__name__}: {str(exc)[:300]})") from None
    reservation = reserve(spend)  # BudgetExceeded here: nothing read, nothing charged
    started = time.monotonic()
    done = 0
    try:
        last = time.monotonic()
        for _epoch in range(spec.epochs):
            for indices in sampler:
                idx = torch.as_tensor(indices, dtype=torch.long)
                opt.zero_grad(set_to_none=True)
                per_example.into(opt, x_all[idx], y_all[idx])
                opt.step()
                done += 1
                if time.monotonic() - last >= PROGRESS_EVERY:
                    progress(done, steps)
                    last = time.monotonic()
        progress(done, steps)
    except BaseException as exc:
        reservation.commit()  # the data was read: charged, whatever happened
        log.warning("DP training failed after %d steps", done, exc_info=True)
        raise TrainingFailed(type(exc).__name__) from None
    reservation.commit()
    _scrub(trained)
    return Outcome(trained, steps, rate, sigma, epsilon, delta, time.monotonic() - started)


class _PerExample:
    """Per-example gradients with torch.func: each example's forward runs alone (vmap over examples of
    a batch of one), so no model, whatever it does across its batch (a maximum, a softmax over dim
    0, a concatenation), can let one example's gradient depend on another's. Clipping then bounds
    each person's influence as DP-SGD's accounting assumes. Forward and backward run under the
    effect observer: a model that writes into its own weights or buffers is refused."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], randomness: ActionRandomness) -> None:
        from torch.func import functional_call, grad, vmap

        self.model = model
        self.randomness = randomness
        self.params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        self.buffers = {k: b.detach() for k, b in model.named_buffers()}
        self.guarded = _guarded_ranges(model)
        self.by_name = {k: p for k, p in model.named_parameters() if p.requires_grad}

        def loss_one(params: Dict[str, torch.Tensor], buffers: Dict[str, torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0))

        self.fn = vmap(grad(loss_one), in_dims=(None, None, 0, 0), randomness="different")

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        observer = Observer(self.randomness, track=True)
        with active(observer):
            grads = self.fn(self.params, self.buffers, x, y)
        if ranges_overlap(self.guarded, observer.written):
            raise NotAllowed("the model writes into its own weights or buffers while it runs; "
                             "DP training refuses it (the writes would carry data around the noise)")
        return grads

    def into(self, opt: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set each parameter's per-example gradients (`grad_sample`) for Opacus's DPOptimizer."""
        if x.shape[0] == 0:  # a Poisson batch may be empty: one example's worth of zeros (clips to zero)
            for p in self.by_name.values():
                p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
            return
        grads = self(x, y)
        for name, p in self.by_name.items():
            p.grad_sample = grads[name].detach()  # type: ignore[attr-defined]


def _tensors(dataset: Any) -> Any:
    """(inputs, labels) of a dataset of fixed-shape tensors: its shapes are public, its items indexable at once."""
    if not isinstance(dataset, torch.utils.data.TensorDataset) or len(dataset.tensors) != 2:
        raise NotAllowed("DP training takes a dataset of (input, label) tensors (a TensorDataset, like duet.datasets.MNIST)")
    return dataset.tensors


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
