"""Resource bounds, checked before an action allocates: no single action may exhaust or stall the owner.

- torch operations are first run on meta tensors (`duet.owner.shapes`) under a
  :class:`SizeMeter`, which sees every allocation the real run would make,
  intermediates of a model's forward included; an allocation over the
  scientist's limits fails the action before any memory is taken.
- Where no shadow run exists (numpy, or a torch operation whose sizes depend
  on values), sizes are computed from the arguments: factories and random
  functions (sizes given as ints, numpy ints, 0-d or 1-d tensors, by position
  or keyword), argument-sized numpy functions (``outer``, ``kron``, ``tile``,
  ``repeat``, ``histogram`` bins, ``bincount`` minlength, ...), broadcasting.
- Python arithmetic runs under the interpreter lock and stalls every thread:
  ``3 ** 20_000_000`` or ``'x' * 10**9`` are refused by estimating the
  result's size from the operands before computing it.

Refusals name the limit, never the requested size (it may derive from
private values).
"""
from __future__ import annotations

import inspect
import math
import operator
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import containers
from ..allowlist import LEGACY_CONSTRUCTORS
from ..errors import LimitExceeded, NotAllowed

BIG = 2**62


def _product(values: Iterable[int]) -> int:
    total = 1
    for v in values:
        total *= max(int(v), 0)
        if total > BIG:
            return BIG
    return total


def size_ints(obj: Any) -> List[int]:
    """Integers of a size argument, whatever their form (int, numpy int, 0-d/1-d tensor, list, Size).

    Lists and tuples are searched down to containers.MAX_DEPTH; dicts and anything else give none.
    """
    out: List[int] = []
    for v in containers.leaves(obj, prune=True, is_mapping=containers.never):
        out.extend(_ints(v))
    return out


def _ints(obj: Any) -> List[int]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, np.integer)):
        return [int(obj)]
    if isinstance(obj, torch.Tensor):
        if obj.dtype.is_floating_point or obj.dtype.is_complex or obj.dtype == torch.bool or obj.dim() > 1:
            return []
        return [int(v) for v in obj.reshape(-1)[:64].tolist()]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "iu" or obj.ndim > 1:
            return []
        return [int(v) for v in obj.reshape(-1)[:64].tolist()]
    return []


def elements(size: Any) -> int:
    return _product(size_ints(size))


def itemsize_of(dtype: Any) -> int:
    """Bytes per element of a requested dtype; 8 when none is given (int64 and float64 are the widest defaults)."""
    if dtype is None:
        return 8
    return _itemsize(dtype)


def _itemsize(dtype: Any) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    try:
        return max(np.dtype(dtype).itemsize, 1)
    except TypeError:
        return 8


def check_dtype_arguments(dtypes: Iterable[Any]) -> None:
    """Only numeric dtypes: a fixed-width string dtype ('U1000000') would make every element huge."""
    for v in dtypes:
        if v is None or isinstance(v, torch.dtype):
            continue
        try:
            dt = np.dtype(v)
        except (TypeError, ValueError):
            raise NotAllowed("this dtype is not allowed: only numeric dtypes") from None
        if dt.kind not in "biufc":
                raise NotAllowed("this dtype is not allowed: only numeric dtypes")  # (the dtype may come from private data)


# -- Python arithmetic ------------------------------------------------------------------------
def _bits(v: Any) -> int:
    if isinstance(v, bool):
        return 1
    if isinstance(v, int):
        return max(v.bit_length(), 1)
    if isinstance(v, float):
        return 64
    return 0


def _length(v: Any) -> Optional[int]:
    return len(v) if isinstance(v, (str, bytes, list, tuple)) else None


def check_python_arithmetic(name: str, args: List[Any], max_bits: int, max_items: int) -> None:
    """Refuse operator.* on Python ints, strings and sequences whose result would be huge."""
    short = name.rsplit(".", 1)[-1].lstrip("i") if name.startswith("operator.") else ""
    if not short or len(args) != 2:
        return
    a, b = args
    ints = all(isinstance(x, int) for x in (a, b))
    if short in ("pow",) and ints:
        if b > 0 and _bits(a) > 1 and b * _bits(a) > max_bits:
            raise LimitExceeded(f"the result would have more than {max_bits} bits")
        return
    if short == "lshift" and ints:
        if b > 0 and _bits(a) + b > max_bits:
            raise LimitExceeded(f"the result would have more than {max_bits} bits")
        return
    if short == "mul":
        if ints and _bits(a) + _bits(b) > max_bits:
            raise LimitExceeded(f"the result would have more than {max_bits} bits")
        for seq, n in ((a, b), (b, a)):
            length = _length(seq)
            if length is not None and isinstance(n, int) and not isinstance(n, bool) and length * max(n, 0) > max_items:
                raise LimitExceeded(f"the result would hold more than {max_items} items")
        return
    if short == "add":
        la, lb = _length(a), _length(b)
        if la is not None and lb is not None and la + lb > max_items:
            raise LimitExceeded(f"the result would hold more than {max_items} items")
        if ints and max(_bits(a), _bits(b)) + 1 > max_bits:
            raise LimitExceeded(f"the result would have more than {max_bits} bits")


# -- factories and argument-sized functions without a shadow run -------------------------------
def _bind(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[inspect.BoundArguments]:
    try:
        return inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None


def _shape_of(v: Any) -> Tuple[int, ...]:
    shape = getattr(v, "shape", None)
    if shape is None:
        return ()
    return tuple(int(s) for s in shape)


def _numel(v: Any) -> int:
    return _product(_shape_of(v)) if hasattr(v, "shape") else 1


def requested_elements(name: str, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], target: Any = None) -> int:
    """How many elements a call would allocate, from its arguments (0 when it cannot say)."""
    short = name.rsplit(".", 1)[-1]
    size_kw = kwargs.get("size", kwargs.get("shape"))
    if name in LEGACY_CONSTRUCTORS and not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        return 0  # torch.LongTensor(data): data already in memory, bounded by the wire; sizes are ints only
    if short in ("arange",):
        nums = [float(a) for a in args if isinstance(a, (int, float, np.number)) and not isinstance(a, bool)]
        start, end, step = 0.0, 0.0, 1.0
        if len(nums) == 1:
            end = nums[0]
        elif len(nums) >= 2:
            start, end = nums[0], nums[1]
            step = nums[2] if len(nums) > 2 else 1.0
        start = kwargs.get("start", start)
        end = kwargs.get("end", kwargs.get("stop", end))
        step = kwargs.get("step", step) or 1.0
        try:
            return max(int(math.ceil((float(end) - float(start)) / float(step))), 0)
        except (TypeError, ValueError, OverflowError, ZeroDivisionError):
            return 0
    if short in ("linspace", "logspace"):
        steps = kwargs.get("steps", kwargs.get("num", args[2] if len(args) > 2 else 50))
        return elements(steps)
    if short in ("eye", "identity"):
        n = size_ints(args[:1]) or size_ints(kwargs.get("n", kwargs.get("N", 0)))
        m = size_ints(args[1:2]) or size_ints(kwargs.get("m", kwargs.get("M"))) or n
        return _product(n + m)
    if short in ("full", "new_full"):
        return elements(args[0] if args else size_kw)
    if short in ("repeat", "tile") and (target is not None or args):
        base = target if target is not None else args[0]
        reps = args if target is not None else args[1:2] or [kwargs.get("reps", kwargs.get("repeats", 1))]
        return _product([_numel(base)] + size_ints(list(reps)))
    if name.startswith("numpy.random."):
        bound = _bind(fn, args, kwargs)
        if short in ("rand", "randn"):
            return elements(list(args))
        if short == "permutation":
            x = args[0] if args else kwargs.get("x")
            return int(x) if isinstance(x, (int, np.integer)) and not isinstance(x, bool) else _numel(x)
        if bound is not None and "size" in bound.arguments:
            return elements(bound.arguments["size"])
        return 1
    if short == "randint" and name.startswith("torch."):
        if size_kw is not None:
            return elements(size_kw)
        tail = [a for a in args if isinstance(a, (tuple, list, torch.Size))]
        return elements(tail[-1]) if tail else 1
    if short in ("normal",) and name.startswith("torch."):
        if size_kw is not None:
            return elements(size_kw)
        tail = [a for a in args if isinstance(a, (tuple, list, torch.Size))]
        return elements(tail[-1]) if tail else max((_numel(a) for a in args if isinstance(a, torch.Tensor)), default=1)
    if size_kw is not None:
        return elements(size_kw)
    return elements(list(args))


def numpy_elements(name: str, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> int:
    """Elements a numpy function's result would hold, for those whose size comes from arguments."""
    short = name.rsplit(".", 1)[-1]
    arrays = [a for a in list(args) + list(kwargs.values()) if hasattr(a, "shape")]
    sizes = [_numel(a) for a in arrays]
    if short in ("outer",):
        return _product(sizes[:2])
    if short in ("kron",):
        return _product(sizes[:2])
    if short in ("tile", "repeat"):
        bound = _bind(fn, args, kwargs)
        reps = None
        if bound is not None:
            reps = bound.arguments.get("reps", bound.arguments.get("repeats"))
        base = _numel(args[0]) if args else 1
        return _product([base] + (size_ints(reps) if reps is not None else [1])) if short == "tile" else base * max(
            [1] + size_ints(reps if reps is not None else 1))
    if short in ("histogram",):
        bins = kwargs.get("bins", args[1] if len(args) > 1 else 10)
        return elements(bins) if isinstance(bins, (int, np.integer)) else _numel(bins)
    if short in ("bincount",):
        minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
        data = args[0] if args else kwargs.get("x")
        top = 0
        if isinstance(data, np.ndarray) and data.size and data.dtype.kind in "iu":
            top = int(data.max()) + 1
        return max(elements(minlength), top)
    if short in ("convolve", "correlate"):
        return sum(sizes[:2])
    if short in ("cov", "corrcoef"):
        n = _shape_of(args[0])[0] if args and _shape_of(args[0]) else 1
        return n * n
    if short in ("diag",):
        n = sizes[0] if sizes else 1
        return n * n
    if short in ("tensordot", "einsum", "dot", "matmul", "inner", "vdot"):
        return _contraction_elements(short, args, kwargs)
    if short in ("zeros", "ones", "empty", "full"):
        return elements(args[0] if args else kwargs.get("shape"))
    if isinstance(fn, np.ufunc) and arrays:
        try:
            return _product(np.broadcast_shapes(*[_shape_of(a) for a in arrays]))
        except ValueError:
            return 0
    return 0


def _contraction_elements(short: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> int:
    """Output size of numpy's contractions, by numpy's shape rules (torch's meta kernels for einsum/tensordot)."""
    if short == "vdot":
        return 1
    arrays = [a for a in args if hasattr(a, "shape")]
    if short == "einsum" or short == "tensordot":
        def meta(a: Any) -> torch.Tensor:
            return torch.empty(_shape_of(a), device="meta")
        try:
            if short == "einsum":
                out = torch.einsum(args[0], *[meta(a) for a in arrays])
            else:
                axes = kwargs.get("axes", args[2] if len(args) > 2 else 2)
                out = torch.tensordot(meta(arrays[0]), meta(arrays[1]), dims=axes)
            return out.numel()
        except Exception:
            return _product(_numel(a) for a in arrays)  # could not tell: assume the outer product
    if len(arrays) < 2:
        return 0
    a, b = _shape_of(arrays[0]), _shape_of(arrays[1])
    if not a or not b:
        return _product(a or b)
    if short == "inner":
        return _product(a[:-1] + b[:-1])
    if short == "dot" and len(b) >= 2:
        return _product(a[:-1] + b[:-2] + b[-1:])
    if short == "dot":
        return _product(a[:-1])
    if len(a) == 1 or len(b) == 1:  # matmul with a vector
        return _product((a[:-1] if len(b) == 1 else b[:-2] + b[-1:]) or (1,))
    try:
        batch = np.broadcast_shapes(a[:-2], b[:-2])
    except ValueError:
        return 0
    return _product(tuple(batch) + (a[-2], b[-1]))


# Splits made of many small dispatched slices (numpy's, and torch's tensor_split family), which
# no single dispatched call shows whole. unbind, split and chunk are one call each: check_pieces.
_SLICED_SPLITS = frozenset({"tensor_split", "hsplit", "vsplit", "dsplit"})
_NUMPY_SPLITS = frozenset({"split", "array_split"}) | _SLICED_SPLITS


def _sections(spec: Any) -> int:
    """How many pieces a split into `spec` makes: a number of sections, or cut points (n + 1 pieces)."""
    if isinstance(spec, (list, tuple)):
        return len(spec) + 1
    if isinstance(spec, (torch.Tensor, np.ndarray)) and spec.ndim == 1:
        return int(spec.shape[0]) + 1
    ints = size_ints(spec)
    return ints[0] if ints and ints[0] > 0 else 1


def check_outputs(name: str, target: Any, args: List[Any], kwargs: Dict[str, Any], max_objects: int,
                  max_pieces: int) -> None:
    """Refuse a call whose result would hold too many Python objects: tolist (`max_objects`),
    and the splits no dispatched call shows whole (`max_pieces` tensors or arrays).

    Counted from shapes before anything is built: a (10**7, 0) tensor's tolist makes ten
    million lists from zero bytes, under the interpreter lock.
    """
    short = name.rsplit(".", 1)[-1]
    subject = target if target is not None else (args[0] if args else None)
    if not hasattr(subject, "shape"):
        return
    if short == "tolist":
        shape = _shape_of(subject)
        count, limit = _product(shape) + (_product(shape[:-1]) if len(shape) > 1 else 0), max_objects
    elif short in (_NUMPY_SPLITS if name.startswith("numpy.") else _SLICED_SPLITS):
        rest = list(args if target is not None else args[1:])
        spec = rest[0] if rest else next((kwargs[k] for k in ("indices_or_sections", "sections", "indices")
                                          if k in kwargs), 1)
        count, limit = _sections(spec), max_pieces
    else:
        return
    if count > limit:
        raise LimitExceeded(f"{short} would make more than {limit} objects")


def check_elements(n: int, limit: int, label: str) -> None:
    if n > limit:
        raise LimitExceeded(f"{label} would allocate more than {limit} elements")


# -- the shadow run's allocations ------------------------------------------------------------
# Operations whose one C++ call makes a Python tensor per piece, holding the interpreter lock.
_SPLITTING = frozenset({"aten::unbind", "aten::split", "aten::split_with_sizes", "aten::unsafe_split",
                        "aten::unsafe_split_with_sizes", "aten::chunk", "aten::unsafe_chunk"})
MAX_PIECES = 65_536  # about a quarter of a second of tensor objects


def check_pieces(func: Any, args: tuple, kwargs: Dict[str, Any]) -> None:
    """Inside any run (models, plans, shadow runs): refuse a split into more than MAX_PIECES
    tensors before it makes them."""
    name = func._schema.name
    if name not in _SPLITTING:
        return
    names = [a.name for a in func._schema.arguments]
    values = dict(zip(names, args))
    values.update(kwargs)
    subject, dim = values.get("self"), values.get("dim") or 0
    if not isinstance(subject, torch.Tensor) or not isinstance(dim, int) or not -subject.dim() <= dim < max(subject.dim(), 1):
        return
    length = subject.shape[dim] if subject.dim() else 1
    if name == "aten::unbind":
        pieces = length
    elif "sizes" in name:
        pieces = len(values.get("split_sizes") or ())
    elif "chunk" in name:
        pieces = min(int(values.get("chunks") or 1), max(length, 1))
    else:
        size = values.get("split_size")
        pieces = -(-length // size) if isinstance(size, int) and size > 0 else 1
    if pieces > MAX_PIECES:
        raise LimitExceeded(f"{name.split('::')[-1]} would make more than {MAX_PIECES} tensors")


class SizeMeter(TorchDispatchMode):
    """During a shadow run on meta tensors: the largest single allocation and the peak held at once, in bytes."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # nothing is compiled on the owner; torch's guard costs ~15 us per operation

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.largest_elements = 0
        self.total = 0
        self.live = 0
        self.peak = 0  # what the real run would hold at its fullest (intermediates freed as they die)
        self.random = False  # the run drew random numbers (so the real one must get the scientist's generator)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        check_pieces(func, args, kwargs or {})
        out = func(*args, **(kwargs or {}))
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.random = True
        returns = func._schema.returns
        for i, t in enumerate(_tensors(out)):
            if i < len(returns) and returns[i].alias_info is None:  # views and in-place results allocate nothing
                n = t.nelement()
                b = n * t.element_size()
                self.total += b
                self.live += b
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._freed, b)
                if b > self.largest:
                    self.largest = b
                if n > self.largest_elements:
                    self.largest_elements = n
        return out


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


# operator functions a Python number or sequence may reach, for the arithmetic bound
PYTHON_OPERATORS = frozenset(n for n in dir(operator) if not n.startswith("_"))
