"""Published assets: what the owner offers, described but never shown."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import containers
from ..text import is_clean
from ..tables import html_table, store_headers, store_rows, text_table
from . import frames
from .privacy.facts import Declared, declare

MAX_NAME = 64
MAX_PYTHON_ITEMS = 1_000_000  # numbers in a published list or dict, all levels together
# Published Python values are numbers in small tables; publishing refuses deeper nesting, and
# holds_numbers answers "yes" beyond it.
MAX_PYTHON_DEPTH = 4


def check_name(name: Any) -> None:
    """Asset names are display names (spaces allowed): 1-64 printable characters, no edge spaces."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or name != name.strip() or not is_clean(name):
        raise ValueError(
            f"asset name {name!r} is not valid: use 1-{MAX_NAME} printable characters (spaces allowed, "
            "but not at the start or end; no control characters)"
        )


def check_python_value(value: Any) -> None:
    """A Python value an owner may publish: numbers, lists/tuples of them, dicts of tensors/arrays/numbers."""
    count = 0

    def too_big() -> TypeError:
        return TypeError(f"cannot publish this value: more than {MAX_PYTHON_ITEMS} items or nested deeper than {MAX_PYTHON_DEPTH}")

    def visit(value: Any, inner: Callable[[Any], None]) -> None:
        nonlocal count
        count += 1
        if count > MAX_PYTHON_ITEMS:
            raise too_big()
        if isinstance(value, (bool, int, float)):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
                raise TypeError("cannot publish an int that does not fit in 64 bits")
            return
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.device.type != "cpu":
                raise TypeError("cannot publish a sparse or non-CPU tensor")
            return
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biufc":
                raise TypeError(f"cannot publish an array of dtype {value.dtype}: only numeric arrays")
            return
        if isinstance(value, (list, tuple)):
            for v in value:
                inner(v)
            return
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str) or not is_clean(k) or len(k) > 256:
                    raise TypeError(f"cannot publish a dict with key {k!r}: keys are short printable strings")
                inner(v)
            return
        raise TypeError(
            f"cannot publish a {type(value).__name__}: publish a torch.Tensor, a numpy.ndarray, a dataset, a DataFrame, "
            "or numbers, lists/tuples of them and dicts of these"
        )

    containers.walk(value, visit, max_depth=MAX_PYTHON_DEPTH, too_deep=too_big)


def is_python_value(value: Any) -> bool:
    return isinstance(value, (bool, int, float, list, tuple, dict))


def holds_numbers(value: Any) -> bool:
    """Whether Python numbers are inside: they are values, yet a shadow run would pass them on as metadata.

    A value nested deeper than MAX_PYTHON_DEPTH is taken to hold numbers.
    """
    try:
        return any(isinstance(v, (bool, int, float)) for v in containers.leaves(value, max_depth=MAX_PYTHON_DEPTH))
    except containers.TooDeep:
        return True


@dataclass
class Asset:
    """A published value. Its name, description, tags, type, shape and dtype are public; its values are not."""

    name: str
    value: Any = field(repr=False)  # never in a repr: reprs reach logs
    description: str = ""
    tags: Tuple[str, ...] = field(default_factory=tuple)
    # Differential privacy: declared bounds and unit axis (tensors, arrays), or one item per
    # person (datasets, for DP training). Declarations, not data: they are shown to scientists.
    privacy: Optional[Declared] = None
    items_are_people: bool = False

    @property
    def type_name(self) -> str:
        if isinstance(self.value, torch.Tensor):
            return "Tensor"
        if isinstance(self.value, np.ndarray):
            return "ndarray"
        if isinstance(self.value, torch.nn.Module):
            return "Module"  # (not its class: the architecture is the owner's)
        return type(self.value).__name__

    @property
    def shape(self) -> Optional[Tuple[int, ...]]:
        if isinstance(self.value, (list, tuple)):
            return (len(self.value),)  # how many items, as public as a tensor's shape
        shape = getattr(self.value, "shape", None)
        return tuple(int(s) for s in shape) if shape is not None else None

    @property
    def dtype(self) -> Optional[str]:
        dtype = getattr(self.value, "dtype", None)
        return str(dtype).replace("torch.", "") if dtype is not None else None

    def public_info(self) -> Dict[str, Any]:
        """What a scientist may see about this asset."""
        return {
            "name": self.name,
            "description": self.description,
            "tags": list(self.tags),
            "type": self.type_name,
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": self.dtype,
            **frames.listing(self.value),  # a frame's column names and dtypes
            **({"keys": list(self.value)} if isinstance(self.value, dict) else {}),  # like a frame's column names
            **({"dp": self.privacy.public()} if self.privacy is not None else {}),
            **({"dp": {"unit": "item"}} if self.items_are_people else {}),
        }


SUPPORTED = (torch.Tensor, np.ndarray)


def _check_module(module: torch.nn.Module) -> None:
    """A published model: its weights dense CPU tensors, so a scientist's copy is an ordinary model."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.layout != torch.strided or t.device.type != "cpu":
            raise TypeError("cannot publish a model with sparse or non-CPU weights")


class AssetStore:
    """The owner's published assets, by name."""

    def __init__(self) -> None:
        self._assets: Dict[str, Asset] = {}
        self._lock = threading.Lock()
        self._listeners: List[Any] = []

    def add(self, value: Any, name: str, description: str = "", tags: Sequence[str] = (), *,
            bounds: Any = None, privacy_unit: Any = None, missing: bool = False) -> Asset:
        """Publish a tensor, array, dataset, DataFrame, model (nn.Module) or Python numbers/lists/dicts
        under a display name. A model's weights and architecture are private like any asset's values:
        scientists call it on their pointers (or ciphertexts) and its outputs need approval.

        Differential privacy (optional): `bounds=(lo, hi)` (or one `(lo, hi)` per column) declares
        the range of every value of a tensor or array, so aggregates of it can be released with
        noise (`pointer.get(dp=epsilon)`); values outside the bounds are refused here, and so is
        NaN unless `missing=True` says values may be missing. The unit of privacy is one row
        (`privacy_unit="row"`, or an axis number for another axis). For a dataset,
        `privacy_unit="item"` declares one item per person, for DP training.
        """
        check_name(name)
        declared, items_are_people = _privacy_declaration(value, bounds, privacy_unit, missing)
        if is_python_value(value):
            check_python_value(value)
        elif frames.kind(value) is not None:
            frames.check_publishable(value)  # a DataFrame or Series of bool/numeric columns; TypeError otherwise
        elif isinstance(value, torch.nn.Module):
            _check_module(value)
        elif not isinstance(value, SUPPORTED) and not _is_dataset(value):
            raise TypeError(
                f"cannot publish a {type(value).__name__}: publish a torch.Tensor, a numpy.ndarray or a dataset"
            )
        if isinstance(value, np.ndarray) and value.dtype.kind not in "biufc":
            raise TypeError(f"cannot publish an array of dtype {value.dtype}: only numeric arrays")
        asset = Asset(name=name, value=value, description=str(description), tags=tuple(str(t) for t in tags),
                      privacy=declared, items_are_people=items_are_people)
        with self._lock:
            if name in self._assets:
                raise ValueError(f"an asset named {name!r} is already published; remove it first")
            self._assets[name] = asset
        self._notify()
        return asset

    def remove(self, name: str) -> None:
        with self._lock:
            if self._assets.pop(name, None) is None:
                raise KeyError(f"no asset named {name!r}")
        self._notify()

    def get(self, name: str) -> Asset:
        with self._lock:
            asset = self._assets.get(name)
        if asset is None:
            raise KeyError(f"no asset named {name!r}; published: {', '.join(self.names()) or 'none'}")
        return asset

    __getitem__ = get

    def names(self) -> List[str]:
        with self._lock:
            return list(self._assets)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._assets

    def __len__(self) -> int:
        with self._lock:
            return len(self._assets)

    def __iter__(self):
        with self._lock:
            return iter(list(self._assets.values()))

    def listing(self) -> List[Dict[str, Any]]:
        with self._lock:
            return [a.public_info() for a in self._assets.values()]

    def subscribe(self, callback: Any) -> None:
        """Call back (with no arguments) whenever the set of assets changes."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for cb in list(self._listeners):
            cb()

    def _rows(self) -> List[List[Any]]:
        return store_rows(self.listing())

    def __repr__(self) -> str:
        return text_table(store_headers(self.listing()), self._rows(), title="Published assets")

    def _repr_html_(self) -> str:
        return html_table(store_headers(self.listing()), self._rows(), title="Published assets")


def _privacy_declaration(value: Any, bounds: Any, unit: Any, missing: bool) -> Tuple[Optional[Declared], bool]:
    """Check an owner's DP declaration (TypeError or ValueError for the owner; nothing is published)."""
    if unit == "item":
        if bounds is not None or not _is_dataset(value) or isinstance(value, (torch.Tensor, np.ndarray)):
            raise ValueError('privacy_unit="item" is for datasets (one item per person); '
                             "a tensor or array declares bounds= instead")
        return None, True
    if bounds is None:
        if unit is not None or missing:
            raise ValueError("privacy_unit and missing need bounds= (the range of every value) for a tensor or array")
        return None, False
    if unit is None or unit == "row":
        axis = 0
    elif isinstance(unit, int) and not isinstance(unit, bool):
        axis = unit
    else:
        raise ValueError('privacy_unit must be "row", an axis number, or "item" (datasets)')
    return declare(value, bounds, axis, missing=bool(missing)), False


def _is_dataset(value: Any) -> bool:
    return isinstance(value, torch.utils.data.Dataset) and hasattr(value, "__len__")
