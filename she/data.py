"""Reading MNIST-style IDX files (plain or gzipped).

The IDX format: a 4-byte magic ``0x00 0x00 <dtype> <ndim>``, then ``ndim`` big-endian
uint32 dimensions, then the data in C order.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

from .errors import DataError

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: File names tried for each split, in order.
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally ``.gz``) into a numpy array.

    Raises :class:`DataError` if the file is missing, truncated or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header promises {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory}: neither {stem} nor {stem}.gz found")


def load_idx_dataset(directory: str | Path, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Load an MNIST-style split from ``directory``.

    Returns ``(images, labels)`` with images as float32 in ``[0, 1]`` of shape
    ``(n, 1, rows, cols)`` and labels as int64 of shape ``(n,)``.
    """
    if split not in _SPLIT_FILES:
        raise DataError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_FILES)}")
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory not found: {directory}")
    image_stem, label_stem = _SPLIT_FILES[split]
    images = read_idx(_find(directory, image_stem))
    labels = read_idx(_find(directory, label_stem))
    if images.ndim != 3:
        raise DataError(f"{directory}: expected images of shape (n, rows, cols), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{directory}: {images.shape[0]} images but labels of shape {labels.shape}"
        )
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return x, labels.astype(np.int64)
