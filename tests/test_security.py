"""Parameter security (HE standard bounds, checked against SEAL) and what the Server refuses
to accept as evaluation keys."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as sealapi

import she
from she.io import wire
from she.io.context import public_context_bytes, public_key_bytes, relin_key_bytes
from she.plan.params import MAX_MODULUS_BITS, RING_SIZES, EncryptionParameters, check_security

SEAL_LEVELS = {128: sealapi.SEC_LEVEL_TYPE.TC128, 192: sealapi.SEC_LEVEL_TYPE.TC192,
               256: sealapi.SEC_LEVEL_TYPE.TC256}


# -- the bounds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4096, 8192, 16384, 32768])
def test_128_bit_table_equals_seal(n):
    assert MAX_MODULUS_BITS[128][n] == sealapi.CoeffModulus.MaxBitCount(n, sealapi.SEC_LEVEL_TYPE.TC128)


@pytest.mark.parametrize("security", [192, 256])
def test_higher_security_tables_equal_seal(security):
    for n in RING_SIZES:
        assert MAX_MODULUS_BITS[security][n] == sealapi.CoeffModulus.MaxBitCount(
            n, SEAL_LEVELS[security])


def test_modulus_over_the_bound_is_refused():
    check_security(8192, [60, 60, 60, 38])  # 218 bits: exactly the bound
    with pytest.raises(she.ParameterError, match="219-bit .* below 128-bit security") as info:
        check_security(8192, [60, 60, 60, 39])  # 219 bits
    assert "at most 218" in str(info.value)
    with pytest.raises(she.ParameterError, match="at most 109"):
        check_security(4096, [40, 40, 30])
    with pytest.raises(she.ParameterError, match="at most 152"):
        check_security(8192, [60, 60, 40], security=192)
    with pytest.raises(she.ParameterError):
        EncryptionParameters("ckks", 4096, (40, 40, 40))  # refused before SEAL is involved


@pytest.mark.parametrize("security", [80, 64, 0, 127, 129, 512])
def test_low_or_unknown_security_level_is_refused(security):
    with pytest.raises(she.ParameterError, match=f"security level {security} is not allowed"):
        check_security(8192, [30, 30], security=security)


@pytest.mark.parametrize("n", [1000, 3000, 65536, 0])
def test_unknown_ring_size_is_refused(n):
    with pytest.raises(she.ParameterError, match=f"poly_modulus_degree {n} is not one of"):
        check_security(n, [30, 30])


def test_prime_sizes_out_of_range_are_refused():
    with pytest.raises(she.ParameterError, match="outside"):
        check_security(8192, [61, 30])
    with pytest.raises(she.ParameterError, match="outside"):
        check_security(8192, [19, 30])


# -- plans -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_model(toy_model_path):
    return she.load(toy_model_path)


@pytest.fixture(scope="module")
def plan_192(toy_model, toy_calibration):
    return she.compile(toy_model, calibration=toy_calibration, security=192)


@pytest.fixture(scope="module")
def plan_32_bits(toy_model, toy_calibration):
    return she.compile(toy_model, calibration=toy_calibration, scale_bits=32, weight_bits=18)


def test_compile_refuses_a_ring_too_small(toy_model, toy_calibration):
    with pytest.raises(she.ParameterError, match="below 128-bit security"):
        she.compile(toy_model, calibration=toy_calibration, poly_modulus_degree=4096)
    with pytest.raises(she.ParameterError, match="not allowed"):
        she.compile(toy_model, calibration=toy_calibration, security=80)


def test_plans_stay_within_the_bound(toy_plan, plan_192, plan_32_bits, toy_model,
                                     toy_calibration):
    forced = she.compile(toy_model, calibration=toy_calibration, poly_modulus_degree=16384)
    no_calibration = she.compile(toy_model)
    plans = [toy_plan, plan_192, plan_32_bits, forced, no_calibration]
    assert plan_192.params.security == 192 and forced.params.poly_modulus_degree == 16384
    for plan in plans:
        p = plan.params
        bound = sealapi.CoeffModulus.MaxBitCount(p.poly_modulus_degree, SEAL_LEVELS[p.security])
        assert p.total_bits == sum(p.modulus_bits) <= MAX_MODULUS_BITS[p.security][p.poly_modulus_degree]
        assert p.total_bits <= bound
        # The actual primes have the announced sizes (so the bound holds for them too).
        assert [q.bit_length() for q in p.primes] == list(p.modulus_bits)
        assert plan.describe()["total_modulus_bits"] <= plan.describe()["max_modulus_bits_for_ring"]


def test_plans_for_other_settings_have_other_fingerprints(toy_plan, plan_192, plan_32_bits):
    prints = {toy_plan.params.fingerprint(), plan_192.params.fingerprint(),
              plan_32_bits.params.fingerprint()}
    assert len(prints) == 3


def test_spec_with_insecure_parameters_is_refused(toy_plan):
    spec = toy_plan.spec()
    spec["modulus_bits"] = [36] * 8  # 288 bits at N=8192 (bound 218)
    spec["poly_modulus_degree"] = 8192
    with pytest.raises(she.ParameterError, match="below 128-bit security"):
        she.Client(spec)
    spec = toy_plan.spec()
    spec["security_bits"] = 80
    with pytest.raises(she.ParameterError, match="not allowed"):
        she.Client(spec)


# -- what the Server accepts as keys -------------------------------------------------------------

def test_public_context_is_accepted_and_has_no_secret_key(toy_server_client):
    server, client, keys = toy_server_client
    assert keys.fingerprint == client.fingerprint == server.fingerprint
    # Parameters only: no secret key, and no public key either (the client encrypts with
    # its secret key); the relinearisation keys travel separately in seeded form.
    assert not keys.ctx.has_secret_key() and not keys.ctx.has_public_key()
    assert keys.relin.size() == 1  # the key-switching key for s^2
    msg = wire.unpack(client.public_context(), kind=wire.KIND_CONTEXT, max_items=4,
                      max_item_bytes=1 << 30)
    assert len(msg.items[0]) < 1024
    # Seeded: about half of the expanded keys TenSEAL itself would serialise.
    expanded = client.ctx.serialize(save_public_key=False, save_secret_key=False,
                                    save_galois_keys=False, save_relin_keys=True)
    assert len(msg.items[1]) < 0.6 * len(expanded)
    again = server.load_context(client.public_context())
    assert not again.ctx.has_secret_key()


def test_server_refuses_a_context_with_the_secret_key(toy_server_client):
    server, client, _ = toy_server_client
    secret = client.ctx.serialize(save_secret_key=True)
    message = wire.pack(wire.KIND_CONTEXT, {"fingerprint": client.fingerprint}, [secret])
    with pytest.raises(she.SecurityError, match="secret key"):
        server.load_context(message)
    # Also when every other key is left out.
    bare = client.ctx.serialize(save_public_key=False, save_secret_key=True,
                                save_galois_keys=False, save_relin_keys=False)
    message = wire.pack(wire.KIND_CONTEXT, {"fingerprint": client.fingerprint}, [bare])
    with pytest.raises(she.SecurityError, match="secret key"):
        server.load_context(message)


def test_client_key_file_is_not_a_public_context(toy_server_client, tmp_path):
    server, client, _ = toy_server_client
    client.save(tmp_path / "key")
    with pytest.raises(she.SecurityError, match="secret key"):
        server.load_context((tmp_path / "key").read_bytes())


@pytest.mark.parametrize("other", ["plan_192", "plan_32_bits"])
def test_server_refuses_a_context_for_other_parameters(toy_server_client, request, other):
    server, client, _ = toy_server_client
    plan = request.getfixturevalue(other)
    other_client = she.Client(plan.spec())
    assert other_client.fingerprint != client.fingerprint
    # As sent by that client: its fingerprint names other parameters.
    with pytest.raises(she.FormatError, match="other encryption parameters"):
        server.load_context(other_client.public_context())
    # Relabelled with the right fingerprint: the parameters themselves are checked.
    relabelled = wire.pack(wire.KIND_CONTEXT, {"fingerprint": client.fingerprint},
                           [public_context_bytes(other_client.ctx)])
    with pytest.raises(she.ParameterError, match="coefficient modulus differs|N="):
        server.load_context(relabelled)


def test_server_refuses_missing_or_foreign_relinearisation_keys(toy_server_client, plan_192):
    server, client, _ = toy_server_client
    body = public_context_bytes(client.ctx)
    message = wire.pack(wire.KIND_CONTEXT, {"fingerprint": client.fingerprint}, [body])
    with pytest.raises(she.FormatError, match="relinearisation"):
        server.load_context(message)
    # Keys made for other parameters: SEAL's own validation refuses them.
    foreign = relin_key_bytes(she.Client(plan_192.spec()).ctx)
    message = wire.pack(wire.KIND_CONTEXT, {"fingerprint": client.fingerprint},
                        [body, foreign, public_key_bytes(client.ctx)])
    with pytest.raises(she.FormatError, match="relinearisation keys"):
        server.load_context(message)


def test_server_refuses_garbage_contexts(toy_server_client):
    server, client, _ = toy_server_client
    rng = np.random.default_rng(11)
    good = public_context_bytes(client.ctx)
    items = [b"garbage", b"", rng.bytes(4096), good[: len(good) // 2], good[:-1]]
    for item in items:
        message = wire.pack(wire.KIND_CONTEXT, {"fingerprint": client.fingerprint}, [item])
        with pytest.raises(she.FormatError):
            server.load_context(message)
    for data in (b"", b"garbage", rng.bytes(1000), client.public_context()[:-1],
                 wire.pack(wire.KIND_CONTEXT, {"fingerprint": client.fingerprint}, []),
                 wire.pack(wire.KIND_CONTEXT, {"fingerprint": client.fingerprint}, [good, good]),
                 wire.pack(wire.KIND_CIPHERTEXTS, {"fingerprint": client.fingerprint}, [good])):
        with pytest.raises(she.FormatError):
            server.load_context(data)
