"""IDX reading: real MNIST, and clear errors for broken files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from she.data import load_idx_dataset, read_idx
from she.errors import DataError


def test_real_mnist_test_split(mnist_dir):
    x, y = load_idx_dataset(mnist_dir, "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.99
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))


def test_plain_and_gzipped_files_agree(mnist_dir, tmp_path):
    raw = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "labels").write_bytes(raw)
    assert np.array_equal(read_idx(tmp_path / "labels"),
                          read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz"))


def _idx(dims: list[int], dtype: int = 0x08, payload: bytes | None = None) -> bytes:
    header = bytes([0, 0, dtype, len(dims)]) + np.array(dims, dtype=">u4").tobytes()
    return header + (payload if payload is not None else bytes(int(np.prod(dims))))


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02\x08\x01" + bytes(8), "magic"),
    (_idx([4], dtype=0x07), "data type"),
    (bytes([0, 0, 8, 3, 0, 0]), "truncated"),
    (_idx([4, 4], payload=bytes(10)), "promises"),
    (b"", "magic"),
])
def test_broken_idx_files(tmp_path, content, message):
    path = tmp_path / "broken-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_corrupt_gzip_and_missing_files(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "missing")
    with pytest.raises(DataError, match="not found"):
        load_idx_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="t10k-images"):
        load_idx_dataset(tmp_path)
    with pytest.raises(DataError, match="split"):
        load_idx_dataset(tmp_path, "validation")


def test_images_and_labels_must_match(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx([3, 2, 2]))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx([4]))
    with pytest.raises(DataError, match="3 images but labels"):
        load_idx_dataset(tmp_path)
