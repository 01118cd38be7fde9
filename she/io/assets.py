"""The demo model and sample digits shipped inside the package (no download needed)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import DataError


def demo_model_path() -> Path:
    """Path of the shipped HE-friendly MNIST model (trained by ``converters/train_demo.py``)."""
    return Path(str(resources.files("she") / "assets" / "mnist_demo.onnx"))


def tutorial_model_path() -> Path:
    """Path of the TenSEAL-tutorial MNIST network (float weights, trained by
    ``converters/train_tutorial.py``): the network of the plain-TenSEAL peer benchmarks."""
    return Path(str(resources.files("she") / "assets" / "tutorial_cnn.onnx"))


def asset_path(filename: str) -> Path:
    """Path of a file shipped in ``she/assets`` (it may be absent: check ``.exists()``)."""
    return Path(str(resources.files("she") / "assets" / filename))


def demo_samples() -> tuple[np.ndarray, np.ndarray]:
    """The shipped MNIST test digits: float images ``(n, 1, 28, 28)`` in [0, 1] and labels."""
    resource = resources.files("she") / "assets" / "mnist_samples.npz"
    with resources.as_file(resource) as path, np.load(path) as data:
        images, labels = data["images"], data["labels"]
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)


def load_inputs(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples from an ``.npz`` (``images``/``x`` and optional ``labels``/``y``) or ``.npy``.

    Integer images are taken as 8-bit pixels and scaled to [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy/.npz file ({exc})") from exc
    if isinstance(loaded, np.ndarray):
        x, y = loaded, None
    else:
        with loaded:
            keys = set(loaded.files)
            xkey = next((k for k in ("images", "x", "inputs") if k in keys), None)
            if xkey is None:
                raise DataError(f"{path}: no 'images', 'x' or 'inputs' array (has {sorted(keys)})")
            x = loaded[xkey]
            ykey = next((k for k in ("labels", "y") if k in keys), None)
            y = loaded[ykey] if ykey else None
    if x.dtype.kind in "ui":
        x = x.astype(np.float32) / 255.0
    elif x.dtype.kind != "f":
        raise DataError(f"{path}: inputs must be numeric, got dtype {x.dtype}")
    return x, (None if y is None else np.asarray(y).astype(np.int64))
