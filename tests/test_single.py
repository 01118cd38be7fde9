"""Single packing end to end: one real MNIST image per ciphertext, checked against the
plaintext references (the plan's float64 chain and onnxruntime), plus the key checks."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tenseal.sealapi as sealapi
from conftest import onnx_model

import she
from she.io import compact, wire
from she.io.context import galois_key_bytes
from she.io.data import load_idx_dataset
from she.plan import layout


@pytest.fixture(scope="module")
def single(toy_model_path, toy_calibration):
    plan = she.compile(she.load(toy_model_path), calibration=toy_calibration, packing="single")
    server = she.Server(plan)
    client = she.Client(plan.spec())
    context = client.public_context()
    return plan, server, client, context, server.load_context(context)


@pytest.fixture(scope="module")
def test_images(mnist_dir):
    x, _ = load_idx_dataset(mnist_dir, "test")
    return x[:4]


def test_plan_uses_one_ciphertext_and_few_power_of_two_keys(single):
    plan, *_ = single
    spec = plan.spec()
    assert spec["packing"] == "single"
    assert spec["input_ciphertexts"] == spec["output_ciphertexts"] == spec["batch_capacity"] == 1
    steps = spec["galois_steps"]
    assert steps and all(s & (s - 1) == 0 for s in steps)
    assert plan.params.security >= 128
    # Layers are rescaled right after their product: one extra prime per layer, not 2x bits.
    assert all(layer.product_primes == 1 for layer in plan.layers)


def test_encrypted_single_matches_plaintext(single, test_images, toy_model_path):
    plan, server, client, _, keys = single
    session = ort.InferenceSession(str(toy_model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    reference = session.run(None, {name: test_images.astype(np.float32)})[0]
    for i, image in enumerate(test_images):
        out = client.decrypt(server.evaluate(keys, client.encrypt(image[None])))
        assert out.shape == (1, plan.n_outputs)
        chain = plan.chain.run(image[None].reshape(1, -1))
        assert np.max(np.abs(out - chain)) <= plan.predicted_error
        np.testing.assert_allclose(out[0], reference[i], atol=max(plan.predicted_error, 1e-3))
        assert out.argmax() == reference[i].argmax()


def test_every_slot_holds_an_output_copy_or_nothing(single, test_images):
    """Issue #21 item 5: no slot of a result carries more than the outputs. The output
    layout repeats the outputs with period P (the next power of two); the P - n slots of
    each period beyond the outputs decrypt to zero up to the noise (no partial sums)."""
    plan, server, client, _, keys = single
    from she.io import sealbytes

    msg = wire.unpack(server.evaluate(keys, client.encrypt(test_images[:1])),
                      kind=wire.KIND_CIPHERTEXTS, max_items=1, max_item_bytes=1 << 30)
    level = client._levels[int(client.spec["output_limbs"])]
    plain = sealapi.Plaintext()
    client._decryptor.decrypt(client._bridge.to_seal(sealbytes.parse(msg.items[0], level)), plain)
    slots = np.asarray(client._encoder.decode_double(plain))
    n = plan.n_outputs
    period = layout.period(n)
    chain = plan.chain.run(test_images[:1].reshape(1, -1))[0]
    by_period = slots.reshape(-1, period)
    assert np.abs(by_period[:, :n] - chain).max() <= plan.predicted_error
    assert np.abs(by_period[:, n:]).max() <= plan.predicted_error


def test_upload_is_compact_and_a_seal_ciphertext_is_refused(single, test_images):
    plan, server, client, _, keys = single
    request = client.encrypt(test_images[:1])
    msg = wire.unpack(request, kind=wire.KIND_CIPHERTEXTS, max_items=1, max_item_bytes=1 << 30)
    primes = plan.params.ciphertext_primes
    n = plan.params.poly_modulus_degree
    assert len(msg.items[0]) == compact.packed_size(primes, n, plan.input_drop_bits)
    # Half the coefficients (folded), each as wide as the primes' product less the dropped bits.
    bits = sum(p.bit_length() for p in primes) - plan.input_drop_bits
    assert len(msg.items[0]) <= n / 2 * bits / 8 + 200
    # The same image in SEAL's seeded form (64-bit words) is not what the server expects.
    bridge = she.io.context.SealBridge(client.ctx)
    try:
        plain = sealapi.Plaintext()
        sealapi.CKKSEncoder(bridge.seal).encode(test_images[0].ravel().tolist(), plan.input_scale,
                                                 plain)
        encryptor = sealapi.Encryptor(bridge.seal, client.ctx.secret_key().data)
        seeded = bridge.save_serializable(encryptor.encrypt_symmetric(plain))
    finally:
        bridge.close()
    with pytest.raises(she.FormatError, match="bytes"):
        server.evaluate(keys, wire.pack(wire.KIND_CIPHERTEXTS, msg.meta, [seeded]))


def test_more_than_one_sample_is_refused(single, test_images):
    _, _, client, _, _ = single
    with pytest.raises(she.ParameterError, match="1 to 1 per request"):
        client.encrypt(test_images[:2])


def test_context_without_galois_keys_is_refused(single):
    _, server, client, context, _ = single
    msg = wire.unpack(context, kind=wire.KIND_CONTEXT, max_items=4, max_item_bytes=1 << 30)
    stripped = wire.pack(wire.KIND_CONTEXT, msg.meta, msg.items[:2])
    with pytest.raises(she.FormatError, match="Galois keys"):
        server.load_context(stripped)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-steps", "no-conjugation"])
def test_bad_galois_keys_are_refused(single, damage):
    plan, server, client, context, _ = single
    msg = wire.unpack(context, kind=wire.KIND_CONTEXT, max_items=4, max_item_bytes=1 << 30)
    keys = msg.items[2]
    if damage == "garbage":
        keys = np.random.default_rng(0).bytes(len(keys))
    elif damage == "truncated":
        keys = keys[: len(keys) // 2]
    elif damage == "other-steps":
        keys = galois_key_bytes(client.ctx, plan.rotation_steps()[:-1], conjugate=True)
    else:  # every rotation, but nothing to unfold the upload with
        keys = galois_key_bytes(client.ctx, plan.rotation_steps())
    with pytest.raises(she.FormatError, match="Galois keys"):
        server.load_context(wire.pack(wire.KIND_CONTEXT, msg.meta, [*msg.items[:2], keys, msg.items[3]]))


def test_spec_asking_for_too_many_keys_is_refused(single):
    plan, *_ = single
    spec = plan.spec()
    spec["galois_steps"] = list(range(1, 200))
    with pytest.raises(she.ParameterError, match="galois_steps"):
        she.Client(spec)


def test_two_processes_compute_the_same_result(single, test_images, monkeypatch):
    """The thread-count setting: with workers=2 a forked process sums half of every layer's
    giant steps; the decrypted result matches the one-process run within the noise."""
    import she.runtime.single

    monkeypatch.setattr(she.runtime.single, "SPLIT_MIN_COST", 1)  # split even these small layers
    plan, _, client, context, _ = single
    # The forked half rotates its sum into place with keys the plan asks for.
    assert all(set(lay.jump(lay.schedule.giants[lay.split]))
               <= set(plan.rotation_steps()) for lay in plan.layouts() if lay.split)
    outputs = []
    for workers in (1, 2):
        server = she.Server(plan, workers=workers)
        assert server.engine.workers == workers
        assert any(server.engine.split) == (workers == 2)
        keys = server.load_context(context)
        outputs.append(client.decrypt(server.evaluate(keys, client.encrypt(test_images[:1]))))
    assert np.max(np.abs(outputs[0] - outputs[1])) <= plan.predicted_error
    assert outputs[0].argmax() == outputs[1].argmax()


def test_a_widening_first_layer_runs(mnist_dir):
    """A first layer with more outputs than inputs keeps one input copy (no shift): the spec
    the client receives must describe that layout, and the result match onnxruntime."""
    from onnx import helper

    rng = np.random.default_rng(3)
    inits = {"w1": rng.normal(0, 0.3, (128, 49)), "b1": rng.normal(0, 0.1, 128),
             "w2": rng.normal(0, 0.1, (10, 128)), "b2": np.zeros(10)}
    nodes = [helper.make_node("Flatten", ["input"], ["f"]),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=1),
             helper.make_node("Mul", ["h", "h"], ["s"]),
             helper.make_node("Gemm", ["s", "w2", "b2"], ["logits"], transB=1)]
    model = she.frontend.model.from_proto(
        onnx_model(nodes, inits, name="widening", in_shape=(1, 7, 7)), "widening")
    x, _ = load_idx_dataset(mnist_dir, "test")
    x = np.ascontiguousarray(x[:200, :, ::4, ::4])  # 7x7 digits: 49 inputs -> 128 units
    plan = she.compile(model, calibration=x, packing="single")
    assert plan.layouts()[0].p_out > plan.layouts()[0].p_in
    server, client = she.Server(plan), she.Client(plan.spec())
    keys = server.load_context(client.public_context())
    out = client.decrypt(server.evaluate(keys, client.encrypt(x[:1])))
    assert np.max(np.abs(out - model.run_plain(x[:1]))) <= plan.predicted_error


def _two_conv_proto():  # -> onnx.ModelProto
    """Conv(1->2, 5x5, stride 2) -> square -> Conv(2->4, 3x3, stride 2) -> square -> Gemm:
    the placed second convolution leaves its diagonals in clusters (kernel columns) every
    input row, rows in blocks per input channel."""
    from onnx import helper

    rng = np.random.default_rng(0)
    arrays = {"w1": rng.normal(0, 0.3, (2, 1, 5, 5)), "b1": rng.normal(0, 0.1, 2),
              "w2": rng.normal(0, 0.15, (4, 2, 3, 3)), "b2": rng.normal(0, 0.1, 4),
              "w3": rng.normal(0, 0.1, (10, 196)), "b3": np.zeros(10)}
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], strides=[2, 2], pads=[2] * 4),
             helper.make_node("Mul", ["c1", "c1"], ["s1"]),
             helper.make_node("Conv", ["s1", "w2", "b2"], ["c2"], strides=[2, 2], pads=[1] * 4),
             helper.make_node("Mul", ["c2", "c2"], ["s2"]),
             helper.make_node("Flatten", ["s2"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1)]
    return onnx_model(nodes, arrays, name="two_conv")


def test_rows_of_babies_run_encrypted(toy_calibration, test_images, tmp_path, monkeypatch):
    """A convolution whose schedule has rows of babies (rotations by one slot and by the
    row stride, giant steps at any offsets) needs fewer rotations than the grid schedule,
    and runs in SEAL within the predicted error of the plan's chain and with
    onnxruntime's argmax, on one process and split over two."""
    import onnx

    import she.runtime.single

    monkeypatch.setattr(she.runtime.single, "SPLIT_MIN_COST", 1)  # split even these small layers
    path = tmp_path / "two_conv.onnx"
    onnx.save(_two_conv_proto(), str(path))
    plan = she.compile(she.load(str(path)), calibration=toy_calibration, packing="single")
    conv = plan.layouts()[1]
    schedule = conv.schedule
    assert schedule.babies != tuple(range(len(schedule.babies)))  # rows, not one run
    grid = min(layout.grid_schedule(conv.used, b).rotations(conv.fold_steps)
               for b in range(1, conv.n_diagonals + 1))
    assert conv.rotations < grid
    assert {step for _, step in schedule.baby_steps} <= set(plan.rotation_steps())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: test_images[:2]})[0]
    client = she.Client(plan.spec())
    context = client.public_context()
    for workers in (1, 2):
        server = she.Server(plan, workers=workers)
        assert server.engine.split[1] == (conv.split if workers == 2 else 0) and conv.split
        keys = server.load_context(context)
        for i, image in enumerate(test_images[:2]):
            out = client.decrypt(server.evaluate(keys, client.encrypt(image[None])))
            assert np.max(np.abs(out - plan.chain.run(image[None].reshape(1, -1)))) <= \
                plan.predicted_error
            assert out.argmax() == reference[i].argmax()
