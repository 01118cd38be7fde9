"""BFV: kernels bit-exact against SEAL's evaluator, the plaintext modulus from range
analysis, refusals, and encrypted MNIST equal to the quantised model exactly."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
from conftest import onnx_model, toy_model_proto
from onnx import helper

import she
from she.errors import ParameterError
from she.io import wire
from she.io.context import SealBridge
from she.plan.bfv import integer_bounds
from she.plan.params import EncryptionParameters
from she.runtime.kernels import LinearKernel, add_constant_bfv


def shallow_model_proto(seed: int = 7) -> onnx.ModelProto:
    """Conv(1->3, 5x5, stride 2) -> square -> Flatten -> Gemm(507->10): depth 1."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], name="conv",
                         kernel_shape=[5, 5], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "c"], ["sq"], name="square"),
        helper.make_node("Flatten", ["sq"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    inits = {"conv_w": rng.normal(0, 0.3, (3, 1, 5, 5)), "conv_b": rng.normal(0, 0.1, 3),
             "fc_w": rng.normal(0, 0.1, (10, 507)), "fc_b": rng.normal(0, 0.1, 10)}
    return onnx_model(nodes, inits, name="shallow")


@pytest.fixture(scope="module")
def shallow() -> she.Model:
    return she.frontend.model.from_proto(shallow_model_proto(), "shallow")


@pytest.fixture(scope="module")
def bfv_plan(shallow, toy_calibration) -> she.Plan:
    return she.compile(shallow, scheme="bfv", calibration=toy_calibration)


# -- kernels --------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[[36, 36, 36], [60, 60, 60]], ids=["36-bit", "60-bit"])
def seal_bfv(request):
    t = sealapi.PlainModulus.Batching(8192, 40).value()
    ctx = ts.context(ts.SCHEME_TYPE.BFV, 8192, plain_modulus=t, coeff_mod_bit_sizes=request.param)
    bridge = SealBridge(ctx)
    encoder = sealapi.BatchEncoder(bridge.seal)
    encryptor = sealapi.Encryptor(bridge.seal, ctx.secret_key().data)
    rng = np.random.default_rng(2)
    cts = []
    for _ in range(8):
        plain = sealapi.Plaintext()
        encoder.encode(rng.integers(-1000, 1000, 8192).tolist(), plain)
        ct = sealapi.Ciphertext(bridge.seal)
        encryptor.encrypt_symmetric(plain, ct)
        cts.append(ct)
    yield ctx, bridge, sealapi.Evaluator(bridge.seal), cts, t
    bridge.close()


def _moduli(bridge: SealBridge) -> tuple[int, ...]:
    return bridge.levels[max(bridge.levels)].moduli


@pytest.mark.parametrize("max_weight", [1, 100, 2 ** 20])
def test_bfv_linear_combination_is_bit_exact(seal_bfv, max_weight):
    """The kernel on coefficient-form BFV ciphertexts equals SEAL's negate /
    multiply_plain by a constant / add, coefficient for coefficient."""
    _, bridge, evaluator, cts, _ = seal_bfv
    rng = np.random.default_rng(max_weight)
    weights = rng.integers(-max_weight, max_weight + 1, size=(3, len(cts)))
    weights[0, 1::2] = 0
    raws = [bridge.from_seal(ct) for ct in cts]
    assert not raws[0].ntt_form  # SEAL keeps BFV ciphertexts in coefficient form
    ours = LinearKernel.build(weights, max(_moduli(bridge))).apply(
        np.stack([r.data for r in raws]), _moduli(bridge))
    for o, row in enumerate(weights):
        acc = None
        for w, ct in zip(row, cts, strict=True):
            if w == 0:
                continue
            term = sealapi.Ciphertext(bridge.seal)
            evaluator.multiply_plain(ct, sealapi.Plaintext(format(abs(int(w)), "X")), term)
            if w < 0:
                evaluator.negate_inplace(term)
            if acc is None:
                acc = term
            else:
                evaluator.add_inplace(acc, term)
        assert np.array_equal(ours[o], bridge.from_seal(acc).data), f"row {o}"


def test_bfv_add_constant_matches_seal_add_plain(seal_bfv):
    _, bridge, evaluator, cts, t = seal_bfv
    values = np.array([5, -7, 0, 2 ** 38, -(2 ** 38) + 3], dtype=np.int64)
    data = np.stack([bridge.from_seal(ct).data for ct in cts[:5]]).copy()
    add_constant_bfv(data, values, t, _moduli(bridge))
    encoder = sealapi.BatchEncoder(bridge.seal)
    for i, value in enumerate(values):
        plain = sealapi.Plaintext()
        encoder.encode([int(value)] * 8192, plain)
        out = sealapi.Ciphertext(bridge.seal)
        evaluator.add_plain(cts[i], plain, out)
        assert np.array_equal(data[i], bridge.from_seal(out).data), f"value {value}"


# -- compiling ------------------------------------------------------------------------------

def test_plaintext_modulus_follows_range_analysis(bfv_plan):
    t = bfv_plan.params.plain_modulus
    n = bfv_plan.params.poly_modulus_degree
    assert t % (2 * n) == 1 and bfv_plan.params.slots == n
    layers = bfv_plan.layers
    bounds = integer_bounds([lay.weights for lay in layers], [lay.bias for lay in layers],
                            bfv_plan.input_int_range)
    held = max(float(bounds[0].max()) ** 2, float(bounds[1].max()))
    assert 2 * held < t < 8 * held + 2 ** 18  # holds every value, and not much more
    # The bounds are sound: the extreme inputs of the range stay inside them.
    lo, hi = bfv_plan.input_int_range
    for fill in (lo, hi):
        x = np.full((1, bfv_plan.n_inputs), fill)
        assert np.abs(bfv_plan.run_integers(x)).max() <= bounds[1].max()


def test_fewer_bits_give_a_smaller_plaintext_modulus(shallow):
    wide = she.compile(shallow, scheme="bfv")
    narrow = she.compile(shallow, scheme="bfv", input_bits=4, weight_bits=5)
    assert narrow.params.plain_modulus.bit_length() < wide.params.plain_modulus.bit_length()
    assert narrow.params.total_bits <= wide.params.total_bits


def test_a_model_too_deep_for_bfv_is_refused_naming_the_layer():
    deep = she.frontend.model.from_proto(toy_model_proto(), "toy")
    with pytest.raises(ParameterError, match=r"BFV.*layer \d.*(CKKS)"):
        she.compile(deep, scheme="bfv")


def test_bfv_refuses_single_packing_and_bad_settings(shallow):
    with pytest.raises(ParameterError, match="batch packing only"):
        she.compile(shallow, scheme="bfv", packing="single")
    with pytest.raises(ParameterError, match="input_bits"):
        she.compile(shallow, scheme="bfv", input_bits=0)
    with pytest.raises(ParameterError, match="security"):
        she.compile(shallow, scheme="bfv", security=80)
    with pytest.raises(ParameterError, match="plaintext modulus"):
        EncryptionParameters("bfv", 8192, (60, 60, 60))
    with pytest.raises(ParameterError, match="batching"):
        EncryptionParameters("bfv", 8192, (60, 60, 60), plain_modulus=100003)


# -- encrypted MNIST ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bfv_run(bfv_plan, mnist_dir):
    from she.io.data import load_idx_dataset

    x, y = load_idx_dataset(mnist_dir, "test")
    x = x[:300]
    server = she.Server(bfv_plan)
    client = she.Client(bfv_plan.spec())
    keys = server.load_context(client.public_context())
    response = server.evaluate(keys, client.encrypt(x))
    return x, client, response


def test_encrypted_bfv_equals_the_quantised_model_exactly(bfv_plan, bfv_run, shallow):
    x, client, response = bfv_run
    integers = client.decrypt_raw(response)
    expected = bfv_plan.run_integers(bfv_plan.quantise_inputs(x))
    assert integers.dtype == np.int64
    assert np.array_equal(integers, expected)
    logits = client.decrypt(response)
    assert np.array_equal(logits, expected / bfv_plan.output_scale())
    # ... and the quantised model stays close to the float model (onnxruntime).
    plain = shallow.run_plain(x)
    assert np.mean(logits.argmax(1) == plain.argmax(1)) >= 0.98
    assert np.abs(logits - plain).max() < 0.1 * np.abs(plain).max()


def test_encrypted_bfv_keeps_a_noise_margin(bfv_plan, bfv_run):
    """The noise model leaves budget to spare (SEAL's own measurement)."""
    _, client, response = bfv_run
    msg = wire.unpack(response, kind=wire.KIND_CIPHERTEXTS, max_items=10, max_item_bytes=1 << 26)
    level = client._levels[int(client.spec["output_limbs"])]
    for blob in msg.items[:3]:
        ct = client._bridge.to_seal(she.io.sealbytes.parse(blob, level))
        assert client._decryptor.invariant_noise_budget(ct) >= 5


def test_bfv_client_refuses_inputs_outside_the_declared_range(bfv_plan):
    client = she.Client(bfv_plan.spec())
    x = np.zeros((2, 1, 28, 28))
    x[1, 0, 0, 0] = 1.5  # the model declares inputs in [0, 1]
    with pytest.raises(ParameterError, match="declared input range"):
        client.encrypt(x)


def test_bfv_client_refuses_a_tampered_spec(bfv_plan):
    spec = json.loads(json.dumps(bfv_plan.spec()))
    for key, value in (("input_int_range", [0]), ("input_int_range", [5, 1]),
                       ("input_scale", float("nan")), ("packing", "single")):
        bad = dict(spec, **{key: value})
        with pytest.raises(ParameterError):
            she.Client(bad)
    with pytest.raises(ParameterError):
        she.Client(dict(spec, plain_modulus=str(bfv_plan.params.plain_modulus + 2)))
