"""Image data: scikit-learn's bundled digits and Fashion-MNIST from the Debian package, as tensors.

Images are ``float32`` in ``[0, 1]`` of shape ``(N, 1, H, W)``; labels are ``int64``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from specdef.errors import SpecdefError

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FashionMnistMissing(SpecdefError):
    """The Debian package ``dataset-fashion-mnist`` is not installed."""


def stable_order(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on ``seed``: indices sorted by the SHA-256 of
    ``"seed:index"``. Unlike a library RNG it cannot change with a NumPy or PyTorch release."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits: images ``(1797, 1, 8, 8)`` scaled from 0..16 to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def fashion_mnist_available(root: Path = FASHION_MNIST_DIR) -> bool:
    return all((root / f).is_file() for pair in _FASHION_FILES.values() for f in pair)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist_tensors(
    split: str, *, root: Path = FASHION_MNIST_DIR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` (``"train"``: 60000, ``"test"``: 10000) as ``(N, 1, 28, 28)`` images."""
    if not fashion_mnist_available(root):
        raise FashionMnistMissing(
            f"Fashion-MNIST is not installed (expected idx.gz files in {str(root)!r}); install it "
            f"with: {FASHION_MNIST_INSTALL}"
        )
    images, labels = (_read_idx(root / f) for f in _FASHION_FILES[split])
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
