"""Whether a result's metadata depends only on metadata: checked, not assumed.

Running an action a second time on *meta* tensors (same shapes, strides,
dtypes and ``requires_grad``, no data) computes everything about the result
that can be known without the values. If that shadow run succeeds and
predicts the real result's structure exactly (types, shapes, dtypes, lengths,
and any plain Python values such as ``x.size(0)``), then those facts are a
function of the inputs' metadata and of the Python arguments alone, and can
carry their lineage instead of the values' lineage. Operations whose output
shape depends on values (``nonzero``, masked selection, ``bincount``,
``one_hot`` without ``num_classes``, ``repeat_interleave`` with tensor
repeats, ``unique``) cannot run on meta tensors, so their results keep the
values' lineage for their metadata too. Numpy has no meta arrays: numpy
results are treated the same way (when in doubt, taint).

The shadow run never touches real data or generators: modules are called with
meta copies of their parameters and buffers swapped in for the duration.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch

from .. import containers
from . import frames
from .footprint import grad_of

UNAVAILABLE = object()  # the shadow run could not be made or failed


def _meta_tensor(t: torch.Tensor) -> torch.Tensor:
    m = torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device="meta")
    if t.requires_grad:
        m.requires_grad_(True)
    grad = grad_of(t)
    if grad is not None and m.is_leaf:
        m.grad = torch.empty_strided(tuple(grad.shape), grad.stride(), dtype=grad.dtype, device="meta")
    return m


class _Unavailable(Exception):
    pass


def _meta_leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.device.type != "cpu":
            raise _Unavailable()
        return _meta_tensor(value)
    if isinstance(value, (np.ndarray, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
        raise _Unavailable()
    return value  # a module is swapped to meta state by _meta_state() around the call


def _list_or_plain_tuple(value: Any) -> bool:
    """A named tuple is passed to the shadow run as it is, not rebuilt as a plain tuple."""
    return isinstance(value, list) or (isinstance(value, tuple) and not hasattr(value, "_fields"))


def _to_meta(value: Any) -> Any:
    return containers.map_leaves(value, _meta_leaf, too_deep=_Unavailable, is_sequence=_list_or_plain_tuple)


def _modules_in(value: Any, out: Dict[int, torch.nn.Module]) -> None:
    for v in containers.leaves(value, prune=True):
        if isinstance(v, torch.nn.Module):
            out[id(v)] = v


@contextlib.contextmanager
def _meta_state(modules: Dict[int, torch.nn.Module]) -> Iterator[None]:
    """Swap meta copies into every module's parameters and buffers, and back."""
    from torch.nn.utils.stateless import _reparametrize_module

    with contextlib.ExitStack() as stack:
        for module in modules.values():
            state = {n: _meta_tensor(p) for n, p in module.named_parameters()}
            state.update({n: _meta_tensor(b) for n, b in module.named_buffers()})
            stack.enter_context(_reparametrize_module(module, state))
        yield


def shadow(
    call: Optional[Callable[..., Any]],
    args: Any,
    kwargs: Dict[str, Any],
    target_method: Optional[str] = None,
    meter: Any = None,
    attribute: bool = False,
) -> Any:
    """Run an action on meta copies of its arguments; its result's structure, or UNAVAILABLE.

    `call` is the function (or module) to run; with `target_method`, the
    method (or, with `attribute`, the attribute) of the first argument.
    `meter`, a dispatch mode, sees every allocation of the shadow run.
    """
    try:
        meta_args = _to_meta(list(args))
        meta_kwargs = _to_meta(dict(kwargs))
    except _Unavailable:
        return UNAVAILABLE
    modules: Dict[int, torch.nn.Module] = {}
    _modules_in([call, args, kwargs], modules)
    try:
        from .effects import active

        # Factories inside (torch.randn(n) in a model's forward) make meta tensors too: nothing is allocated.
        with _meta_state(modules), torch.device("meta"), (active(meter) if meter is not None else contextlib.nullcontext()):
            if target_method is not None:
                member = getattr(meta_args[0], target_method)
                result = member if attribute else member(*meta_args[1:], **meta_kwargs)
            else:
                assert call is not None
                result = call(*meta_args, **meta_kwargs)
            return describe(result)
    except Exception:
        return UNAVAILABLE


def describe(value: Any) -> Any:
    """The structure of a value with tensors reduced to their metadata (comparable, hashable)."""
    return containers.walk(value, _describe, too_deep=_Unavailable)


def _describe(value: Any, inner: Callable[[Any], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype, bool(value.requires_grad))
    if isinstance(value, np.ndarray):
        return ("A", value.shape, value.dtype.str)
    if isinstance(value, torch.nn.Module):
        return ("M", type(value).__name__)
    if isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
        return ("O", type(value).__name__)
    if isinstance(value, torch.Size):
        return ("S", tuple(value))
    if isinstance(value, (list, tuple)):  # a torch.return_types structseq is kept as a tuple
        return ("list" if isinstance(value, list) else "tuple", tuple(inner(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, inner(v)) for k, v in value.items()))
    if isinstance(value, float) and value != value:
        return ("nan",)
    if value is None or isinstance(value, (bool, int, float, complex, str, torch.dtype)):
        return (type(value).__name__, value)
    if frames.kind(value) is not None:
        return frames.describe(value)  # kind, shape, names, dtypes: never values
    return ("?", type(value).__name__)


class Uncacheable(Exception):
    """A value whose shadow-run outcome cannot be keyed by its metadata."""


def signature(value: Any) -> Any:
    """Everything a shadow run can depend on, as a hashable key (raises Uncacheable otherwise)."""
    return containers.walk(value, _signature, too_deep=Uncacheable)


def _signature(value: Any, inner: Callable[[Any], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        grad = grad_of(value)
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.requires_grad, value.layout, value.device.type,
                None if grad is None else (tuple(grad.shape), grad.stride(), grad.dtype))
    if isinstance(value, torch.nn.Module):  # its parameters and buffers count one level deeper
        return ("M", _module_token(value), tuple(m.training for m in value.modules()),
                tuple((n, inner(p)) for n, p in value.named_parameters()),
                tuple((n, inner(b)) for n, b in value.named_buffers()))
    if isinstance(value, (list, tuple)):
        return ("list" if isinstance(value, list) else "tuple", tuple(inner(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, inner(v)) for k, v in value.items()))
    if isinstance(value, slice):  # so do a slice's start, stop and step
        return ("slice", inner(value.start), inner(value.stop), inner(value.step))
    if isinstance(value, torch.Size):
        return ("S", tuple(value))
    if isinstance(value, float) and value != value:
        return ("nan",)
    if value is None or value is Ellipsis or isinstance(value, (bool, int, float, complex, str, torch.dtype)):
        return (type(value).__name__, value)
    raise Uncacheable()


class _Token:
    """Stands for one module object in cache keys; kept alive by the key, so never reused for another."""

    __slots__ = ("__weakref__",)


def _module_token(module: torch.nn.Module) -> _Token:
    token = module.__dict__.get("_duet_shadow_token")
    if token is None:
        token = _Token()
        object.__setattr__(module, "_duet_shadow_token", token)  # not a submodule, parameter or buffer
    return token


def holds_data(value: Any) -> bool:
    """Whether a result holds tensors, arrays or models (values), not only plain facts.

    A result nested too deeply to tell is taken to hold data.
    """
    try:
        return any(_is_data(v) for v in containers.leaves(value))
    except containers.TooDeep:
        return True


def _is_data(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic, torch.nn.Module, torch.optim.Optimizer,
                          torch.optim.lr_scheduler.LRScheduler)):
        return True
    return frames.kind(value) is not None  # a DataFrame, Series or groupby holds values
