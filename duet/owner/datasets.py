"""Remote data loading on the owner: batches of a published dataset, made where the data lives.

A scientist opens a loader on a published dataset (a torch ``Dataset`` with
``__len__``, e.g. ``duet.datasets.MNIST`` or a ``TensorDataset``). Each epoch
draws its own order from a ``torch.Generator`` the owner seeds (from the
scientist's seed when given: an order of indices reveals no values); each
``batch`` message stores the next batch under ids the scientist chose, with
the dataset's name in its lineage. No sample leaves the owner.
"""
from __future__ import annotations

import secrets
from typing import Any, Dict, List, Optional

import torch

from ..errors import NotAllowed
from .executor import make_safe

MAX_LOADERS = 256
MAX_BATCH = 1 << 20


class OwnerLoader:
    """Batches of one dataset for one scientist."""

    def __init__(self, name: str, dataset: Any, batch_size: int, shuffle: bool, drop_last: bool, seed: Optional[int]) -> None:
        if type(batch_size) is not int or not 1 <= batch_size <= MAX_BATCH:
            raise NotAllowed(f"batch_size must be an int between 1 and {MAX_BATCH}")
        if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
            raise NotAllowed("seed must be a non-negative int")
        self.name = name
        self.dataset = dataset
        self.n = len(dataset)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        self.tensors = dataset.tensors if isinstance(dataset, torch.utils.data.TensorDataset) else None
        first = dataset[0] if self.n else ()
        self.single = not isinstance(first, (tuple, list))
        self.fields = 1 if self.single else len(first)
        self.order: Optional[torch.Tensor] = None
        self.pos = 0

    @property
    def batches(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def info(self) -> Dict[str, Any]:
        return {"batches": self.batches, "size": self.n, "fields": self.fields, "single": self.single}

    def start_epoch(self) -> None:
        if self.shuffle:
            self.order = torch.randperm(self.n, generator=self.generator)
        else:
            self.order = torch.arange(self.n)
        self.pos = 0

    def next_batch(self) -> List[Any]:
        if self.order is None:
            self.start_epoch()
        assert self.order is not None
        idx = self.order[self.pos:self.pos + self.batch_size]
        if len(idx) == 0 or (self.drop_last and len(idx) < self.batch_size):
            raise NotAllowed(f"the epoch of loader {self.name!r} is over; start a new one")
        self.pos += len(idx)
        if self.tensors is not None:
            values = [t[idx] for t in self.tensors]  # indexing copies: the asset itself is never shared
        else:
            samples = [self.dataset[int(i)] for i in idx]
            batch = torch.utils.data.default_collate(samples)
            values = [batch] if self.single else list(batch)
        if len(values) != self.fields:
            raise NotAllowed(f"dataset {self.name!r} returned samples of varying structure")
        try:
            return [make_safe(v, f"{self.name} batch") for v in values]
        except NotAllowed:  # the refusal would name a type or dtype of private samples
            raise NotAllowed(f"dataset {self.name!r} produced samples Duet does not keep") from None
