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

from ..errors import DataError

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


# -- data in a model's input layout ---------------------------------------------------------

#: Image file suffixes read from an image folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Split sub-folders of an image-folder data set, in the order tried.
_FOLDER_SPLITS = {"train": ("train",), "test": ("test", "val", "valid", "validation")}


def to_layout(images: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Images ``(n, H, W)`` or ``(n, H, W, C)`` arranged as a model's input ``shape``
    (one sample's): NCHW ``(C, H, W)``, NHWC ``(H, W, C)``, ``(H, W)`` or flat
    ``(H * W * C,)``. Raises :class:`DataError` when the layout cannot be inferred."""
    images = np.asarray(images, dtype=np.float32)
    n, h, w = images.shape[:3]
    c = 1 if images.ndim == 3 else images.shape[3]
    hwc = images.reshape(n, h, w, c)
    layouts = {"NCHW": ((c, h, w), lambda: np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))),
               "NHWC": ((h, w, c), lambda: hwc),
               "HW": ((h, w), lambda: hwc.reshape(n, h, w)),
               "flat": ((h * w * c,), lambda: hwc.reshape(n, -1))}
    matches = [name for name, (want, _) in layouts.items()
               if tuple(shape) == want and (name != "HW" or c == 1)]
    if not matches:
        raise DataError(f"cannot infer how to feed {h}x{w} images with {c} channel(s) to a model "
                        f"whose input is {tuple(shape)} per sample (known layouts: NCHW "
                        f"{(c, h, w)}, NHWC {(h, w, c)}, flat {(h * w * c,)}); give the data "
                        "as --train/--eval .npz arrays in the model's own layout")
    if len(matches) > 1 and c > 1:
        raise DataError(f"input shape {tuple(shape)} is ambiguous (both NCHW and NHWC); give "
                        "the data as --train/--eval .npz arrays in the model's own layout")
    return layouts[matches[0]][1]()


def image_size(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(H, W, C)`` of a model input shape that holds images, when it can be told."""
    if len(shape) == 3 and shape[0] in (1, 3) and shape[2] not in (1, 3):
        return shape[1], shape[2], shape[0]
    if len(shape) == 3 and shape[2] in (1, 3):
        return shape[0], shape[1], shape[2]
    if len(shape) == 2:
        return shape[0], shape[1], 1
    return None


def read_image_folder(directory: str | Path, size: tuple[int, int, int] | None = None,
                      classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a folder with one sub-folder of images per class (torchvision's ImageFolder
    layout; classes numbered in sorted order): returns raw pixels ``(n, H, W[, C])``
    (uint8), labels and the class names. ``size`` ``(H, W, C)`` resizes and converts every
    image (C=1: grayscale, 3: RGB); without it all images must share one size."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise DataError("reading image folders needs Pillow: pip install 'she[serve]'") from exc
    directory = Path(directory)
    names = classes or sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not names:
        raise DataError(f"{directory}: no class sub-folders (expected DIR/<class>/<image>.png)")
    images, labels = [], []
    for label, name in enumerate(names):
        folder = directory / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if folder.is_dir() else []
        for path in files:
            try:
                with Image.open(path) as img:
                    if size is not None:
                        img = img.convert("L" if size[2] == 1 else "RGB")
                        img = img.resize((size[1], size[0]))
                    images.append(np.asarray(img, dtype=np.uint8))
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"{path}: not a readable image ({exc})") from exc
            labels.append(label)
    if not images:
        raise DataError(f"{directory}: no {'/'.join(IMAGE_SUFFIXES)} images in its class folders")
    if len({img.shape for img in images}) > 1:
        raise DataError(f"{directory}: images of different sizes; the model's input size is "
                        "needed to resize them")
    return np.stack(images), np.asarray(labels, np.int64), names


def load_dataset(directory: str | Path, split: str, shape: tuple[int, ...],
                 scale: float = 1 / 255) -> tuple[np.ndarray, np.ndarray] | None:
    """A labelled split of a data set directory, in a model's input layout and scale.

    ``directory`` holds MNIST-style IDX files, or images in class folders: ``train/<class>/``
    and ``test/<class>/`` (or ``val/``), or the class folders directly (all of it is then
    the training split and there is no test split). Pixels are multiplied by ``scale``
    (default 1/255) and arranged as ``shape`` (:func:`to_layout`). Returns None for a
    split the directory does not have.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory not found: {directory}")
    if split not in _SPLIT_FILES:
        raise DataError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_FILES)}")
    stem = _SPLIT_FILES[split][0]
    if (directory / stem).is_file() or (directory / f"{stem}.gz").is_file():
        images = read_idx(_find(directory, stem))
        labels = read_idx(_find(directory, _SPLIT_FILES[split][1])).astype(np.int64)
        if labels.shape != images.shape[:1]:
            raise DataError(f"{directory}: {len(images)} images but labels of shape {labels.shape}")
    elif any((directory / stem).is_file() or (directory / f"{stem}.gz").is_file()
             for stem, _ in _SPLIT_FILES.values()):
        return None
    else:
        folders = [directory / name for name in _FOLDER_SPLITS[split] if (directory / name).is_dir()]
        has_splits = any((directory / name).is_dir() for names in _FOLDER_SPLITS.values()
                         for name in names)
        if not folders and has_splits:
            return None
        if not folders and split == "test":
            return None
        size = image_size(shape)
        train_dir = directory / "train" if has_splits else directory
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir()) \
            if train_dir.is_dir() else None
        images, labels, _ = read_image_folder(folders[0] if folders else directory, size, classes)
    return to_layout(images.astype(np.float32) * np.float32(scale), shape), labels


def arrange(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Samples ``x`` as a model's input ``shape``: unchanged when they already have it,
    otherwise read as images (NCHW ``(n, 1|3, H, W)``, NHWC or ``(n, H, W)``) and arranged
    with :func:`to_layout`."""
    x = np.asarray(x)
    if x.shape[1:] == tuple(shape):
        return x
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        x = np.moveaxis(x, 1, -1)
    if x.ndim not in (3, 4):
        raise DataError(f"samples of shape {x.shape[1:]} cannot be fed to a model whose input "
                        f"is {tuple(shape)}")
    return to_layout(x, shape)
