"""Lowering ONNX graphs to affine maps, checked against onnxruntime on real MNIST."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import onnx_model
from onnx import helper

import she
from she.frontend.lowering import lower
from she.io.data import load_idx_dataset
from she.pipeline import encrypted_predict


def _model(nodes, inits, out_dim=10) -> she.Model:
    return she.frontend.model.from_proto(onnx_model(nodes, inits, out_shape=(out_dim,), out="out"),
                                         "test")


def _rich_model() -> she.Model:
    """AveragePool, Pad, Reshape through Shape/Gather/Concat, MatMul + Add, Sub, Div, Pow."""
    rng = np.random.default_rng(3)
    inits = {
        "w1": rng.normal(0, 0.4, (4, 1, 3, 3)), "b1": rng.normal(0, 0.1, 4),
        "shift": rng.normal(0, 0.1, (1, 4, 1, 1)), "two": np.array(2.0),
        "m": rng.normal(0, 0.1, (4 * 7 * 7, 32)), "mb": rng.normal(0, 0.1, 32),
        "half": np.array(0.5), "k": np.array(3.0), "w3": rng.normal(0, 0.3, (32, 10)),
        "zero": np.array([0], dtype=np.int64), "minus1": np.array([-1], dtype=np.int64),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Pad", ["input", "pads"], ["p"], mode="constant"),
        helper.make_node("Conv", ["p", "w1", "b1"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("AveragePool", ["c"], ["a"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Sub", ["a", "shift"], ["s"]),
        helper.make_node("Pow", ["s", "two"], ["sq"]),
        helper.make_node("Shape", ["sq"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["sq", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "m"], ["mm"]),
        helper.make_node("Add", ["mm", "mb"], ["h"]),
        helper.make_node("Mul", ["h", "h"], ["h2"]),
        helper.make_node("Div", ["h2", "k"], ["h3"]),
        helper.make_node("Mul", ["h3", "half"], ["h4"]),
        helper.make_node("MatMul", ["h4", "w3"], ["out"]),
    ]
    return _model(nodes, inits)


@pytest.fixture(scope="module")
def mnist_test(mnist_dir):
    x, y = load_idx_dataset(mnist_dir, "test")
    return x[:300], y[:300]


def test_rich_graph_lowers_exactly(mnist_test):
    model = _rich_model()
    chain = lower(model)
    assert chain.depth == 2
    x, _ = mnist_test
    np.testing.assert_allclose(chain.run(x), model.run_plain(x), atol=1e-4, rtol=1e-4)


def test_rich_graph_runs_encrypted(mnist_test):
    model = _rich_model()
    x, _ = mnist_test
    plan = she.compile(model, calibration=x)
    enc, _ = encrypted_predict(plan, x[:64])
    plain = model.run_plain(x[:64])
    assert np.abs(enc - plain).max() < plan.predicted_error
    assert np.mean(enc.argmax(1) == plain.argmax(1)) >= 0.98


def test_linear_model_has_depth_zero(mnist_test):
    rng = np.random.default_rng(0)
    model = _model([helper.make_node("Flatten", ["input"], ["f"]),
                    helper.make_node("Gemm", ["f", "w", "b"], ["out"], transB=1)],
                   {"w": rng.normal(0, 0.1, (10, 784)), "b": rng.normal(0, 1, 10)})
    chain = lower(model)
    assert chain.depth == 0
    x, _ = mnist_test
    np.testing.assert_allclose(chain.run(x), model.run_plain(x), atol=1e-4)


def test_product_of_two_encrypted_values_is_refused():
    rng = np.random.default_rng(0)
    model = _model([helper.make_node("Flatten", ["input"], ["f"]),
                    helper.make_node("Gemm", ["f", "w", "b"], ["g1"], transB=1),
                    helper.make_node("Gemm", ["f", "w", "b"], ["g2"], transB=1),
                    helper.make_node("Mul", ["g1", "g2"], ["out"], name="cross")],
                   {"w": rng.normal(0, 0.1, (10, 784)), "b": np.zeros(10)})
    with pytest.raises(she.UnsupportedOperatorError, match="cross"):
        lower(model)


def test_skip_connection_across_square_lowers_as_a_graph(mnist_test):
    rng = np.random.default_rng(0)
    model = _model([helper.make_node("Flatten", ["input"], ["f"]),
                    helper.make_node("Gemm", ["f", "w", "b"], ["g"], transB=1),
                    helper.make_node("Mul", ["g", "g"], ["sq"]),
                    helper.make_node("Add", ["sq", "g"], ["out"])],
                   {"w": rng.normal(0, 0.1, (10, 784)), "b": np.zeros(10)})
    chain = lower(model)
    assert chain.layers[-1].sources == (0, 1) and chain.depth == 1
    x, _ = mnist_test
    np.testing.assert_allclose(chain.run(x), model.run_plain(x), atol=1e-4, rtol=1e-4)
    # run releases what no later layer reads; it computes exactly what evaluate keeps
    np.testing.assert_array_equal(chain.run(x), chain.activations(x)[-1])


def test_onnx_file_round_trip(tmp_path):
    model = _rich_model()
    path = tmp_path / "rich.onnx"
    onnx.save(model.proto, path)
    loaded = she.load(path)
    assert loaded.input_shape == (1, 28, 28) and loaded.name == "rich"
