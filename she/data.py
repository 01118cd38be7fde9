"""Reading MNIST-style IDX files (plain or gzipped).

The IDX format: a 4-byte magic ``0x00 0x00 <dtype> <ndim>``, then ``ndim`` big-endian
uint32 dimensions, then the data in C order.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import BinaryIO

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


#: Largest IDX data accepted (bytes after decompression; MNIST's training images: 47 MB).
MAX_IDX_BYTES = 1 << 30


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally ``.gz``) into a numpy array.

    The file is read as a stream: the header first, then exactly the data it promises
    (at most :data:`MAX_IDX_BYTES`), so a small gzip file cannot expand without bound.
    Raises :class:`DataError` if the file is missing, truncated, oversized or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as stream:
            return _read_idx_stream(stream, path)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc}") from exc


def _read_idx_stream(stream: BinaryIO, path: Path) -> np.ndarray:
    head = stream.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(head[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX data type 0x{head[2]:02x}")
    ndim = head[3]
    dims = stream.read(4 * ndim)
    if ndim == 0 or len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    expected = math.prod(shape) * dtype.itemsize
    if expected > MAX_IDX_BYTES:
        raise DataError(f"{path}: IDX header promises {shape} ({expected} bytes of data), more "
                        f"than the {MAX_IDX_BYTES} this reader accepts")
    raw = stream.read(expected + 1)
    if len(raw) != expected:
        held = str(len(raw))
        if len(raw) > expected:  # count the rest without holding it, up to the limit
            total = len(raw)
            while total <= MAX_IDX_BYTES and (chunk := stream.read(1 << 20)):
                total += len(chunk)
            held = str(total) if total <= MAX_IDX_BYTES else f"more than {MAX_IDX_BYTES}"
        raise DataError(f"{path}: IDX header promises {shape} ({expected} bytes of data) "
                        f"but the file holds {held}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


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
