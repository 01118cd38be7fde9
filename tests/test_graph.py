"""Graphs beyond chains: skip connections, Concat, branches, means, CIFAR-sized layers.

Lowering is checked against onnxruntime; encrypted residual networks (batch and single
packing) against their onnxruntime plaintext on real MNIST images; the scale alignment at
additions exactly; and the memory of lowering against the size of the layers.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from conftest import onnx_model
from onnx import helper

import she
from she.frontend.lowering import lower
from she.io.data import load_idx_dataset
from she.pipeline import encrypted_predict
from she.plan.compiler import ALIGN_SLACK_BITS


def _model(nodes, inits, shape, out_dim=10, opset=17) -> she.Model:
    proto = onnx_model(nodes, inits, in_shape=shape, out_shape=(out_dim,), out="out", opset=opset)
    return she.frontend.model.from_proto(proto, "graph")


def _pow2(rng, shape, scale):
    """Random power-of-two weights (like a converted model's) of at least scale / 8."""
    w = rng.normal(0, scale, shape)
    return np.sign(w) * 2.0 ** np.round(np.log2(np.clip(np.abs(w), scale / 8, None)))


def _conv(name, x, w, b=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [name], name=name, **attrs)


def residual_model(shape=(3, 16, 16), channels=4, pow2=False, seed=0,
                   pool="GlobalAveragePool") -> she.Model:
    """stem conv -> x^2 -> [conv -> x^2 -> conv] + identity -> x^2 -> [conv] + 1x1
    projection (stride 2) -> x^2 -> pooled mean -> Gemm."""
    rng = np.random.default_rng(seed)
    weights = _pow2 if pow2 else (lambda r, s, sc: r.normal(0, sc, s))
    c, n = shape[0], channels
    inits = {
        "w0": weights(rng, (n, c, 3, 3), 0.4), "b0": rng.normal(0, 0.1, n),
        "w1": weights(rng, (n, n, 3, 3), 0.3), "w2": weights(rng, (n, n, 3, 3), 0.3),
        "b2": rng.normal(0, 0.1, n), "w3": weights(rng, (2 * n, n, 3, 3), 0.3),
        "wp": weights(rng, (2 * n, n, 1, 1), 0.5), "fc": weights(rng, (10, 2 * n), 0.5),
        "fcb": rng.normal(0, 0.1, 10), "half": np.array(0.5),
    }
    nodes = [
        _conv("c0", "input", "w0", "b0", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c0", "c0"], ["s0"]),
        _conv("c1", "s0", "w1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c1", "c1"], ["s1"]),
        _conv("c2", "s1", "w2", "b2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "s0"], ["r1"], name="skip"),
        helper.make_node("Mul", ["r1", "half"], ["r1h"]),
        helper.make_node("Mul", ["r1h", "r1h"], ["s2"]),
        _conv("c3", "s2", "w3", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        _conv("proj", "s2", "wp", kernel_shape=[1, 1], strides=[2, 2]),
        helper.make_node("Add", ["c3", "proj"], ["r2"]),
        helper.make_node("Mul", ["r2", "r2"], ["s3"]),
    ]
    if pool == "GlobalAveragePool":
        nodes += [helper.make_node("GlobalAveragePool", ["s3"], ["g"]),
                  helper.make_node("Flatten", ["g"], ["f"])]
    else:  # x.mean(dim=(2, 3)) as the torch exporter writes it (opset 17: axes attribute)
        nodes += [helper.make_node("ReduceMean", ["s3"], ["f"], axes=[2, 3], keepdims=0)]
    nodes.append(helper.make_node("Gemm", ["f", "fc", "fcb"], ["out"], transB=1))
    return _model(nodes, inits, shape)


def test_residual_graph_lowers_exactly():
    model = residual_model(pool="ReduceMean")
    chain = lower(model)
    assert not chain.is_chain and chain.depth == 4 and chain.squares == 4
    # the block after the identity skip reads the stem's square and the block's own
    assert chain.layers[2].sources == (1, 2)
    x = np.random.default_rng(1).uniform(0, 1, (20, 3, 16, 16))
    np.testing.assert_allclose(chain.run(x), model.run_plain(x), atol=1e-4, rtol=1e-4)


def test_cifar_sized_graph_lowers_exactly():
    """3x32x32 input, a 32768-unit first layer: lowered sparse, checked against onnxruntime."""
    model = residual_model(shape=(3, 32, 32), channels=32, seed=2)
    chain = lower(model)
    assert chain.layers[0].n_out == 32 * 16 * 16
    x = np.random.default_rng(2).uniform(0, 1, (4, 3, 32, 32))
    np.testing.assert_allclose(chain.run(x), model.run_plain(x), atol=1e-3, rtol=1e-4)


def _branches(spelling: str) -> she.Model:
    """A conv and its square's mean (ReduceMean with axes as an attribute (opset < 18) or
    an input (opset >= 18), keepdims, or GlobalAveragePool), beside a second branch, the
    mean of the conv itself squared on its own; both concatenated, then MatMul."""
    rng = np.random.default_rng(4)
    inits = {"w": rng.normal(0, 0.5, (4, 1, 3, 3)), "fc": rng.normal(0, 0.5, (8, 10)),
             "axes": np.array([2, 3], dtype=np.int64), "shape": np.array([0, -1], dtype=np.int64),
             "two": np.array(2.0)}
    nodes = [_conv("c", "input", "w", kernel_shape=[3, 3]),
             helper.make_node("Mul", ["c", "c"], ["sq"])]
    opset = 17
    if spelling == "attribute":
        nodes.append(helper.make_node("ReduceMean", ["sq"], ["m"], axes=[2, 3], keepdims=0))
    elif spelling == "input":
        opset = 18
        nodes.append(helper.make_node("ReduceMean", ["sq", "axes"], ["m"], keepdims=0))
    else:
        nodes += [helper.make_node("ReduceMean", ["sq"], ["m4"], axes=[-1, -2])
                  if spelling == "keepdims" else helper.make_node("GlobalAveragePool", ["sq"], ["m4"]),
                  helper.make_node("Reshape", ["m4", "shape"], ["m"])]
    nodes += [helper.make_node("GlobalAveragePool", ["c"], ["gc"]),
              helper.make_node("Flatten", ["gc"], ["fc_in"]),
              helper.make_node("Pow", ["fc_in", "two"], ["branch"]),
              helper.make_node("Concat", ["m", "branch"], ["both"], axis=1),
              helper.make_node("MatMul", ["both", "fc"], ["out"])]
    return _model(nodes, inits, (1, 12, 12), opset=opset)


@pytest.mark.parametrize("spelling", ["attribute", "input", "keepdims", "global"])
def test_mean_spellings(spelling):
    """Every mean spelling, then a branch concatenated with its own square, lowers exactly."""
    model = _branches(spelling)
    chain = lower(model)
    assert chain.layers[-1].sources == (1, 2)
    x = np.random.default_rng(4).uniform(0, 1, (10, 1, 12, 12))
    np.testing.assert_allclose(chain.run(x), model.run_plain(x), atol=1e-5, rtol=1e-5)


def test_single_packing_runs_branches_with_their_own_squares(mnist_dir):
    """Two squares at one depth (one branch per square, both reading the input, which is
    then not replicated), concatenated: single packing at N=8192 within the predicted error
    of onnxruntime on real MNIST (central 12x12)."""
    x, _ = load_idx_dataset(mnist_dir, "test")
    x = np.ascontiguousarray(x[:200, :, 8:20, 8:20])
    model = _branches("global")
    plan = she.compile(model, calibration=x, packing="single")
    assert [layer.sources for layer in plan.layers] == [(0,), (0,), (1, 2)]
    assert plan.params.poly_modulus_degree == 8192 and plan.layouts()[0].replicas == 1
    assert plan.levels()[0] == plan.levels()[1]  # one depth, one level
    server, client = she.Server(plan), she.Client(plan.spec())
    keys = server.load_context(client.public_context())
    for image, reference in zip(x[:3], model.run_plain(x[:3]), strict=True):
        out = client.decrypt(server.evaluate(keys, client.encrypt(image[None])))[0]
        assert np.abs(out - reference).max() < plan.predicted_error


def _lowering_peak(side: int) -> int:
    model = residual_model(shape=(3, side, side), channels=16, seed=5)
    tracemalloc.start()
    try:
        lower(model)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_lowering_memory_is_linear_in_positions():
    """4x the positions (same weights) costs about 4x the memory, not 16x (dense maps)."""
    small, large = _lowering_peak(16), _lowering_peak(32)
    assert 2.5 < large / small < 6.0, (small, large)


def wide_model(seed=3) -> she.Model:
    """3x32x32 -> conv 3->32 (32768 units) -> x^2 -> avgpool 2x2 -> conv 32->16 -> x^2 ->
    global mean -> Gemm, power-of-two weights."""
    rng = np.random.default_rng(seed)
    inits = {"w0": _pow2(rng, (32, 3, 3, 3), 0.3), "w1": _pow2(rng, (16, 32, 3, 3), 0.05),
             "fc": _pow2(rng, (10, 16), 0.5)}
    nodes = [_conv("c0", "input", "w0", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c0", "c0"], ["s0"]),
             helper.make_node("AveragePool", ["s0"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             _conv("c1", "p", "w1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c1", "c1"], ["s1"]),
             helper.make_node("GlobalAveragePool", ["s1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["out"], transB=1)]
    return _model(nodes, inits, (3, 32, 32))


def test_32768_unit_layer_lowers_and_compiles_in_little_memory():
    model = wide_model()
    x = np.random.default_rng(3).uniform(0, 1, (8, 3, 32, 32))
    tracemalloc.start()
    try:
        plan = she.compile(model, calibration=x, scale_bits=26, weight_bits=12)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert plan.layers[0].weights.shape == (32 * 32 * 32, 3 * 32 * 32)
    assert peak < 2**30, f"lowering and compiling took {peak / 2**30:.2f} GiB"
    assert plan.params.security >= 128 and plan.depth == 2
    np.testing.assert_allclose(plan.chain.run(x), model.run_plain(x), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    """MNIST test images, their central 16x16 (few input ciphertexts: a fast test)."""
    x, _ = load_idx_dataset(mnist_dir, "test")
    return x[:200, :, 6:22, 6:22]


def _mnist_residual() -> she.Model:
    """conv(stride 2) -> x^2 -> [conv -> x^2 -> conv] + identity skip -> x^2 -> avg pool ->
    Gemm (MNIST's central 16x16), power-of-two weights."""
    rng = np.random.default_rng(7)
    inits = {"w0": _pow2(rng, (2, 1, 3, 3), 0.5), "b0": rng.normal(0, 0.1, 2),
             "w1": _pow2(rng, (2, 2, 3, 3), 0.3), "w2": _pow2(rng, (2, 2, 3, 3), 0.1),
             "fc": _pow2(rng, (10, 2 * 4 * 4), 0.3)}
    nodes = [
        _conv("c0", "input", "w0", "b0", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c0", "c0"], ["s0"]),
        _conv("c1", "s0", "w1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c1", "c1"], ["s1"]),
        _conv("c2", "s1", "w2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "s0"], ["r"], name="skip"),
        helper.make_node("Mul", ["r", "r"], ["s2"]),
        helper.make_node("AveragePool", ["s2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["out"], transB=1),
    ]
    return _model(nodes, inits, (1, 16, 16))


@pytest.fixture(scope="module")
def residual_plan(mnist):
    """Aligned by the integer weights."""
    return she.compile(_mnist_residual(), calibration=mnist, skip_alignment="integer")


def test_scales_and_levels_align_exactly_at_a_skip(residual_plan):
    """The skip layer works at its deepest source's level; every column of integer weights
    lands at the layer's scale: exactly for the reference source, within the rounding of
    the scale ratio (``2^-(F+1)`` per weight) for the shallower one."""
    plan = residual_plan
    limbs, scales, refs = plan.sources()
    skip = plan.layers[2]
    assert skip.sources == (1, 2) and refs[2] == 2 and plan.depth == 3
    assert limbs[1] > limbs[2] == plan.levels()[2]
    assert skip.shift >= round(np.log2(plan.input_scale)) - ALIGN_SLACK_BITS
    real = plan.chain.layers[2].matrix.tocsr()
    start = 0
    for s in skip.sources:
        size = plan.chain.source_sizes[s]
        ratio = scales[refs[2]] / scales[s]
        weights = skip.weights[:, start:start + size].toarray().astype(np.float64)
        err = np.abs(weights * 2.0 ** -skip.shift / ratio - real[:, start:start + size]).max()
        if s == refs[2]:
            assert ratio == 1.0 and err == 0.0  # power-of-two weights: exact
        else:
            assert ratio != 1.0 and 0 < err <= 2.0 ** -(skip.shift + 1) / ratio
        start += size
    assert skip.weight_error <= 2.0 ** -(skip.shift + 1) / min(
        scales[2] / scales[s] for s in skip.sources)


def _assert_encrypted_agrees(plan, model, x) -> None:
    """Encrypted outputs within the plan's predicted error of the plaintext model's, and the
    same class for every image."""
    enc, _ = encrypted_predict(plan, x)
    plain = model.run_plain(x)
    assert np.abs(enc - plain).max() < plan.predicted_error
    assert np.mean(enc.argmax(1) == plain.argmax(1)) == 1.0


def test_encrypted_residual_network_agrees_with_onnxruntime(residual_plan, mnist):
    plan = residual_plan
    model = _mnist_residual()
    _assert_encrypted_agrees(plan, model, mnist[:32])


def _mnist_projection() -> she.Model:
    """conv(stride 2) -> x^2 -> conv -> x^2 -> conv(stride 2) minus a 1x1-projection skip
    (stride 2) of the first square, concatenated with that square's global average pool ->
    Gemm (MNIST's central 16x16), power-of-two weights: depth 2, the output layer adds two
    sources (Sub, Concat, GlobalAveragePool)."""
    rng = np.random.default_rng(11)
    inits = {"w0": _pow2(rng, (4, 1, 3, 3), 0.3), "b0": rng.normal(0, 0.1, 4),
             "w1": _pow2(rng, (4, 4, 3, 3), 0.1), "w2": _pow2(rng, (8, 4, 3, 3), 0.1),
             "wp": _pow2(rng, (8, 4, 1, 1), 0.3), "fc": _pow2(rng, (10, 8 * 4 * 4 + 4), 0.3)}
    nodes = [
        _conv("c0", "input", "w0", "b0", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c0", "c0"], ["s0"]),
        _conv("c1", "s0", "w1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c1", "c1"], ["s1"]),
        _conv("c2", "s1", "w2", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        _conv("proj", "s0", "wp", kernel_shape=[1, 1], strides=[2, 2]),
        helper.make_node("Sub", ["c2", "proj"], ["r"], name="skip"),
        helper.make_node("Flatten", ["r"], ["rf"]),
        helper.make_node("GlobalAveragePool", ["s0"], ["g"]),
        helper.make_node("Flatten", ["g"], ["gf"]),
        helper.make_node("Concat", ["rf", "gf"], ["cat"], axis=1),
        helper.make_node("Gemm", ["cat", "fc"], ["out"], transB=1),
    ]
    return _model(nodes, inits, (1, 16, 16))


def _assert_single_agrees(plan, model, x) -> None:
    """Single packing: one client and server, every image encrypted on its own; outputs
    within the predicted error of onnxruntime's, the same class."""
    server, client = she.Server(plan), she.Client(plan.spec())
    keys = server.load_context(client.public_context())
    plain = model.run_plain(x)
    for image, reference in zip(x, plain, strict=True):
        out = client.decrypt(server.evaluate(keys, client.encrypt(image[None])))[0]
        assert np.abs(out - reference).max() < plan.predicted_error
        assert out.argmax() == reference.argmax()


def _assert_aligned(plan, index) -> None:
    """Single packing: layer ``index`` adds products over sources of different depths; the
    shallower ones are brought to the reference's level, and every block's diagonals are
    encoded so that its product lands at the reference product's scale (what SEAL's
    addition needs; the engine checks it to 1e-12)."""
    limbs, scales, refs = plan.sources()
    layer, ref = plan.layers[index], refs[index]
    assert len({limbs[s] for s in layer.sources}) > 1 and plan.levels()[index] == limbs[ref]
    diag = [plan.diagonal_scales()[b] for b in plan.layer_blocks()[index]]
    products = [scales[s] * d for s, d in zip(layer.sources, diag, strict=True)]
    np.testing.assert_allclose(products, products[layer.sources.index(ref)], rtol=1e-14)
    assert diag[layer.sources.index(ref)] in (2.0 ** layer.shift,
                                              float(plan.params.ciphertext_primes[limbs[ref] - 1]))


def test_single_packing_runs_a_projection_skip_with_concat(mnist):
    """Sub of a 1x1-projection skip, Concat and GlobalAveragePool, in single packing at
    N=8192: the encrypted result agrees with onnxruntime on real MNIST images."""
    model = _mnist_projection()
    plan = she.compile(model, calibration=mnist, packing="single")
    assert plan.packing == "single" and plan.params.poly_modulus_degree == 8192
    assert plan.layers[-1].sources == (1, 2) and plan.depth == 2
    _assert_aligned(plan, len(plan.layers) - 1)
    # keys only for the steps the blocks rotate by
    assert set(plan.rotation_steps()) == set().union(*(lay.rotation_steps
                                                       for lay in plan.layouts()))
    _assert_single_agrees(plan, model, mnist[:4])


def test_single_packing_runs_an_identity_skip(mnist):
    """The identity skip across an activation, squared after the addition (depth 3): the
    skip layer adds the stem's square (brought down to its level) and the block's own; the
    placement keeps the skip's product cheap; encrypted agrees with onnxruntime."""
    model = _mnist_residual()
    plan = she.compile(model, calibration=mnist, packing="single")
    assert plan.layers[2].sources == (1, 2) and plan.depth == 3
    _assert_aligned(plan, 2)
    skip = plan.layouts()[plan.layer_blocks()[2][0]]  # the block over the stem's square
    assert len(skip.used) <= 2 and skip.rotations <= 2
    _assert_single_agrees(plan, model, mnist[:2])


def test_too_deep_a_plan_says_what_it_needs():
    """Six activation levels fit N=32768 at 128-bit security; twenty do not, and the error
    names the modulus bits and the largest ring."""
    rng = np.random.default_rng(9)

    def deep(levels):
        # rows of L1 norm <= 1 keep every value in [-1, 1] (sound interval bounds)
        inits = {"w0": rng.uniform(-1, 1, (16, 784)) / 784, "w": rng.uniform(-1, 1, (16, 16)) / 16,
                 "fc": rng.uniform(-1, 1, (10, 16)) / 16}
        nodes = [helper.make_node("Flatten", ["input"], ["f"]),
                 helper.make_node("Gemm", ["f", "w0"], ["h0"], transB=1)]
        for i in range(levels):
            nodes.append(helper.make_node("Mul", [f"h{i}", f"h{i}"], [f"s{i}"]))
            nodes.append(helper.make_node("Gemm", [f"s{i}", "w" if i < levels - 1 else "fc"],
                                          [f"h{i + 1}" if i < levels - 1 else "out"], transB=1))
        return _model(nodes, inits, (1, 28, 28))

    plan = she.compile(deep(6), scale_bits=26, weight_bits=12)
    assert plan.depth == 6 and plan.params.security == 128
    assert plan.params.poly_modulus_degree <= 32768
    for packing in ("batch", "single"):
        with pytest.raises(she.ParameterError, match=r"\d+-bit coefficient modulus.*N=32768"):
            she.compile(deep(20), scale_bits=26, weight_bits=12, packing=packing)


def test_single_packing_refuses_a_layer_wider_than_a_ciphertext():
    """A 32768-unit layer does not fit single packing's largest ciphertext: a clear error
    (not a MemoryError from a dense matrix)."""
    rng = np.random.default_rng(11)
    model = _model([_conv("c", "input", "w", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                    helper.make_node("Mul", ["c", "c"], ["s"]),
                    helper.make_node("GlobalAveragePool", ["s"], ["g"]),
                    helper.make_node("Flatten", ["g"], ["f"]),
                    helper.make_node("Gemm", ["f", "fc"], ["out"], transB=1)],
                   {"w": rng.normal(0, 0.3, (32, 3, 3, 3)), "fc": rng.normal(0, 0.3, (10, 32))},
                   (3, 32, 32))
    with pytest.raises(she.ParameterError, match="at most 16384 values per ciphertext.*"
                       "would need N=65536"):
        she.compile(model, packing="single")


def test_index_maps_and_matmul_on_feature_maps_lower_exactly():
    """Transpose, Slice, Pad, MatMul on the last axis of a feature map, ReduceSum, a constant
    minus an encrypted tensor, Neg, and Concat of two slices of one tensor."""
    rng = np.random.default_rng(12)
    inits = {"w": rng.normal(0, 0.5, (3, 1, 3, 3)), "m": rng.normal(0, 0.5, (3, 5)),
             "starts": np.array([1, 0], dtype=np.int64), "ends": np.array([9, 4], dtype=np.int64),
             "axes": np.array([1, 3], dtype=np.int64), "k": rng.normal(0, 1, (1, 8, 10, 5)),
             "raxes": np.array([3], dtype=np.int64), "pads": np.array([0, 1, 0, 0, 0, 2],
                                                                     dtype=np.int64),
             "fc": rng.normal(0, 0.3, (10, 17 + 8)), "shape": np.array([0, -1], dtype=np.int64)}
    nodes = [
        _conv("c", "input", "w", kernel_shape=[3, 3]),                  # (3, 10, 10)
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),  # (10, 10, 3)
        helper.make_node("Slice", ["t", "starts", "ends", "axes"], ["s"]),  # (8, 10, 3)
        helper.make_node("MatMul", ["s", "m"], ["mm"]),                 # (8, 10, 5)
        helper.make_node("Sub", ["k", "mm"], ["d"]),
        helper.make_node("Neg", ["d"], ["n"]),
        helper.make_node("Mul", ["n", "n"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "raxes"], ["r"], keepdims=1),  # (8, 10, 1)
        helper.make_node("ReduceMean", ["r", "raxes"], ["r2"], keepdims=0),  # (8, 10)
        helper.make_node("Pad", ["r2", "pads"], ["p"], mode="constant"),  # (9, 12)
        helper.make_node("Reshape", ["p", "shape"], ["flat"]),           # 108
        helper.make_node("Slice", ["flat", "s0", "e0", "a0"], ["part"]),  # 17
        helper.make_node("Slice", ["flat", "s1", "e1", "a0", "step"], ["tail"]),  # 8, step -3
        helper.make_node("Concat", ["part", "tail"], ["cat"], axis=1),  # 25
        helper.make_node("Gemm", ["cat", "fc"], ["out"], transB=1),
    ]
    inits.update({"s0": np.array([3], dtype=np.int64), "e0": np.array([20], dtype=np.int64),
                  "a0": np.array([1], dtype=np.int64), "s1": np.array([-1], dtype=np.int64),
                  "e1": np.array([-25], dtype=np.int64), "step": np.array([-3], dtype=np.int64)})
    model = _model(nodes, inits, (1, 12, 12), opset=18)
    chain = lower(model)
    x = rng.uniform(0, 1, (6, 1, 12, 12))
    np.testing.assert_allclose(chain.run(x), model.run_plain(x), atol=1e-4, rtol=1e-4)


def test_early_rescale_alignment_agrees_with_onnxruntime(mnist):
    """The other alignment: the shallower source's terms are multiplied by an integer and
    rescaled to the skip layer's level in SEAL, so the layer keeps its own small shift."""
    model = _mnist_residual()
    plan = she.compile(model, calibration=mnist, skip_alignment="rescale")
    skip = plan.layers[2]
    assert skip.early_sources == (1,) and skip.exact
    assert skip.shift < round(np.log2(plan.input_scale)) - ALIGN_SLACK_BITS
    integer = she.compile(model, calibration=mnist, skip_alignment="integer")
    assert plan.params.total_bits < integer.params.total_bits
    # the default takes the cheaper: here the early rescale, at a finer scale, in fewer primes
    auto = she.compile(model, calibration=mnist)
    assert auto.layers[2].early_sources == (1,)
    assert len(auto.params.primes) <= len(integer.params.primes)
    _assert_encrypted_agrees(plan, model, mnist[:32])


def test_encrypted_operands_broadcast():
    """A feature map minus its mean over channels (GHN's per-patch mean): the (1, H, W)
    operand is broadcast over the channels, then squared."""
    rng = np.random.default_rng(13)
    model = _model([_conv("c", "input", "w", kernel_shape=[3, 3]),
                    helper.make_node("ReduceMean", ["c"], ["m"], axes=[1], keepdims=1),
                    helper.make_node("Sub", ["c", "m"], ["d"]),
                    helper.make_node("Mul", ["d", "d"], ["s"]),
                    helper.make_node("Flatten", ["s"], ["f"]),
                    helper.make_node("Gemm", ["f", "fc"], ["out"], transB=1)],
                   {"w": rng.normal(0, 0.5, (4, 1, 3, 3)), "fc": rng.normal(0, 0.1, (10, 144))},
                   (1, 8, 8))
    x = rng.uniform(0, 1, (5, 1, 8, 8))
    np.testing.assert_allclose(lower(model).run(x), model.run_plain(x), atol=1e-5, rtol=1e-5)


def test_inspect_compiles_a_residual_model_in_single_packing_when_asked(mnist, tmp_path, capsys):
    """``she inspect --packing single`` on a residual model: a single-packing plan whose skip
    layer reads two sources; BFV, which runs chains only, is refused with the reason."""
    import json

    import onnx

    from she.cli import main

    path, cal = tmp_path / "residual.onnx", tmp_path / "cal.npy"
    onnx.save(_mnist_projection().proto, path)
    np.save(cal, mnist.astype(np.float32))
    assert main(["inspect", str(path), "--calibration", str(cal), "--packing", "single",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["packing"] == "single" and report["layers"][-1]["sources"] == [1, 2]
    assert report["galois_steps"] and report["rotations"] > 0
    assert main(["inspect", str(path), "--scheme", "bfv"]) == 2
    assert "BFV runs chains of layers only" in capsys.readouterr().err


def test_single_packing_runs_a_skip_from_the_input(mnist):
    """``x^2 + x`` of a dense layer: the output reads the input (then not replicated, and
    brought down to the output layer's level) and the square; within the predicted error
    of onnxruntime on real MNIST."""
    rng = np.random.default_rng(5)
    model = _model([helper.make_node("Flatten", ["input"], ["f"]),
                    helper.make_node("Gemm", ["f", "w"], ["h"], transB=1),
                    helper.make_node("Mul", ["h", "h"], ["s"]),
                    helper.make_node("Add", ["s", "h"], ["r"]),
                    helper.make_node("Gemm", ["r", "fc"], ["out"], transB=1)],
                   {"w": _pow2(rng, (64, 256), 0.05), "fc": _pow2(rng, (10, 64), 0.3)},
                   (1, 16, 16))
    plan = she.compile(model, calibration=mnist, packing="single")
    assert plan.layers[-1].sources == (0, 1) and plan.layouts()[0].replicas == 1
    _assert_aligned(plan, 1)
    _assert_single_agrees(plan, model, mnist[:3])


def test_she_serve_accepts_a_session_whose_keys_exceed_the_default_cap(mnist):
    """A single-packing plan's keys (Galois keys for every step) may be larger than the
    service's context cap: the cap is raised to what the served model's keys need, so a
    session registers (here with the cap set to 1 MiB and 17 MiB of keys)."""
    from fastapi.testclient import TestClient

    from she.serve.service import ServiceConfig, create_app

    plan = she.compile(_mnist_projection(), calibration=mnist, packing="single")
    server, client = she.Server(plan), she.Client(plan.spec())
    context = client.public_context()
    assert len(context) > 1 << 20
    http = TestClient(create_app({"m": server}, ServiceConfig(max_context_bytes=1 << 20)))
    answer = http.post("/v1/models/m/sessions", content=context)
    assert answer.status_code == 201, answer.text
