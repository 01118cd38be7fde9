"""Parameter security, secret-key refusal, and malformed bytes at the Server."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as sealapi

import she
from she import assets, sealbytes, wire
from she.params import MAX_MODULUS_BITS, EncryptionParameters, check_security


def test_security_table_matches_seal():
    for n, bits in MAX_MODULUS_BITS[128].items():
        if n >= 4096:
            assert bits == sealapi.CoeffModulus.MaxBitCount(n, sealapi.SEC_LEVEL_TYPE.TC128)


def test_insecure_parameters_are_refused():
    with pytest.raises(she.ParameterError, match="below 128-bit"):
        check_security(8192, [60, 60, 60, 39])  # 219 bits > 218
    with pytest.raises(she.ParameterError, match="not allowed"):
        check_security(8192, [30, 30], security=80)
    with pytest.raises(she.ParameterError, match="not one of"):
        check_security(1000, [30])
    with pytest.raises(she.ParameterError):
        EncryptionParameters("ckks", 4096, (40, 40, 40))  # 120 > 109


@pytest.fixture(scope="module")
def demo():
    model = she.load(assets.demo_model_path())
    x, _ = assets.demo_samples()
    plan = she.compile(model, calibration=x)
    server = she.Server(plan, workers=1)
    client = she.Client(plan.spec())
    return plan, server, client, x


def test_compile_refuses_a_ring_too_small(demo):
    plan, *_ = demo
    with pytest.raises(she.ParameterError, match="128-bit"):
        she.compile(plan.chain, poly_modulus_degree=4096)
    with pytest.raises(she.ParameterError, match="security"):
        she.compile(plan.chain, security=64)
    assert plan.params.total_bits <= MAX_MODULUS_BITS[128][plan.params.poly_modulus_degree]


def test_server_refuses_secret_key_context(demo):
    _, server, client, _ = demo
    secret = client.ctx.serialize(save_secret_key=True)
    message = wire.pack(wire.KIND_CONTEXT, {"fingerprint": client.fingerprint}, [secret])
    with pytest.raises(she.SecurityError, match="secret key"):
        server.load_context(message)
    with pytest.raises(she.FormatError):
        server.load_context(wire.pack(wire.KIND_CONTEXT, {"fingerprint": client.fingerprint},
                                      [b"garbage"]))


def test_server_refuses_mismatched_ciphertexts(demo):
    plan, server, client, x = demo
    keys = server.load_context(client.public_context())
    good = wire.unpack(client.encrypt(x[:2]), kind=wire.KIND_CIPHERTEXTS, max_items=10 ** 4,
                       max_item_bytes=1 << 26)

    def message(items, **meta):
        return wire.pack(wire.KIND_CIPHERTEXTS, {**good.meta, **meta}, items)

    level = she.context.level_specs(client.ctx)[len(plan.params.ciphertext_primes)]
    raw = sealbytes.parse(good.items[0], level)
    raw.scale *= 2
    wrong_scale = sealbytes.serialize(raw)
    raw.scale /= 2
    raw.data[0, 0, 0] = level.moduli[0]  # coefficient out of range
    out_of_range = sealbytes.serialize(raw)
    cases = {
        "fingerprint": message(good.items, fingerprint="0" * 16),
        "count": message(good.items[:-1]),
        "batch": message(good.items, batch=0),
        "scale": message([wrong_scale, *good.items[1:]]),
        "range": message([out_of_range, *good.items[1:]]),
        "garbage": message([b"\x00" * 64, *good.items[1:]]),
        "truncated": message(good.items)[:-100],
    }
    for name, data in cases.items():
        with pytest.raises(she.FormatError):
            server.evaluate(keys, data)
            pytest.fail(f"case {name!r} was accepted")


def test_client_input_checks(demo):
    _, _, client, x = demo
    with pytest.raises(she.ParameterError, match="shape"):
        client.encrypt(np.zeros((2, 1, 27, 28)))
    with pytest.raises(she.ParameterError, match="NaN"):
        client.encrypt(np.full((1, 1, 28, 28), np.nan))
    with pytest.raises(she.ParameterError, match="batch"):
        client.encrypt(np.zeros((client.spec["batch_capacity"] + 1, 1, 28, 28)))


def test_corrupt_and_missing_model_files(tmp_path):
    with pytest.raises(she.ModelError, match="not found"):
        she.load(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(she.ModelError):
        she.load(bad)
