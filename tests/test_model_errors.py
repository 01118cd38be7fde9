"""Clear errors for models that cannot run encrypted: unsupported operators (named, with a
hint), missing or corrupt files, dynamic shapes, and graphs the lowering cannot express."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import onnx_model
from onnx import helper

import she
from she.frontend.lowering import lower

RNG = np.random.default_rng(0)


def _save(proto: onnx.ModelProto, path) -> str:
    onnx.checker.check_model(proto)  # the models here are valid ONNX: only SHE refuses them
    onnx.save(proto, str(path))
    return str(path)


def _dense(*extra_nodes, inits=None, out_dim: int = 10):
    """Flatten -> Gemm(784->10) followed by ``extra_nodes`` (which read "g", write "out")."""
    nodes = [helper.make_node("Flatten", ["input"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w", "b"], ["g"], name="fc", transB=1),
             *extra_nodes]
    weights = {"w": RNG.normal(0, 0.1, (10, 784)), "b": np.zeros(10), **(inits or {})}
    return onnx_model(nodes, weights, out="out", out_shape=(out_dim,))


# -- unsupported operators -------------------------------------------------------------------------

def _relu_model():
    return _dense(helper.make_node("Relu", ["g"], ["out"], name="act_relu"))


def _maxpool_model():
    nodes = [helper.make_node("MaxPool", ["input"], ["p"], name="pool_max", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["out"], transB=1)]
    return onnx_model(nodes, {"w": RNG.normal(0, 0.1, (10, 196)), "b": np.zeros(10)}, out="out")


def _batchnorm_model():
    nodes = [helper.make_node("Conv", ["input", "cw"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], name="bn_1"),
             helper.make_node("Flatten", ["n"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["out"], transB=1)]
    inits = {"cw": RNG.normal(0, 0.3, (2, 1, 3, 3)), "s": np.ones(2), "bb": np.zeros(2),
             "m": np.zeros(2), "v": np.ones(2), "w": RNG.normal(0, 0.1, (10, 2 * 784)),
             "b": np.zeros(10)}
    return onnx_model(nodes, inits, out="out")


@pytest.mark.parametrize("build, node, op, hint", [
    (_relu_model, "act_relu", "Relu", "polynomial"),
    (_maxpool_model, "pool_max", "MaxPool", "average pooling"),
    (_batchnorm_model, "bn_1", "BatchNormalization", "fold batch normalisation"),
])
def test_convertible_operator_points_to_she_convert(tmp_path, build, node, op, hint):
    path = _save(build(), tmp_path / "m.onnx")
    with pytest.raises(she.UnsupportedOperatorError) as info:
        she.load(path)
    message = str(info.value)
    assert f"'{node}'" in message
    assert op in message
    assert "she convert" in message
    assert hint in message
    assert info.value.node_name == node and info.value.op_type == op
    assert isinstance(info.value, she.ModelError)


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh", "LeakyRelu"])
def test_other_convertible_activations(tmp_path, op):
    path = _save(_dense(helper.make_node(op, ["g"], ["out"], name="act")), tmp_path / "m.onnx")
    with pytest.raises(she.UnsupportedOperatorError, match="she convert") as info:
        she.load(path)
    assert info.value.op_type == op


def test_unknown_operator_does_not_suggest_she_convert(tmp_path):
    path = _save(_dense(helper.make_node("Softmax", ["g"], ["out"], name="probs", axis=1)),
                 tmp_path / "m.onnx")
    with pytest.raises(she.UnsupportedOperatorError) as info:
        she.load(path)
    message = str(info.value)
    assert "'probs'" in message and "Softmax" in message
    assert "is not supported by SHE; rewrite the model without it" in message
    assert "convert" not in message


def test_unknown_recurrent_operator(tmp_path):
    hidden = 4
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["seq"]),
             helper.make_node("LSTM", ["seq", "W", "R"], ["", "h"], name="rnn", hidden_size=hidden),
             helper.make_node("Flatten", ["h"], ["out"])]
    inits = {"shape": np.array([28, 1, 28]), "W": RNG.normal(0, 0.1, (1, 4 * hidden, 28)),
             "R": RNG.normal(0, 0.1, (1, 4 * hidden, hidden))}
    proto = onnx_model(nodes, inits, name="rnn", in_shape=(28, 1, 28), out_shape=(1, hidden),
                       out="out", batch=None)
    with pytest.raises(she.UnsupportedOperatorError, match="'rnn' \\(operator LSTM\\)") as info:
        she.load(_save(proto, tmp_path / "rnn.onnx"))
    assert "she convert" not in str(info.value)


def test_unnamed_node_is_identified_by_its_index(tmp_path):
    path = _save(_dense(helper.make_node("Relu", ["g"], ["out"])), tmp_path / "m.onnx")
    with pytest.raises(she.UnsupportedOperatorError, match="'#2' \\(operator Relu\\)"):
        she.load(path)


def test_from_proto_gives_the_same_error():
    with pytest.raises(she.UnsupportedOperatorError, match="act_relu"):
        she.frontend.model.from_proto(_relu_model())


# -- files -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "missing.onnx"
    with pytest.raises(she.ModelError, match="not found") as info:
        she.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(she.ModelError, match="not found"):
        she.load(tmp_path)  # a directory is not a model file


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corrupt_file(tmp_path, seed):
    path = tmp_path / "bad.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(500))
    with pytest.raises(she.ModelError):
        she.load(path)


def test_truncated_and_empty_files(tmp_path, toy_model_path):
    data = toy_model_path.read_bytes()
    for content in (data[: len(data) // 2], data[:-3], b"", b"not an onnx model"):
        path = tmp_path / "cut.onnx"
        path.write_bytes(content)
        with pytest.raises(she.ModelError):
            she.load(path)


def test_toy_model_loads(toy_model_path):
    model = she.load(toy_model_path)
    assert model.input_shape == (1, 28, 28) and model.input_name == "input"
    assert model.output_name == "logits" and model.name == "toy"
    assert lower(model).depth == 2


# -- shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_shape", [("N", 1, "H", 28), ("N", 1, 28, "W"), ("N", "C", 28, 28)])
def test_dynamic_feature_dimensions(tmp_path, in_shape):
    nodes = [helper.make_node("Flatten", ["input"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["out"], transB=1)]
    proto = onnx_model(nodes, {"w": RNG.normal(0, 0.1, (10, 784)), "b": np.zeros(10)},
                       out="out", in_shape=in_shape[1:])
    with pytest.raises(she.ModelError, match="must be fixed") as info:
        she.load(_save(proto, tmp_path / "dyn.onnx"))
    dynamic = next(d for d in in_shape[1:] if isinstance(d, str))
    assert dynamic in str(info.value)


def test_input_without_feature_axis(tmp_path):
    proto = onnx_model([helper.make_node("Mul", ["input", "k"], ["out"])], {"k": np.array(2.0)},
                       out="out", in_shape=(), out_shape=())
    with pytest.raises(she.ModelError, match="feature axis"):
        she.load(_save(proto, tmp_path / "flat.onnx"))


# -- graphs the lowering refuses -------------------------------------------------------------------

def test_product_of_two_encrypted_tensors():
    proto = onnx_model(
        [helper.make_node("Flatten", ["input"], ["f"]),
         helper.make_node("Gemm", ["f", "w", "b"], ["a"], transB=1),
         helper.make_node("Gemm", ["f", "w2", "b"], ["b2"], transB=1),
         helper.make_node("Mul", ["a", "b2"], ["out"], name="cross")],
        {"w": RNG.normal(0, 0.1, (10, 784)), "w2": RNG.normal(0, 0.1, (10, 784)), "b": np.zeros(10)},
        out="out",
    )
    model = she.frontend.model.from_proto(proto)  # loads: every operator is supported
    with pytest.raises(she.UnsupportedOperatorError, match="'cross' \\(operator Mul\\)") as info:
        lower(model)
    assert "product of two different encrypted values" in str(info.value)


def test_skip_connection_across_a_square():
    """Lowers as a graph (the output reads the input and the square); BFV, which runs
    chains only, refuses it with a clear error (CKKS runs it in both packings)."""
    proto = _dense(helper.make_node("Mul", ["g", "g"], ["sq"], name="square"),
                   helper.make_node("Add", ["sq", "g"], ["out"], name="skip"))
    model = she.frontend.model.from_proto(proto)
    chain = lower(model)
    assert chain.layers[-1].sources == (0, 1) and not chain.is_chain
    with pytest.raises(she.ParameterError, match="chains of layers only"):
        she.compile(model, scheme="bfv")
    assert she.compile(model, packing="single").layers[-1].sources == (0, 1)


def test_unused_square_is_dropped():
    """The output uses the pre-square tensor: the square reaches nothing and is dropped."""
    proto = _dense(helper.make_node("Mul", ["g", "g"], ["sq"], name="square"),
                   helper.make_node("Identity", ["g"], ["out"]))
    chain = lower(she.frontend.model.from_proto(proto))
    assert chain.depth == 0 and len(chain.layers) == 1


def test_higher_power_is_refused():
    proto = _dense(helper.make_node("Pow", ["g", "three"], ["out"], name="cube"),
                   inits={"three": np.array(3.0)})
    with pytest.raises(she.UnsupportedOperatorError, match="'cube'"):
        lower(she.frontend.model.from_proto(proto))
