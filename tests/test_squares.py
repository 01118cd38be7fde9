"""Degree-3/4 activations and polynomial max pooling: the ONNX the converter writes for
them is checked against the functions it approximates (onnxruntime) and against the
chain of affine maps and squares the engine runs (she.frontend.lowering)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import onnx_model
from onnx import helper

import she
from converters import onnx_graph as g
from converters import passes
from converters.convert import square_depth


def _model(node: onnx.NodeProto, in_shape, out_shape) -> onnx.ModelProto:
    return onnx_model([node], in_shape=in_shape, out_shape=out_shape, out="out")


def _lowered(model: onnx.ModelProto) -> she.frontend.lowering.Chain:
    return she.frontend.lowering.lower(she.frontend.model.from_proto(model, "test"))


@pytest.fixture()
def x() -> np.ndarray:
    rng = np.random.default_rng(0)
    # channels with different ranges, so that each gets its own fit
    return (rng.normal(0, 1, (400, 3, 6, 6)) * np.array([0.5, 2.0, 8.0])[:, None, None]
            + np.array([0.0, 1.0, -3.0])[:, None, None]).astype(np.float32)


@pytest.mark.parametrize("degree", [2, 3, 4])
def test_higher_degree_fits_relu_better_at_more_depth(x, degree):
    model = _model(helper.make_node("Relu", ["input"], ["out"], name="relu"), (3, 6, 6), (3, 6, 6))
    fitted = passes.replace_activations(model, x, degree)
    assert [f.node for f in fitted] == ["relu"]
    onnx.checker.check_model(model)
    out = g.run(model, x)[0]
    relu = np.maximum(x, 0)
    rmse = np.sqrt(np.mean((out - relu) ** 2, axis=(0, 2, 3)))
    # per channel the fit error is a small part of the channel's spread, smaller for
    # higher degrees;
    # measured: 0.11-0.12 of it for degree 2, 0.07-0.08 for degree 4
    assert np.all(rmse < {2: 0.13, 3: 0.11, 4: 0.085}[degree] * x.std(axis=(0, 2, 3)))
    assert square_depth(model) == (1 if degree == 2 else 2)
    chain = _lowered(model)
    assert chain.depth == square_depth(model)
    np.testing.assert_allclose(chain.run(x[:20]), out[:20].reshape(20, -1), atol=1e-3, rtol=1e-4)


def test_degree_four_is_more_accurate_than_two(x):
    errors = {}
    for degree in (2, 4):
        model = _model(helper.make_node("Tanh", ["input"], ["out"], name="tanh"), (3, 6, 6),
                       (3, 6, 6))
        errors[degree] = passes.replace_activations(model, x, degree)[0].rmse
        assert np.sqrt(np.mean((g.run(model, x)[0] - np.tanh(x)) ** 2)) == pytest.approx(
            errors[degree], rel=0.2, abs=1e-3)
    assert errors[4] < 0.8 * errors[2]  # measured 0.74


def test_unsupported_degree_is_refused(x):
    model = _model(helper.make_node("Relu", ["input"], ["out"], name="relu"), (3, 6, 6), (3, 6, 6))
    with pytest.raises(she.ParameterError, match="degree 5"):
        passes.replace_activations(model, x, 5)


@pytest.mark.parametrize("kernel,strides,levels", [(2, 2, 2), (3, 2, 4), (3, 3, 4)])
def test_polynomial_max_pool(x, kernel, strides, levels):
    out_side = (6 - kernel) // strides + 1
    node = helper.make_node("MaxPool", ["input"], ["out"], name="pool",
                            kernel_shape=[kernel, kernel], strides=[strides, strides])
    model = _model(node, (3, 6, 6), (3, out_side, out_side))
    exact = g.run(model, x)[0]
    assert passes.replace_pooling(model, "polynomial", x) == 1
    onnx.checker.check_model(model)
    assert "MaxPool" not in {n.op_type for n in model.graph.node}
    out = g.run(model, x)[0]
    assert out.shape == exact.shape
    # far closer to the maximum than the average pooling it would otherwise become
    windows = np.stack([x[:, :, i::strides, j::strides][:, :, :out_side, :out_side]
                        for i in range(kernel) for j in range(kernel)])
    average = windows.mean(axis=0)
    err_poly = np.sqrt(np.mean((out - exact) ** 2))
    err_avg = np.sqrt(np.mean((average - exact) ** 2))
    assert err_poly < 0.3 * err_avg  # measured 0.19-0.21
    assert square_depth(model) == levels
    chain = _lowered(model)
    assert chain.depth == levels
    np.testing.assert_allclose(chain.run(x[:20]), out[:20].reshape(20, -1), atol=1e-3, rtol=1e-4)


def test_polynomial_max_pool_bad_input(x):
    padded = _model(helper.make_node("MaxPool", ["input"], ["out"], name="padded_pool",
                                     kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1]),
                    (3, 6, 6), (3, 4, 4))
    with pytest.raises(she.ModelError, match="padded_pool.*max_pool='average'"):
        passes.replace_pooling(padded, "polynomial", x)
    with pytest.raises(she.ParameterError, match="calibration"):
        passes.replace_pooling(padded, "polynomial")
    with pytest.raises(she.ParameterError, match="'median'"):
        passes.replace_pooling(padded, "median", x)
