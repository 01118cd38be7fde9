"""The compact single-packing upload (:mod:`she.io.compact`): exact bit-packing, the rounding
of dropped bits, SEAL's NTT round trip, and refusal of anything malformed."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import tenseal.sealapi as sealapi

import she
from she.io import compact, sealbytes
from she.io.context import SealBridge, level_specs


def _centred(values: np.ndarray, q: int) -> np.ndarray:
    return np.array([((int(v) + q // 2) % q) - q // 2 for v in values], dtype=object)


@pytest.fixture(scope="module")
def single(toy_model_path, toy_calibration):
    plan = she.compile(she.load(toy_model_path), calibration=toy_calibration, packing="single")
    client = she.Client(plan.spec())
    level = level_specs(client.ctx)[len(plan.params.ciphertext_primes)]
    bridge = SealBridge(client.ctx)
    yield plan, client, level, bridge
    bridge.close()


@pytest.fixture(scope="module")
def residues(single):
    """Random ``c0`` residues at the plan's top level."""
    _, _, level, _ = single
    rng = np.random.default_rng(5)
    return np.stack([rng.integers(0, m, level.poly_modulus_degree, dtype=np.uint64)
                     for m in level.moduli])


def _trace(c0: np.ndarray, moduli) -> np.ndarray:
    """``c0 + tau(c0)`` (``tau: X -> X^-1``) of ``(L, N)`` residues, as integers modulo Q."""
    values = compact._compose(c0, moduli)
    mirrored = np.concatenate([values[:1], -values[:0:-1]])  # tau(c0)_j = -c0_(N-j)
    return (values + mirrored) % math.prod(int(m) for m in moduli)


@pytest.mark.parametrize("drop", [0, 1, 9])
def test_round_trip_keeps_the_trace_up_to_half_the_dropped_step(single, residues, drop):
    """The server's unfolded polynomial has the client's ``c0 + tau(c0)``, each coefficient
    moved by at most the rounding of the dropped bits; half the coefficients are sent."""
    _, _, level, _ = single
    seed = _seed_info(single)
    n = level.poly_modulus_degree
    blob = compact.pack(residues, level.moduli, drop, 2.0 ** 20, seed)
    assert len(blob) == compact.packed_size(level.moduli, n, drop)
    width = math.prod(level.moduli).bit_length() - drop
    assert compact.coefficient_width(level.moduli, drop) in (width, width + 1)
    assert len(blob) < n // 2 * (width + 1) // 8 + 100
    back, scale, seed_back = compact.unpack(blob, level.moduli, n, drop)
    assert scale == 2.0 ** 20 and seed_back == seed
    assert back.dtype == np.uint64 and back.shape == residues.shape
    assert np.all(back < np.asarray(level.moduli, dtype=np.uint64)[:, None])
    assert not back[:, n // 2:].any()
    q = math.prod(level.moduli)
    diff = np.abs(_centred(_trace(back, level.moduli) - _trace(residues, level.moduli), q))
    step = 0 if drop == 0 else 1 << (drop - 1)
    assert diff[0] <= 2 * step and diff[n // 2] == 0
    assert max(diff[1:]) <= step and (max(diff[1:]) > 0) == (drop > 0)


def _values(single) -> np.ndarray:
    _, _, level, _ = single
    return np.random.default_rng(3).uniform(0, 1, level.poly_modulus_degree // 2)


def _seeded(single):
    """A fresh seeded encryption of :func:`_values`, at half the input scale (the client's)."""
    plan, client, _, bridge = single
    plain = sealapi.Plaintext()
    sealapi.CKKSEncoder(bridge.seal).encode(_values(single).tolist(),
                                            plan.input_scale / compact.FOLD_GAIN, plain)
    return sealapi.Encryptor(bridge.seal, client.ctx.secret_key().data).encrypt_symmetric(plain)


def _seed_info(single) -> bytes:
    _, _, level, bridge = single
    return sealbytes.parse(bridge.save_serializable(_seeded(single)), level, seeded=True).seed_info


def test_unfolded_ciphertext_decrypts_within_the_predicted_noise(single):
    """Rebuilt from the compact form (folded, dropped bits), expanded by SEAL and added to its
    conjugate, the ciphertext decrypts to the encrypted values at the plan's input scale,
    with the noise the compiler's error model assumes for it."""
    plan, client, level, bridge = single
    raw = sealbytes.parse(bridge.save_serializable(_seeded(single)), level, seeded=True)
    coefficients = bridge.transform(raw.data[0], to_ntt=False)
    assert not np.array_equal(coefficients, raw.data[0])
    np.testing.assert_array_equal(bridge.transform(coefficients, to_ntt=True), raw.data[0])
    drop = plan.input_drop_bits
    blob = compact.pack(coefficients, level.moduli, drop, compact.FOLD_GAIN * raw.scale,
                        raw.seed_info)
    v, scale, seed = compact.unpack(blob, level.moduli, level.poly_modulus_degree, drop)
    assert scale == plan.input_scale
    keys = she.Server(plan).load_context(client.public_context())
    ct = compact.unfold(bridge, level, v, scale, seed, keys.galois)
    assert ct.size() == 2
    plain = sealapi.Plaintext()
    sealapi.Decryptor(bridge.seal, client.ctx.secret_key().data).decrypt(ct, plain)
    error = np.asarray(sealapi.CKKSEncoder(bridge.seal).decode_double(plain)) - _values(single)
    n = level.poly_modulus_degree
    sigma = she.plan.compiler.NOISE_SIGMA
    variance = 2 * sigma ** 2 + (1 + 2 * n / 3) / 12 + (4.0 ** drop / 12 if drop else 0.0)
    predicted = math.sqrt(variance * n) / plan.input_scale  # per slot
    assert 0.5 * predicted < error.std() < 1.5 * predicted
    assert np.abs(error).max() < 6 * predicted


def test_dropped_bits_stay_within_the_compilers_error_budget(single, toy_model_path,
                                                            toy_calibration, monkeypatch):
    plan, *_ = single
    assert plan.spec()["input_drop_bits"] == plan.input_drop_bits > 0
    share = she.plan.compiler.DROP_ERROR_SHARE
    monkeypatch.setattr(she.plan.compiler, "DROP_ERROR_SHARE", 0.0)
    exact = she.compile(she.load(toy_model_path), calibration=toy_calibration, packing="single")
    assert exact.input_drop_bits == 0
    assert exact.params == plan.params
    assert exact.predicted_error < plan.predicted_error
    assert plan.predicted_error <= exact.predicted_error * (1 + share)


@pytest.mark.parametrize("damage", ["length", "magic", "version", "drop", "scale", "range",
                                    "seed"])
def test_malformed_compact_ciphertext_is_refused(single, residues, damage):
    _, _, level, bridge = single
    seed = _seed_info(single)
    n, moduli = level.poly_modulus_degree, level.moduli
    blob = bytearray(compact.pack(residues, moduli, 3, 2.0 ** 20, seed))
    width = compact.coefficient_width(moduli, 3)
    header = struct.calcsize("<4sBBHd")
    expect = {"length": "bytes, expected", "magic": "magic", "version": "version",
              "drop": "drops", "scale": "scale", "range": "out of range",
              "seed": "seed"}[damage]
    if damage == "length":
        blob = blob[:-1]
    elif damage == "magic":
        blob[0] ^= 0xFF
    elif damage == "version":
        blob[4] = 9
    elif damage == "drop":
        blob[5] = 4
    elif damage == "scale":
        struct.pack_into("<d", blob, 8, float("nan"))
    elif damage == "range":  # the first coefficient: all ones
        start = header + sealbytes.SEED_INFO_SIZE
        bits = np.unpackbits(np.frombuffer(bytes(blob[start:]), dtype=np.uint8), bitorder="little")
        bits[:width] = 1
        blob[start:] = np.packbits(bits, bitorder="little").tobytes()
    else:
        blob[header + sealbytes.SEED_INFO_SIZE - 65] = 7  # the generator type byte
    with pytest.raises(she.FormatError, match=expect):
        compact.unpack(bytes(blob), moduli, n, 3)


@pytest.mark.parametrize("bits", [-1, 31, True, "4"])
def test_client_refuses_a_spec_with_bad_drop_bits(single, bits):
    plan, *_ = single
    spec = plan.spec()
    spec["input_drop_bits"] = bits
    with pytest.raises(she.ParameterError, match="input_drop_bits"):
        she.Client(spec)
