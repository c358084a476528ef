"""Datasets an owner can publish: MNIST read from the canonical IDX files.

    from duet.datasets import MNIST
    owner.store.add(MNIST(train=True), name="mnist-train")

The files are found in, in order: ``root`` if given; ``$DUET_MNIST_DIR``;
``shared/data/mnist`` or ``data/mnist`` in the working directory or any parent
(so ``../shared/data/mnist`` is found from a project checkout); and in each
of those places also the torchvision layout ``<dir>/MNIST/raw/``. Files may be
gzip-compressed (``*.gz``) or not. Nothing is downloaded.

Images are normalised like the usual torchvision transform,
``(x / 255 - 0.1307) / 0.3081``, as float32 ``[N, 1, 28, 28]``; labels are int64.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch

MEAN, STD = 0.1307, 0.3081
FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}


def _candidates(root: Optional[str | os.PathLike]) -> List[Path]:
    bases: List[Path] = []
    if root is not None:
        bases.append(Path(root))
    env = os.environ.get("DUET_MNIST_DIR")
    if env:
        bases.append(Path(env))
    here = Path.cwd().resolve()
    for p in [here, *here.parents]:
        bases += [p / "shared" / "data" / "mnist", p / "data" / "mnist", p / "data"]
    out: List[Path] = []
    for b in bases:
        out += [b, b / "MNIST" / "raw", b / "raw"]
    return out


def _find(stem: str, dirs: Iterable[Path]) -> Optional[Path]:
    for d in dirs:
        for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
            p = d / name
            if p.is_file():
                return p
    return None


def find_mnist(root: Optional[str | os.PathLike] = None, train: bool = True) -> Tuple[Path, Path]:
    """Paths of the images and labels files, or FileNotFoundError saying where we looked."""
    images, labels, _ = FILES[train]
    dirs = _candidates(root)
    if root is not None:  # an explicit root is searched alone
        dirs = [d for d in dirs if str(d).startswith(str(Path(root)))]
    img, lab = _find(images, dirs), _find(labels, dirs)
    if img is None or lab is None:
        looked = ", ".join(str(d) for d in dirs[:6])
        raise FileNotFoundError(
            f"MNIST files {images}(.gz) and {labels}(.gz) not found; looked in {looked}, ...; "
            "pass root= or set DUET_MNIST_DIR (no download is attempted)"
        )
    return img, lab


def _read(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx_images(path: Path) -> np.ndarray:
    raw = _read(path)
    if len(raw) < 16 or int.from_bytes(raw[0:4], "big") != 2051:
        raise ValueError(f"{path} is not an IDX image file (magic 2051)")
    n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    if len(raw) != 16 + n * rows * cols:
        raise ValueError(f"{path} is truncated or has trailing bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    raw = _read(path)
    if len(raw) < 8 or int.from_bytes(raw[0:4], "big") != 2049:
        raise ValueError(f"{path} is not an IDX label file (magic 2049)")
    n = int.from_bytes(raw[4:8], "big")
    if len(raw) != 8 + n:
        raise ValueError(f"{path} is truncated or has trailing bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=8)


class MNIST(torch.utils.data.TensorDataset):
    """MNIST as two tensors: normalised images [N,1,28,28] float32 and labels [N] int64."""

    def __init__(self, root: Optional[str | os.PathLike] = None, train: bool = True, limit: Optional[int] = None) -> None:
        img_path, lab_path = find_mnist(root, train)
        images, labels = read_idx_images(img_path), read_idx_labels(lab_path)
        expected = FILES[train][2]
        if images.shape != (expected, 28, 28) or labels.shape != (expected,):
            raise ValueError(f"unexpected MNIST sizes {images.shape} / {labels.shape} in {img_path.parent}")
        if labels.max() > 9:
            raise ValueError("MNIST labels out of range")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        x = torch.from_numpy(images.astype(np.float32)).div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
        y = torch.from_numpy(labels.astype(np.int64))
        super().__init__(x, y)
        self.train = train
        self.root = img_path.parent

    @property
    def data(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def targets(self) -> torch.Tensor:
        return self.tensors[1]

    def __repr__(self) -> str:
        return f"MNIST({'train' if self.train else 'test'}, {len(self)} images from {self.root})"
