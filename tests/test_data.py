"""IDX reading: real MNIST, and clear DataErrors for broken files and directories."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

import she
from she.io.data import load_idx_dataset, read_idx


def _idx(dims: list[int], dtype: int = 0x08, payload: bytes | None = None) -> bytes:
    """An IDX file: magic, big-endian dimensions, then ``payload`` (zeros by default)."""
    header = bytes([0, 0, dtype, len(dims)]) + np.array(dims, dtype=">u4").tobytes()
    return header + (payload if payload is not None else bytes(int(np.prod(dims))))


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# -- real MNIST -------------------------------------------------------------------------------

def test_real_mnist_test_split(mnist_dir):
    x, y = load_idx_dataset(mnist_dir, "test")
    assert x.shape == (10000, 1, 28, 28)
    assert x.dtype == np.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # 0 and 255 pixels both occur
    assert y.shape == (10000,) and y.dtype == np.int64
    assert set(np.unique(y).tolist()) == set(range(10))
    # Every digit is reasonably frequent (a wrong offset or byte order would break this).
    assert np.bincount(y, minlength=10).min() > 800


def test_plain_copy_equals_gzipped_file(mnist_dir, tmp_path):
    for stem in ("t10k-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        gz = mnist_dir / f"{stem}.gz"
        plain = _write(tmp_path / stem, gzip.decompress(gz.read_bytes()))
        a, b = read_idx(plain), read_idx(gz)
        assert a.dtype == b.dtype == np.uint8
        assert a.shape == b.shape and np.array_equal(a, b)


def test_split_from_plain_files_equals_gzipped(mnist_dir, tmp_path):
    """load_idx_dataset finds un-gzipped files too, and reads the same data."""
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        _write(tmp_path / stem, gzip.decompress((mnist_dir / f"{stem}.gz").read_bytes()))
    x_plain, y_plain = load_idx_dataset(tmp_path, "test")
    x_gz, y_gz = load_idx_dataset(mnist_dir, "test")
    assert np.array_equal(x_plain, x_gz) and np.array_equal(y_plain, y_gz)


def test_synthetic_dataset_values(tmp_path):
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8) * 10
    _write(tmp_path / "train-images-idx3-ubyte", _idx([2, 3, 4], payload=pixels.tobytes()))
    _write(tmp_path / "train-labels-idx1-ubyte", _idx([2], payload=bytes([7, 3])))
    x, y = load_idx_dataset(tmp_path, "train")
    assert x.shape == (2, 1, 3, 4)
    np.testing.assert_allclose(x.ravel(), pixels / 255.0, rtol=1e-6)
    assert y.tolist() == [7, 3]


def test_big_endian_dtypes(tmp_path):
    values = np.array([[1.5, -2.25], [1e3, 0.0]], dtype=">f4")
    assert np.array_equal(read_idx(_write(tmp_path / "f", _idx([2, 2], 0x0D, values.tobytes()))),
                          values.astype(np.float32))
    ints = np.array([-70000, 5, 123456], dtype=">i4")
    assert read_idx(_write(tmp_path / "i", _idx([3], 0x0C, ints.tobytes()))).tolist() == \
        [-70000, 5, 123456]


# -- errors -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nothing-here-idx1-ubyte"
    with pytest.raises(she.DataError, match="not found") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_directory(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(she.DataError, match="not found") as info:
        load_idx_dataset(path, "test")
    assert str(path) in str(info.value)


def test_directory_without_the_split_files(tmp_path):
    with pytest.raises(she.DataError) as info:
        load_idx_dataset(tmp_path, "test")
    assert "t10k-images-idx3-ubyte" in str(info.value) and str(tmp_path) in str(info.value)
    # Images present, labels absent: the missing labels file is named.
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx([1, 2, 2]))
    with pytest.raises(she.DataError, match="t10k-labels-idx1-ubyte"):
        load_idx_dataset(tmp_path, "test")


def test_bad_magic(tmp_path):
    path = _write(tmp_path / "bad", b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(she.DataError, match="magic") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    with pytest.raises(she.DataError, match="magic"):
        read_idx(_write(tmp_path / "empty", b""))
    with pytest.raises(she.DataError, match="magic"):
        read_idx(_write(tmp_path / "short", b"\x00\x00"))


def test_gzip_file_named_without_gz_is_bad_magic(mnist_dir, tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    shutil.copy(mnist_dir / "t10k-labels-idx1-ubyte.gz", path)
    with pytest.raises(she.DataError, match="magic"):
        read_idx(path)


def test_corrupt_gzip(tmp_path):
    path = _write(tmp_path / "x-idx1-ubyte.gz", b"this is not gzip data")
    with pytest.raises(she.DataError, match="cannot read") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    good = gzip.compress(_idx([100]))
    with pytest.raises(she.DataError):
        read_idx(_write(tmp_path / "cut-idx1-ubyte.gz", good[: len(good) // 2]))


@pytest.mark.parametrize("code", [0x00, 0x07, 0x0A, 0x0F, 0xFF])
def test_unknown_dtype_code(tmp_path, code):
    with pytest.raises(she.DataError, match="unknown IDX data type") as info:
        read_idx(_write(tmp_path / "d", _idx([4], dtype=code)))
    assert f"0x{code:02x}" in str(info.value)


@pytest.mark.parametrize("content", [
    bytes([0, 0, 8, 3, 0, 0]),            # 3 dimensions promised, 2 bytes of them given
    bytes([0, 0, 8, 1]),                  # no dimension at all
    bytes([0, 0, 8, 0]),                  # zero dimensions
    bytes([0, 0, 8, 2]) + bytes(7),       # second dimension cut short
])
def test_truncated_header(tmp_path, content):
    with pytest.raises(she.DataError, match="truncated IDX header"):
        read_idx(_write(tmp_path / "t", content))


@pytest.mark.parametrize("dims, dtype, payload_len", [
    ([4, 4], 0x08, 10),    # too short
    ([4, 4], 0x08, 17),    # one byte too many
    ([3], 0x0C, 11),       # int32 data not a whole number of items
    ([3], 0x0C, 3),        # item count instead of byte count
    ([10000], 0x08, 0),    # header only
])
def test_data_length_must_match_header(tmp_path, dims, dtype, payload_len):
    path = _write(tmp_path / "l", _idx(dims, dtype, bytes(payload_len)))
    with pytest.raises(she.DataError, match="promises") as info:
        read_idx(path)
    assert f"holds {payload_len}" in str(info.value)


def test_header_whose_size_overflows_is_a_data_error(tmp_path):
    """Four dimensions of 2^16 promise 2^64 bytes; the product must not wrap around to 0.

    A 20-byte file (header only) must be refused as not matching its header.
    """
    path = _write(tmp_path / "huge", _idx([65536] * 4, payload=b""))
    with pytest.raises(she.DataError):
        read_idx(path)


def test_images_and_labels_count_mismatch(tmp_path):
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx([3, 2, 2]))
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx([4]))
    with pytest.raises(she.DataError, match="3 images but labels of shape \\(4,\\)"):
        load_idx_dataset(tmp_path, "test")


def test_images_and_labels_wrong_rank(tmp_path):
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx([3, 4]))
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx([3]))
    with pytest.raises(she.DataError, match="expected images of shape"):
        load_idx_dataset(tmp_path, "test")
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx([3, 2, 2]))
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx([3, 1]))
    with pytest.raises(she.DataError, match="labels of shape"):
        load_idx_dataset(tmp_path, "test")


@pytest.mark.parametrize("split", ["validation", "TEST", "", "t10k"])
def test_unknown_split(tmp_path, split):
    with pytest.raises(she.DataError, match="unknown split") as info:
        load_idx_dataset(tmp_path, split)
    assert "train" in str(info.value) and "test" in str(info.value)


def test_errors_are_she_errors():
    assert issubclass(she.DataError, she.SheError)


def test_gzip_that_expands_past_its_header_is_read_within_a_bound(tmp_path):
    # 64 MiB of zeros after a 16-byte promise compress to ~64 KiB; reading must not hold
    # them (before the bound, the whole file was decompressed into memory first).
    import tracemalloc

    path = tmp_path / "bomb-idx1-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(_idx([16]))
        for _ in range(64):
            out.write(bytes(1 << 20))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(she.DataError, match=f"holds {16 + (64 << 20)}"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_header_promising_more_than_the_limit_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(she.io.data, "MAX_IDX_BYTES", 1000)
    path = _write(tmp_path / "big", _idx([1001]))
    with pytest.raises(she.DataError, match="more than the 1000 this reader accepts"):
        read_idx(path)
    assert read_idx(_write(tmp_path / "ok", _idx([1000]))).shape == (1000,)
