"""Published assets: what the owner offers, described but never shown."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..tables import STORE_HEADERS, html_table, store_rows, text_table
from . import frames

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")


@dataclass
class Asset:
    """A published value. Its name, description, tags, type, shape and dtype are public; its values are not."""

    name: str
    value: Any
    description: str = ""
    tags: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def type_name(self) -> str:
        if isinstance(self.value, torch.Tensor):
            return "Tensor"
        if isinstance(self.value, np.ndarray):
            return "ndarray"
        return type(self.value).__name__

    @property
    def shape(self) -> Optional[Tuple[int, ...]]:
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
        }


SUPPORTED = (torch.Tensor, np.ndarray)


class AssetStore:
    """The owner's published assets, by name."""

    def __init__(self) -> None:
        self._assets: Dict[str, Asset] = {}
        self._lock = threading.Lock()
        self._listeners: List[Any] = []

    def add(self, value: Any, name: str, description: str = "", tags: Sequence[str] = ()) -> Asset:
        """Publish a tensor, array or dataset under a name scientists use to point at it."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"asset name {name!r} is not valid: use 1-64 letters, digits, '_', '-' or '.', starting with a letter, digit or '_'"
            )
        if frames.kind(value) is not None:
            frames.check_publishable(value)  # a DataFrame or Series of bool/numeric columns; TypeError otherwise
        elif not isinstance(value, SUPPORTED) and not _is_dataset(value):
            raise TypeError(
                f"cannot publish a {type(value).__name__}: publish a torch.Tensor, a numpy.ndarray or a dataset"
            )
        if isinstance(value, np.ndarray) and value.dtype.kind not in "biufc":
            raise TypeError(f"cannot publish an array of dtype {value.dtype}: only numeric arrays")
        asset = Asset(name=name, value=value, description=str(description), tags=tuple(str(t) for t in tags))
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
        return text_table(STORE_HEADERS, self._rows(), title="Published assets")

    def _repr_html_(self) -> str:
        return html_table(STORE_HEADERS, self._rows(), title="Published assets")


def _is_dataset(value: Any) -> bool:
    return isinstance(value, torch.utils.data.Dataset) and hasattr(value, "__len__")
