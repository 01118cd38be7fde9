"""Models with units that have no encrypted input: a pruned output channel (all-zero weights,
non-zero bias), a 1x1 convolution with padding whose border outputs see only padding, and a
channel that reads only the pruned one. Their ciphertexts would be transparent (SEAL refuses
to square them: every request failed); the compiler folds their public squares into the
biases of their readers, and the encrypted results match onnxruntime on real MNIST images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import _small_mnist, onnx_model
from onnx import helper

import she
from she.frontend.lowering import Affine, Chain, lower
from she.plan.compiler import fold_constant_units


def _features(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray,
              b2: np.ndarray) -> np.ndarray:
    """The squared outputs of the two convolutions (3x3 pad 1, then 1x1 pad 1), flattened."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h1 = np.stack([sum(padded[:, 0, i:i + 7, j:j + 7] * w1[c, 0, i, j]
                       for i in range(3) for j in range(3)) + b1[c] for c in range(3)], 1)
    s1 = np.pad(h1 ** 2, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h2 = np.einsum("dc,nchw->ndhw", w2[:, :, 0, 0], s1) + b2[None, :, None, None]
    return (h2 ** 2).reshape(len(x), -1)


def _pruned_model(mnist_dir: Path, path: Path, pruned: float = 0.0
                  ) -> tuple[she.Model, np.ndarray, np.ndarray]:
    """7x7 MNIST -> Conv(1->3, 3x3, p1; channel 1 pruned: its weights ``pruned`` times the
    others') -> x^2 -> Conv(3->2, 1x1, p1; channel 1 reads only the pruned channel) -> x^2
    -> Gemm(162->10, ridge regression on MNIST training images)."""
    x, y = _small_mnist(mnist_dir, "train", 3000)
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.3, (3, 1, 3, 3))
    w1[1] *= pruned
    b1 = np.array([0.1, 0.6, -0.2])
    w2 = np.array([[0.8, 0.5, -0.6], [0.0, 0.7, 0.0]]).reshape(2, 3, 1, 1)
    b2 = np.array([0.05, -0.1])
    feats = np.hstack([_features(x, w1, b1, w2, b2), np.ones((len(x), 1))])
    readout = np.linalg.solve(feats.T @ feats + 10.0 * np.eye(feats.shape[1]),
                              feats.T @ np.eye(10)[y])  # ridge: moderate weights
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": readout[:-1].T, "b3": readout[-1]}
    proto = onnx_model(
        [helper.make_node("Conv", ["input", "w1", "b1"], ["h1"], kernel_shape=[3, 3],
                          pads=[1, 1, 1, 1]),
         helper.make_node("Mul", ["h1", "h1"], ["s1"]),
         helper.make_node("Conv", ["s1", "w2", "b2"], ["h2"], kernel_shape=[1, 1],
                          pads=[1, 1, 1, 1]),
         helper.make_node("Mul", ["h2", "h2"], ["s2"]),
         helper.make_node("Flatten", ["s2"], ["f"]),
         helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1)],
        inits, name="pruned", in_shape=(1, 7, 7))
    proto.metadata_props.add(key="she.input_range", value="0,1")
    onnx.save(proto, path)
    x_test, _ = _small_mnist(mnist_dir, "test", 32)
    return she.load(path), x[:300], x_test


@pytest.fixture(scope="module")
def pruned(mnist_dir, tmp_path_factory):
    return _pruned_model(mnist_dir, tmp_path_factory.mktemp("pruned") / "pruned.onnx")


def test_constant_units_are_folded_into_their_readers(pruned):
    """Every unit with no encrypted input (the pruned channel; the second convolution's
    border and its channel reading only the pruned one) loses its columns in the layers
    that read it, and the folded chain computes the same function."""
    model, _, x = pruned
    chain = lower(model)
    folded = fold_constant_units(chain)
    zero_rows = [np.flatnonzero(np.asarray(abs(layer.matrix).sum(axis=1)).ravel() == 0)
                 for layer in folded.layers]
    assert len(zero_rows[0]) == 49  # channel 1 of the first convolution
    assert len(zero_rows[1]) == 2 * 81 - 49  # channel 1 whole, channel 0's border
    for k, rows in enumerate(zero_rows[:-1]):  # no later layer reads them
        assert not np.asarray(abs(folded.layers[k + 1].matrix)[:, rows].sum()).any()
    assert len(np.flatnonzero(np.asarray(abs(chain.layers[1].matrix).sum(axis=1)).ravel()
                              == 0)) == 2 * 81 - 49 - 49  # the border, before folding
    flat = x.reshape(len(x), -1).astype(np.float64)
    assert np.allclose(folded.run(flat), chain.run(flat), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("packing", "pruned_weights"),
                         [("batch", 0.0), ("single", 0.0), ("batch", 1e-5)])
def test_a_model_with_constant_units_runs_encrypted(mnist_dir, tmp_path, packing,
                                                    pruned_weights):
    """Encrypted (batch: every unit its own ciphertext; single: one slot each) on real MNIST
    images: every class equals onnxruntime's, every logit within the predicted error. Also
    with the channel's weights 10^5 times smaller than the others' instead of zero: they
    round to zero in integers, and the batch plan folds those units the same way."""
    model, calibration, x = _pruned_model(mnist_dir, tmp_path / "m.onnx", pruned_weights)
    plan = she.compile(model, calibration=calibration, packing=packing)
    if packing == "batch":  # channel 1 of the first convolution is read by nobody
        assert not np.asarray(abs(plan.layers[1].weights)[:, 49:98].sum()).any()
    server, client = she.Server(plan, workers=1), she.Client(plan.spec())
    keys = server.load_context(client.public_context())
    x = x[:plan.batch_capacity]  # single packing: one image per request
    out = client.decrypt(server.evaluate(keys, client.encrypt(x)))
    reference = model.run_plain(x)
    assert np.abs(out - reference).max() <= plan.predicted_error
    assert np.array_equal(out.argmax(1), reference.argmax(1))


@pytest.mark.parametrize("pruned_weights", [0.0, 1e-3])
def test_bfv_decrypts_to_the_folded_quantised_model_exactly(mnist_dir, tmp_path, pruned_weights):
    """BFV (batch packing) builds its quantised model from the folded chain, and folds the
    units whose weights round to zero in 4 bits (a channel with weights 1000 times smaller
    than the others') the same way in integers: the decrypted results equal that integer
    model, bit for bit."""
    model, calibration, x = _pruned_model(mnist_dir, tmp_path / "m.onnx", pruned_weights)
    plan = she.compile(model, calibration=calibration, scheme="bfv", input_bits=4, weight_bits=4)
    assert not plan.layers[0].weights[49:98].any()  # channel 1 of the first convolution
    server, client = she.Server(plan, workers=1), she.Client(plan.spec())
    keys = server.load_context(client.public_context())
    out = client.decrypt(server.evaluate(keys, client.encrypt(x[:8])))
    exact = plan.run_integers(plan.quantise_inputs(x[:8])) / plan.output_scale()
    assert np.array_equal(out, exact)


def test_early_rescaled_terms_of_units_that_do_not_read_the_input(mnist_dir):
    """A layer that concatenates a squared branch and a linear skip of the input, its skip
    terms rescaled early (``skip_alignment="rescale"``): the branch's units read no input,
    so their skip term is a zero ciphertext, which SEAL refuses to multiply (every request
    failed); its product is zero and is left out. Results match the float model."""
    x, y = _small_mnist(mnist_dir, "train", 2000)
    flat = x.reshape(len(x), -1).astype(np.float64)
    rng = np.random.default_rng(5)
    w0, b0 = rng.normal(0, 0.3, (8, 49)), rng.normal(0, 0.2, 8)
    feats = np.hstack([(flat @ w0.T + b0) ** 2, flat, np.ones((len(flat), 1))])
    readout = np.linalg.solve(feats.T @ feats + 10.0 * np.eye(feats.shape[1]),
                              feats.T @ np.eye(10)[y])
    matrix = np.zeros((10, 49 + 8))  # columns: the input, then the square of layer 0
    matrix[:5, 49:] = readout[:8, :5].T  # classes 0-4 from the squared branch only
    matrix[5:, :49] = readout[8:57, 5:].T  # classes 5-9 from the input only
    chain = Chain([Affine(w0, b0, (8,)), Affine(matrix, readout[-1], (10,), (0, 1))], (1, 7, 7))
    plan = she.compile(chain, calibration=x[:300], skip_alignment="rescale")
    assert plan.layers[1].early_sources == (0,)
    server, client = she.Server(plan, workers=1), she.Client(plan.spec())
    keys = server.load_context(client.public_context())
    x_test, _ = _small_mnist(mnist_dir, "test", 16)
    out = client.decrypt(server.evaluate(keys, client.encrypt(x_test)))
    reference = chain.run(x_test.reshape(len(x_test), -1).astype(np.float64))
    assert np.abs(out - reference).max() <= plan.predicted_error
    assert np.array_equal(out.argmax(1), reference.argmax(1))
