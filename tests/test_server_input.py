"""What the Server and the Client accept: every malformed request or result is a FormatError
(bad inputs on the client side a ParameterError), never another exception."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tenseal.sealapi as sealapi
from conftest import onnx_model
from onnx import helper

import she
from she.frontend.model import from_proto
from she.io import sealbytes, wire
from she.io.context import level_specs


def _message(base: wire.Message, items: list[bytes] | None = None, drop: tuple[str, ...] = (),
             **meta) -> bytes:
    """``base`` re-packed with other items and/or metadata."""
    fields = {k: v for k, v in {**base.meta, **meta}.items() if k not in drop}
    return wire.pack(wire.KIND_CIPHERTEXTS, fields, base.items if items is None else items)


def _replace(items: list[bytes], index: int, item: bytes) -> list[bytes]:
    out = list(items)
    out[index] = item
    return out


@pytest.fixture(scope="module")
def toy_result(toy_server_client, toy_request) -> bytes:
    server, _, keys = toy_server_client
    return server.evaluate(keys, toy_request)


def test_batch_slots_beyond_the_batch_hold_the_model_on_what_was_encrypted(
        toy_server_client, toy_result, toy_plan, toy_model_path):
    """Issue #21 item 5, answered in docs/http-api.md (security model): batch packing
    answers every slot; past the declared batch the client's zero padding gives the model's
    output at the zero input, which any client could ask for. Nothing else is there."""
    from she.io import sealbytes

    _, client, _ = toy_server_client
    msg = wire.unpack(toy_result, kind=wire.KIND_CIPHERTEXTS, max_items=10,
                      max_item_bytes=1 << 26)
    assert msg.meta["batch"] == 2
    level = client._levels[int(client.spec["output_limbs"])]
    at_zero = she.load(toy_model_path).run_plain(np.zeros((1, 1, 28, 28), np.float32))[0]
    for j, blob in enumerate(msg.items):
        plain = sealapi.Plaintext()
        client._decryptor.decrypt(client._bridge.to_seal(sealbytes.parse(blob, level)), plain)
        slots = np.asarray(client._encoder.decode_double(plain))
        assert np.abs(slots[2:] - at_zero[j]).max() < toy_plan.predicted_error


@pytest.fixture(scope="module")
def tiny_client() -> she.Client:
    """The client of another model (4 inputs): other parameters, other keys."""
    rng = np.random.default_rng(2)
    inits = {"w1": rng.normal(0, 0.5, (3, 4)), "w2": rng.normal(0, 0.5, (2, 3))}
    nodes = [helper.make_node("Gemm", ["input", "w1"], ["h"], transB=1),
             helper.make_node("Mul", ["h", "h"], ["h2"]),
             helper.make_node("Gemm", ["h2", "w2"], ["out"], transB=1)]
    proto = onnx_model(nodes, inits, name="tiny", in_shape=(4,), out_shape=(2,), out="out")
    plan = she.compile(from_proto(proto, "tiny"))
    return she.Client(plan.spec())


# -- the valid path (so that the refusals below are refusals of the defect alone) --------------

def test_valid_request_is_evaluated(toy_server_client, toy_result, toy_plan, toy_inputs,
                                    toy_model_path):
    _, client, _ = toy_server_client
    logits = client.decrypt(toy_result)
    plain = she.load(toy_model_path).run_plain(toy_inputs)
    assert logits.shape == (2, 10)
    assert np.abs(logits - plain).max() < toy_plan.predicted_error
    assert np.array_equal(logits.argmax(1), plain.argmax(1))


# -- Server.evaluate -----------------------------------------------------------------------------

def test_wrong_fingerprint(toy_server_client, toy_message):
    server, _, keys = toy_server_client
    for data in (_message(toy_message, fingerprint="0" * 16),
                 _message(toy_message, fingerprint=None),
                 _message(toy_message, drop=("fingerprint",))):
        with pytest.raises(she.FormatError, match="other encryption parameters"):
            server.evaluate(keys, data)


def test_wrong_number_of_ciphertexts(toy_server_client, toy_message):
    server, _, keys = toy_server_client
    n = len(toy_message.items)
    for items in (toy_message.items[:-1], toy_message.items[:1], []):
        with pytest.raises(she.FormatError, match=f"expected {n} input ciphertexts, got {len(items)}"):
            server.evaluate(keys, _message(toy_message, items))
    with pytest.raises(she.FormatError, match=f"at most {n}"):
        server.evaluate(keys, _message(toy_message, [*toy_message.items, toy_message.items[0]]))


@pytest.mark.parametrize("batch", [0, -1, "capacity+1", "2", 2.0, None, "missing"])
def test_invalid_batch_size(toy_server_client, toy_message, toy_plan, batch):
    server, _, keys = toy_server_client
    if batch == "missing":
        data = _message(toy_message, drop=("batch",))
    else:
        value = toy_plan.batch_capacity + 1 if batch == "capacity+1" else batch
        data = _message(toy_message, batch=value)
    with pytest.raises(she.FormatError, match="invalid batch size"):
        server.evaluate(keys, data)


def test_boolean_batch_size_is_not_an_integer(toy_server_client, toy_message):
    """JSON ``true`` is not a batch size (Python's bool is an int subclass).

    One ciphertext is left out so that, if ``true`` slips through, the request is still
    refused (by the count check) instead of being evaluated: the message shows which check
    caught it.
    """
    server, _, keys = toy_server_client
    with pytest.raises(she.FormatError, match="invalid batch size"):
        server.evaluate(keys, _message(toy_message, toy_message.items[:-1], batch=True))


def test_random_bytes_as_a_ciphertext(toy_server_client, toy_message):
    server, _, keys = toy_server_client
    rng = np.random.default_rng(7)
    last = len(toy_message.items) - 1
    for index, item in ((0, rng.bytes(len(toy_message.items[0]))), (0, b""), (0, b"\0" * 64),
                        (last, rng.bytes(1000))):
        with pytest.raises(she.FormatError):
            server.evaluate(keys, _message(toy_message, _replace(toy_message.items, index, item)))


def test_ciphertext_under_other_parameters(toy_server_client, toy_message, foreign_ciphertext,
                                           tiny_client):
    server, _, keys = toy_server_client
    # Same shape, other primes and keys.
    with pytest.raises(she.FormatError, match="parms_id"):
        server.evaluate(keys, _message(toy_message, _replace(toy_message.items, 0, foreign_ciphertext)))
    # A ciphertext of another plan's client, in an otherwise valid request.
    tiny = wire.unpack(tiny_client.encrypt(np.ones((3, 4))), kind=wire.KIND_CIPHERTEXTS,
                       max_items=4, max_item_bytes=1 << 26)
    with pytest.raises(she.FormatError):
        server.evaluate(keys, _message(toy_message, _replace(toy_message.items, 5, tiny.items[0])))
    # That client's whole request.
    with pytest.raises(she.FormatError):
        server.evaluate(keys, tiny_client.encrypt(np.ones((3, 4))))


def test_ciphertext_at_another_level(toy_server_client, toy_message, toy_result):
    server, _, keys = toy_server_client
    result = wire.unpack(toy_result, kind=wire.KIND_CIPHERTEXTS, max_items=10,
                         max_item_bytes=1 << 26)
    with pytest.raises(she.FormatError):
        server.evaluate(keys, _message(toy_message, _replace(toy_message.items, 0, result.items[0])))


@pytest.mark.parametrize("factor", [2.0, 0.5, 1 + 2 ** -40])
def test_input_ciphertext_with_the_wrong_scale(toy_server_client, toy_message, toy_plan, factor):
    server, client, keys = toy_server_client
    level = level_specs(client.ctx)[len(toy_plan.params.ciphertext_primes)]
    raw = sealbytes.parse(toy_message.items[3], level)
    raw.scale *= factor
    items = _replace(toy_message.items, 3, sealbytes.serialize(raw, compress=True))
    with pytest.raises(she.FormatError, match="input ciphertext 3 has scale"):
        server.evaluate(keys, _message(toy_message, items))


def test_input_ciphertext_with_an_out_of_range_coefficient(toy_server_client, toy_message, toy_plan):
    server, client, keys = toy_server_client
    level = level_specs(client.ctx)[len(toy_plan.params.ciphertext_primes)]
    raw = sealbytes.parse(toy_message.items[0], level)
    raw.data[1, -1, -1] = level.moduli[-1]
    items = _replace(toy_message.items, 0, sealbytes.serialize(raw))
    with pytest.raises(she.FormatError, match="out of range"):
        server.evaluate(keys, _message(toy_message, items))


def test_truncated_or_wrong_kind_message(toy_server_client, toy_request):
    server, client, keys = toy_server_client
    for data in (toy_request[:-100], toy_request[:-1], toy_request[: len(toy_request) // 2],
                 toy_request[:20], b"", toy_request + b"\0", client.public_context()):
        with pytest.raises(she.FormatError):
            server.evaluate(keys, data)


# -- Client.encrypt -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 1, 27, 28), (2, 28, 28), (784,), (2, 784), (1, 1, 28, 28, 1),
                                   ()])
def test_encrypt_wrong_shape(toy_server_client, shape):
    _, client, _ = toy_server_client
    with pytest.raises(she.ParameterError, match="shape"):
        client.encrypt(np.zeros(shape))


def test_encrypt_batch_size(toy_server_client, toy_plan):
    _, client, _ = toy_server_client
    with pytest.raises(she.ParameterError, match=f"1 to {toy_plan.batch_capacity}"):
        client.encrypt(np.zeros((toy_plan.batch_capacity + 1, 1, 28, 28)))
    with pytest.raises(she.ParameterError, match="batch of 0"):
        client.encrypt(np.zeros((0, 1, 28, 28)))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_encrypt_non_finite(toy_server_client, value):
    _, client, _ = toy_server_client
    x = np.zeros((2, 1, 28, 28))
    x[1, 0, 5, 7] = value
    with pytest.raises(she.ParameterError, match="NaN or infinity"):
        client.encrypt(x)


# -- Client.decrypt -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def result_message(toy_result) -> wire.Message:
    return wire.unpack(toy_result, kind=wire.KIND_CIPHERTEXTS, max_items=10, max_item_bytes=1 << 26)


def test_decrypt_wrong_fingerprint(toy_server_client, result_message):
    _, client, _ = toy_server_client
    for data in (_message(result_message, fingerprint="f" * 16),
                 _message(result_message, drop=("fingerprint",))):
        with pytest.raises(she.FormatError, match="other encryption parameters"):
            client.decrypt(data)


def test_decrypt_result_of_another_client(toy_server_client, tiny_client, result_message):
    _, client, _ = toy_server_client
    with pytest.raises(she.FormatError):
        tiny_client.decrypt(_message(result_message))
    with pytest.raises(she.FormatError):
        tiny_client.decrypt(_message(result_message, fingerprint=tiny_client.fingerprint))


def test_decrypt_garbage_items(toy_server_client, result_message, toy_message):
    _, client, _ = toy_server_client
    rng = np.random.default_rng(3)
    items = result_message.items
    for bad in (rng.bytes(len(items[0])), b"", b"garbage", items[0][:-10], toy_message.items[0]):
        with pytest.raises(she.FormatError):
            client.decrypt(_message(result_message, _replace(items, 4, bad)))


def test_decrypt_wrong_count_batch_or_framing(toy_server_client, result_message, toy_result):
    _, client, _ = toy_server_client
    items = result_message.items
    cases = [
        _message(result_message, items[:-1]),
        _message(result_message, [*items, items[0]]),
        _message(result_message, batch=0),
        _message(result_message, batch=10 ** 6),
        _message(result_message, batch="1"),
        toy_result[:-1],
        toy_result + b"x",
        client.public_context(),
    ]
    for data in cases:
        with pytest.raises(she.FormatError):
            client.decrypt(data)


@pytest.mark.parametrize("field, value", [("scale", 2.0 ** 200), ("correction_factor", 0)],
                         ids=["huge-scale", "zero-correction-factor"])
def test_decrypt_item_with_invalid_metadata(toy_server_client, toy_plan, result_message,
                                            field, value):
    """A result item that parses but that SEAL refuses to load is still a FormatError."""
    _, client, _ = toy_server_client
    level = level_specs(client.ctx)[toy_plan.spec()["output_limbs"]]
    raw = dataclasses.replace(sealbytes.parse(result_message.items[0], level), **{field: value})
    items = _replace(result_message.items, 0, sealbytes.serialize(raw, compress=True))
    with pytest.raises(she.FormatError):
        client.decrypt(_message(result_message, items))


def test_a_plan_too_large_for_memory_is_refused_up_front(toy_plan, monkeypatch):
    """Rather than be killed mid-request, the server refuses a batch plan whose ciphertexts
    would not fit this machine's memory (here pretended to be 64 MiB)."""
    import she.plan.estimate

    assert toy_plan.describe()["estimated_bytes"]["server_memory_per_request"] > 64 * 2**20 * 0.6
    monkeypatch.setattr(she.plan.estimate, "physical_memory", lambda: 64 * 2**20)
    with pytest.raises(she.ParameterError, match="GiB"):
        she.Server(toy_plan)
