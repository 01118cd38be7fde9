"""Batch engine: two convolutions in a row run as a wavefront (the second one's accumulated
outputs are never all alive) and the result does not change by a bit; the scratch that
killed processes leave is removed."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import tenseal as ts
from onnx import TensorProto, helper, numpy_helper

import she
import she.plan.compiler
from she.io.context import SealBridge, remove_orphaned_scratch
from she.io.data import load_idx_dataset


def _conv_conv_model(seed: int = 7) -> onnx.ModelProto:
    """Conv(1->2, 3x3, s2, p1) -> +c -> x^2 -> Conv(2->2, 3x3, s2, p1) -> x^2 -> Gemm(98->10)."""
    rng = np.random.default_rng(seed)

    def init(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)

    inits = [init("w1", rng.normal(0, 0.4, (2, 1, 3, 3))), init("b1", rng.normal(0, 0.1, 2)),
             init("c1", rng.normal(0, 0.1, (1, 2, 1, 1))),
             init("w2", rng.normal(0, 0.3, (2, 2, 3, 3))), init("b2", rng.normal(0, 0.1, 2)),
             init("w3", rng.normal(0, 0.2, (10, 98))), init("b3", rng.normal(0, 0.1, 10))]
    conv = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], **conv),
             helper.make_node("Add", ["h1", "c1"], ["t1"]),
             helper.make_node("Mul", ["t1", "t1"], ["s1"]),
             helper.make_node("Conv", ["s1", "w2", "b2"], ["h2"], **conv),
             helper.make_node("Mul", ["h2", "h2"], ["s2"]),
             helper.make_node("Flatten", ["s2"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "conv_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"she.input_range": "0.0,1.0", "she.converted": "1"})
    return model


@pytest.fixture(scope="module")
def conv_conv(mnist_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "conv_conv.onnx"
    onnx.save(_conv_conv_model(), str(path))
    model = she.load(path)
    x, _ = load_idx_dataset(mnist_dir, "test")
    plan = she.compile(model, calibration=x[:200])
    return model, plan, x[200:216]


def test_a_second_convolution_runs_band_by_band(conv_conv, monkeypatch):
    """With chunks of one row of the first convolution, the second one's outputs are
    computed band by band as soon as the rows they read are in: its accumulated outputs
    held at once stay well below the whole layer, the response is byte for byte the one
    computed in one piece (re-randomisation, random by design, left out), and it agrees
    with onnxruntime within the predicted error."""
    from she.runtime.privacy import Rerandomiser

    monkeypatch.setattr(Rerandomiser, "__call__", lambda self, raw: raw)
    model, plan, x = conv_conv
    client = she.Client(plan.spec())
    whole_server = she.Server(plan)
    keys = whole_server.load_context(client.public_context())
    request = client.encrypt(x)
    whole = whole_server.evaluate(keys, request)
    layer1 = plan.layers[1].weights.shape[0] * 2 * plan.params.poly_modulus_degree * 8 \
        * plan.levels()[1]
    assert whole_server.engine.peak_accumulated_bytes >= layer1  # one chunk: all of it

    # chunks of one row of the second convolution (2 channels x 7 units), of one row or
    # less of the first: a row of the second reads 3 rows of the first, so at most 2 of
    # its 7 rows are open at a time
    n = plan.params.poly_modulus_degree
    monkeypatch.setattr(she.plan.compiler, "BATCH_CHUNK_BYTES", 3 * 8 * 2 * n * plan.levels()[1] * 14)
    streamed = she.Server(plan)
    chunks = streamed.engine.chunks
    assert len(chunks[0]) in (14, 28) and len(chunks[1]) == 7 and len(chunks[2]) == 1
    assert streamed.evaluate(keys, request) == whole
    output = 10 * 2 * n * 8 * plan.levels()[2]  # the last layer's, held whole
    assert streamed.engine.peak_accumulated_bytes <= 2 / 7 * layer1 + output
    out = client.decrypt(whole)
    plain = model.run_plain(x)
    assert np.abs(out - plain).max() < plan.predicted_error
    assert np.mean(out.argmax(1) == plain.argmax(1)) >= 0.99


def test_scratch_left_by_a_killed_process_is_removed(tmp_path):
    """A server killed before its cleanup (SIGKILL, the OOM killer) leaves its SEAL scratch
    directory in memory (/dev/shm); the next bridge removes it, and only it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"she-{dead.pid}-abcd1234"
    alive = tmp_path / f"she-{os.getpid()}-abcd1234"
    unrelated = tmp_path / "she-notapid"
    for d in (orphan, alive, unrelated):
        d.mkdir()
        (d / "u0").write_bytes(b"x" * 1000)
    assert remove_orphaned_scratch(tmp_path) == 1
    assert not orphan.exists() and alive.exists() and unrelated.exists()

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    bridge = SealBridge(ctx)
    assert bridge.unit_path(0).split(os.sep)[-2].startswith(f"she-{os.getpid()}-")
    bridge.close()


def test_exact_weights_needing_two_primes_per_rescale_are_rounded_to_one(mnist_dir, tmp_path):
    """Batch packing: power-of-two weights exact only at a shift of 19 need a 26 + 2*19 =
    64-bit rescale (two primes) at the ladder's first scale; the default ladder also tries
    them rounded to the largest shift whose rescale fits one prime (17), keeps that cheaper
    plan, and its encrypted results stay within its predicted error of the float model."""
    from conftest import _small_mnist, square_features_model

    x, y = _small_mnist(mnist_dir, "train", 2000)
    rng = np.random.default_rng(19)
    w1 = np.round(rng.normal(0, 0.5, (12, 49)) * 2.0 ** 19) * 2.0 ** -19  # exact at f = 19
    b1 = rng.normal(0, 0.2, 12)
    path = tmp_path / "exact.onnx"  # w1 stays exact: 21 bits
    onnx.save(square_features_model(x, y, w1, b1, "exact"), str(path))
    model = she.load(str(path))
    exact = she.compile(model, calibration=x[:500], scale_bits=26, weight_bits=12)
    assert exact.layers[0].shift == 19 and exact.layers[0].rescale_primes == 2
    plan = she.compile(model, calibration=x[:500])
    assert plan.layers[0].shift == she.plan.compiler._rescale_cap(26) == 17
    assert plan.layers[0].rescale_primes == 1
    assert len(plan.params.primes) < len(exact.params.primes)
    x_test, _ = _small_mnist(mnist_dir, "test", 64)
    server, client = she.Server(plan), she.Client(plan.spec())
    keys = server.load_context(client.public_context())
    out = client.decrypt(server.evaluate(keys, client.encrypt(x_test)))
    reference = model.run_plain(x_test)
    assert np.abs(out - reference).max() <= plan.predicted_error
    assert np.array_equal(out.argmax(1), reference.argmax(1))
