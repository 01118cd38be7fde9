"""The compiler's memory grows with the number of weights, not with the precision ladder.

``she.compile`` tries every rung of :data:`she.plan.compiler.PRECISION_LADDER` (twice in
batch packing: exact weights and weights rounded to one prime's rescale). It once kept every
rung's quantised copy of every layer (integer weights and an error matrix, each with its own
index arrays) and every compiled rung's copies: a degree-4 CNN of 70 M lowered weights
peaked at 22 GiB. Now a rung keeps what later rungs read, and one layer's copies share its
index arrays; the peak is a few copies of the weights (see docs/architecture.md).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from conftest import onnx_model
from onnx import helper

import she
from she.frontend.lowering import lower
from she.frontend.model import from_proto
from she.io.data import load_idx_dataset
from she.plan import compiler

#: Bound on the compile's traced peak (the chain is lowered before tracing starts), in units
#: of the lowered chain's non-zeros times 8 bytes (one float64 per weight). Measured on the
#: model below (20 calibration images): 33.9 before the change (every rung's quantisation
#: with its error matrix, 2 x 12 bytes a weight, and its plan's copies), 9.8 after: the
#: current weight_bits' two quantisations (int64 data sharing the chain's indices: 2), the
#: best and the current rung's plan weights (int64 and int32 indices: 3), effective weights
#: (1), one layer's squares in the error model (1.5), the quantised model's activations. The
#: 22 GiB compile of a 70 M-weight CNN was about 40.
PEAK_PER_WEIGHT = 16
CALIBRATION = 20


def _degree4(name: str, x: str, coefficients: tuple[float, float, float]) -> list:
    """``c4 x^4 + c2 x^2 + c1 x`` as ONNX nodes (the converters' polynomial activations)."""
    c4, c2, c1 = coefficients
    return [
        helper.make_node("Mul", [x, x], [f"{name}_x2"], name=f"{name}_sq"),
        helper.make_node("Mul", [f"{name}_x2", f"{name}_x2"], [f"{name}_x4"], name=f"{name}_q"),
        helper.make_node("Mul", [f"{name}_x4", f"{name}_c4"], [f"{name}_a"], name=f"{name}_m4"),
        helper.make_node("Mul", [f"{name}_x2", f"{name}_c2"], [f"{name}_b"], name=f"{name}_m2"),
        helper.make_node("Mul", [x, f"{name}_c1"], [f"{name}_c"], name=f"{name}_m1"),
        helper.make_node("Add", [f"{name}_a", f"{name}_b"], [f"{name}_ab"], name=f"{name}_s1"),
        helper.make_node("Add", [f"{name}_ab", f"{name}_c"], [name], name=f"{name}_s2"),
    ]


def _pooled_degree4_cnn(seed: int = 7) -> onnx.ModelProto:
    """Conv(1->8, 3x3, pads 1) -> AveragePool 2 -> degree 4 -> Conv(8->8, 3x3, pads 1) ->
    AveragePool 2 -> degree 4 -> Flatten -> Gemm(392->10), seeded random weights."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.normal(0, 0.3, (8, 1, 3, 3)), "b1": rng.normal(0, 0.1, 8),
             "w2": rng.normal(0, 0.1, (8, 8, 3, 3)), "b2": rng.normal(0, 0.1, 8),
             "w3": rng.normal(0, 0.5, (10, 8 * 7 * 7)), "b3": np.zeros(10)}
    for name, c in (("a1", (0.05, 0.3, 0.5)), ("a2", (0.05, 0.3, 0.5))):
        inits |= {f"{name}_c4": c[0], f"{name}_c2": c[1], f"{name}_c1": c[2]}
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["c1"], ["p1"], name="pool1", kernel_shape=[2, 2],
                         strides=[2, 2]),
        *_degree4("a1", "p1", (0.05, 0.3, 0.5)),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["c2"], ["p2"], name="pool2", kernel_shape=[2, 2],
                         strides=[2, 2]),
        *_degree4("a2", "p2", (0.05, 0.3, 0.5)),
        helper.make_node("Flatten", ["a2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    return onnx_model(nodes, inits, name="pooled_degree4")


@pytest.fixture(scope="module")
def chain_and_calibration(mnist_dir):
    chain = lower(from_proto(_pooled_degree4_cnn(), "pooled_degree4"))
    x, _ = load_idx_dataset(mnist_dir, "train")
    return chain, x[:CALIBRATION].astype(np.float64)


def test_compile_peak_memory_is_a_few_copies_of_the_weights(chain_and_calibration):
    chain, cal = chain_and_calibration
    nnz = sum(compiler._nonzero(layer.matrix) for layer in chain.layers)
    assert chain.depth == 4 and nnz > 100_000  # the ladder's rungs hold wide quantisations
    tracemalloc.start()
    try:
        plan = she.compile(chain, calibration=cal, packing="batch")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_weight = peak / (8 * nnz)
    print(f"{nnz} weights, compile peak {peak / 2**20:.1f} MiB = {per_weight:.1f} x 8 B per weight")
    assert per_weight < PEAK_PER_WEIGHT
    # the plan is a real one: integer weights of the chain's shapes, a finite prediction
    assert [layer.weights.shape for layer in plan.layers] == [
        layer.matrix.shape for layer in chain.layers]
    assert np.isfinite(plan.predicted_error) and plan.predicted_error > 0
