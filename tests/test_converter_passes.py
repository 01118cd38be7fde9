"""Conversion passes on small ONNX graphs (no torch needed), checked with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import onnx_model
from onnx import helper

import she
from converters import onnx_graph as g
from converters import passes


def _model(nodes, inits, in_shape=(1, 8, 8), out="out", out_shape=None,
           check=True) -> onnx.ModelProto:
    return onnx_model(nodes, inits, in_shape=in_shape, out_shape=out_shape or in_shape, out=out,
                      check=check)


@pytest.fixture()
def x() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (64, 1, 8, 8)).astype(np.float32)


def _conv_bn() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = {"w": rng.normal(0, 0.5, (3, 1, 3, 3)), "b": rng.normal(0, 0.1, 3),
             "s": rng.uniform(0.5, 2, 3), "t": rng.normal(0, 1, 3), "m": rng.normal(0, 1, 3),
             "v": rng.uniform(0.1, 2, 3)}
    return _model([helper.make_node("Conv", ["input", "w", "b"], ["c"], kernel_shape=[3, 3]),
                   helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["bn"],
                                    name="bn", epsilon=1e-5),
                   helper.make_node("Dropout", ["bn"], ["out"])], inits, out_shape=(3, 6, 6))


def test_batchnorm_folds_exactly_into_conv(x):
    model = _conv_bn()
    before = g.run(model, x)[0]
    assert passes.remove_identities(model) == 1
    assert passes.fold_batchnorm(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    np.testing.assert_allclose(g.run(model, x)[0], before, atol=1e-5)


def test_batchnorm_without_conv_becomes_mul_add(x):
    model = _model([helper.make_node("BatchNormalization", ["input", "s", "t", "m", "v"],
                                     ["out"], name="bn")],
                   {"s": [1.5], "t": [0.2], "m": [0.1], "v": [0.5]})
    before = g.run(model, x)[0]
    passes.fold_batchnorm(model)
    assert [n.op_type for n in model.graph.node] == ["Mul", "Add"]
    np.testing.assert_allclose(g.run(model, x)[0], before, atol=1e-5)


def test_constant_subgraph_is_folded(x):
    model = _model([helper.make_node("Mul", ["k", "two"], ["k2"]),
                    helper.make_node("Add", ["input", "k2"], ["out"])],
                   {"k": [0.25], "two": [2.0]})
    before = g.run(model, x)[0]
    assert passes.fold_constants(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Add"]
    np.testing.assert_allclose(g.run(model, x)[0], before)


def test_maxpool_becomes_average_pool(x):
    model = _model([helper.make_node("MaxPool", ["input"], ["out"], kernel_shape=[2, 2],
                                     strides=[2, 2], name="pool")], {}, out_shape=(1, 4, 4))
    assert passes.replace_pooling(model) == 1
    out = g.run(model, x)[0]
    np.testing.assert_allclose(out, x.reshape(64, 1, 4, 2, 4, 2).mean(axis=(3, 5)), atol=1e-6)
    she.frontend.model.from_proto(model)  # now HE-friendly


@pytest.mark.parametrize("act", ["Relu", "Sigmoid", "Softmax"])
def test_maxpool_moves_ahead_of_a_monotone_activation(x, act):
    """maxpool(relu(x)) = relu(maxpool(x)): the rewrite is exact and the activation (a
    square once converted) then sees 4x fewer values. Softmax is not element-wise: kept."""
    model = _model([helper.make_node(act, ["input"], ["a"], name="act"),
                    helper.make_node("MaxPool", ["a"], ["out"], kernel_shape=[2, 2],
                                     strides=[2, 2], pads=[1, 1, 1, 1], name="pool")],
                   {}, out_shape=(1, 5, 5))
    before = g.run(model, x)[0]
    moved = passes.pool_before_activation(model)
    assert moved == (act != "Softmax")
    if moved:
        assert [n.op_type for n in model.graph.node] == ["MaxPool", act]
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(g.run(model, x)[0], before)


def test_relu_replaced_by_fitted_quadratic(x):
    model = _model([helper.make_node("Relu", ["input"], ["out"], name="relu")], {})
    fitted = passes.replace_activations(model, x, degree=2)
    assert fitted[0].op_type == "Relu" and fitted[0].channels == 1
    assert fitted[0].value_range[0] < 0 < fitted[0].value_range[1]
    out = g.run(model, x)[0]
    # The best quadratic to ReLU on U(-1, 1) has RMS error ~0.05; the fit reports it.
    rmse = float(np.sqrt(np.mean((out - np.maximum(x, 0)) ** 2)))
    assert rmse < 0.08 and abs(rmse - fitted[0].rmse) < 0.01
    assert [n.op_type for n in model.graph.node] == ["Add", "Mul", "Mul", "Add"]
    chain = she.frontend.lowering.lower(she.frontend.model.from_proto(model))
    assert chain.depth == 1


def test_pow2_round_keeps_signs_and_exponent_range():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.3, (4, 50))
    q = passes.pow2_round(w, axis=0, exponent_bits=3)
    nz = q != 0
    assert np.all(np.sign(q[nz]) == np.sign(w[nz]))
    exps = np.log2(np.abs(q[nz]))
    assert np.allclose(exps, np.round(exps))
    for row in range(4):
        e = np.log2(np.abs(q[row][q[row] != 0]))
        assert e.max() - e.min() <= 2 ** 3 - 2
    assert np.all(np.abs(q - w)[nz] <= np.abs(w[nz]) * (np.sqrt(2) - 1) + 1e-12)


def _signed_pow2_terms(v: float, limit: int) -> float:
    """Fewest signed powers of two summing to ``v`` (inf above ``limit``); the largest
    term of a shortest such sum is the power of two just below or just above |v|."""
    if v == 0:
        return 0
    if limit == 0:
        return np.inf
    low = 2.0 ** np.floor(np.log2(abs(v)))
    return 1 + min(_signed_pow2_terms(v - np.sign(v) * p, limit - 1) for p in (low, 2 * low))


def test_pow2_terms_sum_powers_of_two_and_shrink_the_rounding():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.3, (4, 200))
    errors = []
    for terms in (1, 2, 3):
        q = passes.pow2_round(w, axis=0, exponent_bits=4, terms=terms)
        assert max(_signed_pow2_terms(float(v), 3) for v in q.ravel()) == terms
        errors.append(np.abs(q - w).mean())
    assert errors[1] < 0.3 * errors[0] and errors[2] < 0.3 * errors[1]
    two = np.array([[0.75, -0.375, 0.5, 1.0]])  # already two-term values: kept exactly
    np.testing.assert_array_equal(passes.pow2_round(two, axis=0, exponent_bits=4, terms=2), two)
    with pytest.raises(she.ParameterError, match="terms"):
        passes.quantise_pow2(_model([], {}, check=False), terms=4)  # empty graph: invalid ONNX


def test_unsupported_operator_is_named():
    model = _model([helper.make_node("Softmax", ["input"], ["out"], name="soft")], {})
    with pytest.raises(she.ModelError, match="soft.*Softmax"):
        g.check_importable(model)


def test_calibration_of_wrong_shape_is_refused(x):
    model = _model([helper.make_node("Relu", ["input"], ["out"])], {})
    with pytest.raises(she.DataError, match="shape"):
        passes.replace_activations(model, x[:, :, :4], degree=2)


@pytest.mark.parametrize("damage", ["corrupt", "dynamic", "unsupported", "dtype"])
def test_bad_input_is_a_clear_error_and_writes_nothing(x, tmp_path, damage):
    """A corrupt file, an unresolved dynamic dimension, an operator that cannot be
    converted, calibration data of the wrong dtype: a named error, no output file."""
    from she.cli import main

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    cal = tmp_path / "cal.npy"
    np.save(cal, x)
    if damage == "corrupt":
        src.write_bytes(b"\x08\x09not an onnx model")
        expected = "in.onnx"
    elif damage == "dynamic":
        onnx.save(_model([helper.make_node("Relu", ["input"], ["out"])], {},
                         in_shape=("H", 8, 8)), str(src))
        expected = "dynamic"
    elif damage == "unsupported":
        onnx.save(_model([helper.make_node("Softmax", ["input"], ["out"], name="soft")], {}),
                  str(src))
        expected = "soft"
    else:
        onnx.save(_model([helper.make_node("Relu", ["input"], ["out"])], {}), str(src))
        np.save(cal, np.full(x.shape, "a"))
        expected = "numeric"
    with pytest.raises(she.SheError, match=expected):
        import converters

        converters.convert(str(src), np.load(cal))
    assert main(["convert", str(src), "-o", str(out), "--calibration", str(cal)]) == 2
    assert not out.exists() and list(tmp_path.glob(".she-*")) == []
