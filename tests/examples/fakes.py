"""Small datasets in the real distribution formats, for the examples' tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx_gz(path: Path, arr: np.ndarray) -> None:
    """The official IDX layout: magic 2051 (images, 3 dims) / 2049 (labels, 1 dim), big-endian sizes."""
    magic = {3: 2051, 1: 2049}[arr.ndim]
    header = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def fake_idx_dataset(root: Path, name: str, n_train: int, n_test: int) -> Path:
    """``root/name/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` with random 28x28 images."""
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return root
