"""The plain-TenSEAL peer baselines (benchmarks/tenseal_baseline.py) on real MNIST images.

The single (tutorial) baseline runs on the shipped tutorial network; the batch baseline
always needs 64 x 49 ciphertexts for that network whatever the number of images (minutes),
so its test uses a small network of the same shape family (7x7 kernels at stride 7: 16
windows, 784 ciphertexts; random features with a fitted read-out) with the tutorial's
N=8192 parameters and a few images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import tenseal as ts
from conftest import onnx_model
from onnx import helper

from benchmarks import tenseal_baseline as tb
from she.io.data import load_idx_dataset

MODEL = tb.DEFAULT_MODEL
#: Decrypted logits must be within this fraction of max |plaintext logit|. The tutorial's
#: 26-bit scale leaves a few per cent of noise after two squares (observed 2-5 %).
REL_TOLERANCE = 0.15
#: The batch baseline on consecutive test images (the first 64, not chosen): observed
#: 2.3 % of max |plaintext logit| (0.16 of 7.2).
BATCH_REL_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def test_split(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_idx_dataset(mnist_dir, "test")


def small_model(path: Path, fit_x: np.ndarray, fit_y: np.ndarray, hidden: int = 32, seed: int = 7) -> Path:
    """Conv(1 -> 4, 7x7, stride 7) -> x*x -> Flatten -> Gemm(64 -> hidden) -> x*x -> Gemm(hidden -> 10).

    The convolution and first dense layer are random; the last layer is a ridge-regression
    read-out fitted to ``fit_x`` / ``fit_y`` so that the logits have clear argmax margins.
    """
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.15, (4, 1, 7, 7))
    conv_b = rng.normal(0, 0.1, 4)
    fc1_w = rng.normal(0, 0.15, (hidden, 64))
    fc1_b = rng.normal(0, 0.1, hidden)
    patches = fit_x.reshape(len(fit_x), 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(len(fit_x), 16, 49)
    conv = np.einsum("nwp,cp->ncw", patches, conv_w.reshape(4, 49)) + conv_b[None, :, None]
    feats = np.square(np.square(conv).reshape(len(fit_x), 64) @ fc1_w.T + fc1_b)
    design = np.hstack([feats, np.ones((len(feats), 1))])
    target = 10.0 * np.eye(10)[fit_y]
    readout = np.linalg.solve(design.T @ design + 1e-3 * np.eye(hidden + 1), design.T @ target)
    arrays = {"cw": conv_w, "cb": conv_b, "w1": fc1_w, "b1": fc1_b, "w2": readout[:-1], "b2": readout[-1]}
    nodes = [
        helper.make_node("Conv", ["input", "cw", "cb"], ["c"], kernel_shape=[7, 7], strides=[7, 7]),
        helper.make_node("Mul", ["c", "c"], ["s1"]),
        helper.make_node("Flatten", ["s1"], ["f"]),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Mul", ["h", "h"], ["s2"]),
        helper.make_node("Gemm", ["s2", "w2", "b2"], ["logits"]),  # no transB: (in, out) weight
    ]
    onnx.save(onnx_model(nodes, arrays, name="small"), str(path))
    return path


def test_tutorial_weights_and_plain_reference(test_split: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = test_split
    weights = tb.load_weights(MODEL)
    assert weights.conv_w.shape == (4, 7, 7) and weights.stride == 3 and weights.side == 8
    assert weights.fc1_w.shape == (256, 64) and weights.fc2_w.shape == (64, 10)
    plain = tb.plain_forward(weights, x[:500])
    ort = tb.onnxruntime_forward(MODEL, x[:500])
    assert np.abs(plain - ort).max() < 1e-5 * np.abs(ort).max()
    # The shipped network is trained (the tutorial reaches ~97.6 %).
    assert np.mean(tb.plain_forward(weights, x).argmax(1) == y) > 0.97


def test_server_context_refuses_secret_key() -> None:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    with pytest.raises(RuntimeError, match="secret key"):
        tb.server_context(ctx.serialize(save_secret_key=True))
    assert not tb.server_context(tb.public_context_bytes(ctx)).is_private()


def test_single_matches_plaintext(test_split: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = test_split
    result = tb.run_single(MODEL, x[:2], y[:2], show_progress=False)
    plain = tb.plain_forward(tb.load_weights(MODEL), x[:2])
    logits = np.asarray(result["logits"])
    assert logits.shape == (2, 10)
    assert np.abs(logits - plain).max() < REL_TOLERANCE * np.abs(plain).max(), (logits, plain)
    assert (logits.argmax(1) == plain.argmax(1)).all()
    assert result["argmax_agreement"] == 1.0
    # Tutorial parameters: ~0.5 MB per request, tens of MB of Galois keys, no secret key.
    assert 100_000 < result["upload_bytes"] < 2_000_000
    assert 0 < result["download_bytes"] < result["upload_bytes"]
    assert result["public_key_bytes"] > 10_000_000
    assert 0 < result["server_s"]["p50"] < 60


def test_percentiles_against_hand_computed_values() -> None:
    # numpy's linear interpolation: p50 of 1,2,3,4,10 is 3; p90 is 4 + 0.6 * (10 - 4).
    assert tb.percentiles([4, 1, 10, 3, 2]) == pytest.approx({"mean": 4.0, "p50": 3.0, "p90": 7.6})


def test_batch_matches_plaintext(tmp_path: Path, test_split: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = test_split
    path = small_model(tmp_path / "small.onnx", x[1000:3000], y[1000:3000])
    weights = tb.load_weights(path)
    assert weights.side == 4 and weights.fc2_w.shape == (32, 10)
    # The first 64 test images, as they come (the batch costs the same for 1 or 4096).
    images, labels = x[:64], y[:64]
    result = tb.run_batch(path, images, labels, batch=len(images), show_progress=False)
    plain = tb.plain_forward(weights, images)
    assert np.abs(plain - tb.onnxruntime_forward(path, images)).max() < 1e-4 * np.abs(plain).max()
    logits = np.asarray(result["logits"])
    assert logits.shape == (len(images), 10)
    error = np.abs(logits - plain).max()
    assert error < BATCH_REL_TOLERANCE * np.abs(plain).max(), (error, np.abs(plain).max())
    # Every image whose plaintext margin exceeds twice the error keeps its class.
    top2 = np.sort(plain, axis=1)[:, -2:]
    safe = top2[:, 1] - top2[:, 0] > 2 * error
    assert safe.mean() > 0.6  # observed 0.77: most images are checked
    same = logits.argmax(1) == plain.argmax(1)
    assert same[safe].all()
    assert result["argmax_agreement"] == pytest.approx(same.mean())
    assert result["ciphertexts_in"] == 16 * 49 and result["ciphertexts_out"] == 10
    # No Galois keys: the public context is far smaller than the single baseline's.
    assert result["public_key_bytes"] < 10_000_000
    assert result["upload_bytes"] > 16 * 49 * 100_000
    assert result["subprocess"] and result["peak_rss_bytes"] > result["rss_before_bytes"]


def test_batch_refuses_more_images_than_slots(test_split: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = test_split
    with pytest.raises(ValueError, match="slots"):
        tb.run_batch(MODEL, x, y, batch=4097, subprocess=False, show_progress=False)
