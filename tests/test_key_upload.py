"""What a server accepts as a client's context and evaluation keys (issue #21, items 1-3).

Uploads are hostile: a context must hold the plan's parameters and nothing else, and is
read without TenSEAL (which would regenerate Galois keys for a context carrying a secret
key before anyone could refuse it); evaluation keys must be exactly the keys the plan
needs, of exactly their size, refused before anything is decompressed past that size.
Small parameters (N=4096) keep this fast; tests/test_fuzz.py runs the shipped models'.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi

import she
from she.io import context, sealbytes
from she.io.context import (
    SealBridge,
    galois_key_bytes,
    key_level,
    load_galois_keys,
    load_public_context,
    load_relin_keys,
    public_context_bytes,
    relin_key_bytes,
)
from she.plan.params import EncryptionParameters

PARAMS = EncryptionParameters("ckks", 4096, (30, 25, 30))
STEPS = [1, 2]


@pytest.fixture(scope="module")
def client_ctx() -> ts.Context:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=list(PARAMS.modulus_bits))
    assert tuple(context.context_primes(ctx)) == PARAMS.primes
    return ctx


@pytest.fixture(scope="module")
def server_ctx(client_ctx) -> ts.Context:
    return load_public_context(public_context_bytes(client_ctx), PARAMS)


@pytest.fixture()
def no_tenseal_parsing(monkeypatch):
    """Fails the test if an upload reaches TenSEAL's context parser."""
    calls = []
    real = ts.context_from

    def recording(data, *args, **kwargs):
        calls.append(bytes(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(context.ts, "context_from", recording)
    return calls


def _zero_keys_blob(ctx: ts.Context, entries: list[int], compress: bool = True) -> bytes:
    """A GaloisKeys serialisation with all-zero keys in ``entries`` (SEAL's layout)."""
    level = key_level(ctx)
    seed = relin_key_bytes(ctx)  # any seeded key: borrow its valid seed record
    body = sealbytes.unwrap(seed, 1 << 24, "keys")
    key_size = 16 + level.raw_size(2, seeded=True)
    seed_info = body[48 + key_size - sealbytes.SEED_INFO_SIZE:48 + key_size]
    zero = sealbytes.serialize(sealbytes.RawCiphertext(
        np.zeros((1, level.limbs, level.poly_modulus_degree), dtype=np.uint64), 1.0,
        level.parms_id, seed_info=seed_info))
    n = level.poly_modulus_degree
    parts = [struct.pack("<4QQ", *level.parms_id, n)]
    for index in range(n):
        filled = index in entries
        parts.append(struct.pack("<Q", level.limbs - 1 if filled else 0))
        if filled:
            parts.extend([zero] * (level.limbs - 1))
    return sealbytes.wrap(b"".join(parts), compress=compress)


# -- item 1: key blobs of exactly the expected keys and size --------------------------------------

def test_valid_keys_load(client_ctx, server_ctx):
    relin = load_relin_keys(server_ctx, relin_key_bytes(client_ctx))
    galois = load_galois_keys(server_ctx, galois_key_bytes(client_ctx, STEPS, conjugate=True),
                              STEPS, conjugate=True)
    assert relin.size() == 1 and galois.size() == 3


def test_a_small_blob_of_many_zero_galois_keys_is_refused_before_expansion(client_ctx, server_ctx):
    # The review's attack: 256 all-zero keys compress to a few KiB and, loaded, took
    # 96 MiB for the session's life (SEAL caps the count at N only).
    blob = _zero_keys_blob(client_ctx, list(range(1, 512, 2)))
    assert len(blob) < 64 * 1024
    with pytest.raises(she.FormatError, match="larger than the model allows"):
        load_galois_keys(server_ctx, blob, STEPS, conjugate=True)


def test_galois_keys_for_other_elements_are_refused(client_ctx, server_ctx):
    # The right number of keys, of the right size, for rotations the plan does not use.
    other = galois_key_bytes(client_ctx, [4, 8], conjugate=True)
    with pytest.raises(she.FormatError, match="rotation step 1, rotation step 2 are missing"):
        load_galois_keys(server_ctx, other, STEPS, conjugate=True)
    fewer = galois_key_bytes(client_ctx, [1], conjugate=True)
    with pytest.raises(she.FormatError, match="rotation step 2 are missing"):
        load_galois_keys(server_ctx, fewer, STEPS, conjugate=True)
    more = galois_key_bytes(client_ctx, [1, 2, 4], conjugate=True)
    with pytest.raises(she.FormatError, match="larger than the model allows"):
        load_galois_keys(server_ctx, more, STEPS, conjugate=True)


def test_zero_keys_of_the_right_shape_are_checked_by_seal(client_ctx, server_ctx):
    # Exactly the expected layout and size: the structure passes, what remains is SEAL's
    # own validation (zero keys are well-formed to SEAL: they only give wrong results).
    level = key_level(server_ctx)
    wanted = [e >> 1 for e in context.galois_elements(STEPS, 4096, conjugate=True)]
    blob = _zero_keys_blob(client_ctx, wanted, compress=False)
    assert len(blob) == 16 + sealbytes.switching_keys_size(level, 4096, len(wanted))
    keys = load_galois_keys(server_ctx, blob, STEPS, conjugate=True)
    assert keys.size() == 3


@pytest.mark.parametrize("damage", ["count", "parts", "parms_id", "trailing", "truncated"])
def test_malformed_key_layout_is_refused(client_ctx, server_ctx, damage):
    body = bytearray(sealbytes.unwrap(relin_key_bytes(client_ctx), 1 << 24, "keys"))
    if damage == "count":
        body[32:40] = struct.pack("<Q", 2)
    elif damage == "parts":
        body[40:48] = struct.pack("<Q", 1)
    elif damage == "parms_id":
        body[0] ^= 1
    elif damage == "trailing":
        body += b"\0" * 8
    else:
        del body[-100:]
    with pytest.raises(she.FormatError, match="relinearisation keys"):
        load_relin_keys(server_ctx, sealbytes.wrap(bytes(body)))


def test_relin_keys_must_be_exactly_one_key(client_ctx, server_ctx):
    bridge = SealBridge(client_ctx)
    try:
        empty = bridge.save_serializable(sealapi.RelinKeys())  # the review's 65-byte blob
    finally:
        bridge.close()
    with pytest.raises(she.FormatError, match="relinearisation keys"):
        load_relin_keys(server_ctx, empty)
    # Galois keys are not relinearisation keys, nor the reverse.
    with pytest.raises(she.FormatError, match="relinearisation keys"):
        load_relin_keys(server_ctx, galois_key_bytes(client_ctx, [1]))
    with pytest.raises(she.FormatError, match="Galois keys"):
        load_galois_keys(server_ctx, relin_key_bytes(client_ctx), [1])
    for junk in (b"", b"\x5e\xa1", b"not keys"):
        with pytest.raises(she.FormatError):
            load_relin_keys(server_ctx, junk)


def test_empty_relin_keys_are_refused_at_registration(toy_server_client):
    server, client, _ = toy_server_client
    from she.io import wire

    msg = wire.unpack(client.public_context(), kind=wire.KIND_CONTEXT, max_items=3,
                      max_item_bytes=1 << 30)
    bridge = SealBridge(client.ctx)
    try:
        empty = bridge.save_serializable(sealapi.RelinKeys())
    finally:
        bridge.close()
    message = wire.pack(wire.KIND_CONTEXT, msg.meta, [msg.items[0], empty])
    with pytest.raises(she.FormatError, match="relinearisation keys"):
        server.load_context(message)


# -- item 1 and 2: the context holds parameters only, read without TenSEAL -----------------------

def test_public_context_is_rebuilt_from_the_plan(client_ctx, no_tenseal_parsing):
    upload = public_context_bytes(client_ctx)
    ctx = load_public_context(upload, PARAMS)
    assert not ctx.has_secret_key() and not ctx.has_public_key()
    assert context.context_primes(ctx) == PARAMS.primes
    assert upload not in no_tenseal_parsing  # built from the plan, not from the upload


@pytest.mark.parametrize("what", ["public", "relin", "galois"])
def test_context_with_embedded_keys_is_refused(client_ctx, what, no_tenseal_parsing):
    ctx = client_ctx.copy()
    if what == "galois":
        ctx.generate_galois_keys()
    upload = ctx.serialize(save_public_key=what == "public", save_secret_key=False,
                           save_galois_keys=what == "galois", save_relin_keys=what == "relin")
    names = {"public": "public", "relin": "relinearisation", "galois": "Galois"}
    with pytest.raises(she.FormatError, match=f"carries {names[what]} keys"):
        load_public_context(upload, PARAMS)
    assert not no_tenseal_parsing


def test_secret_key_with_galois_flag_is_refused_before_any_work(client_ctx, no_tenseal_parsing):
    # Loading this in TenSEAL regenerates every Galois key (seconds at N=16384) before the
    # secret key can be seen; it must be refused from its bytes.
    ctx = client_ctx.copy()
    ctx.generate_galois_keys()
    upload = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False,
                           save_relin_keys=False)
    with pytest.raises(she.SecurityError, match="secret key"):
        load_public_context(upload, PARAMS)
    assert not no_tenseal_parsing


@pytest.mark.parametrize("other", [
    EncryptionParameters("ckks", 8192, (40, 30, 40)),
    EncryptionParameters("ckks", 4096, (30, 24, 30)),
    EncryptionParameters("bfv", 4096, (30, 25, 30), plain_modulus=786433),
])
def test_foreign_parameters_are_refused_before_any_work(other, no_tenseal_parsing):
    upload = public_context_bytes(context.new_secret_context(other))
    with pytest.raises(she.ParameterError, match="N=8192|coefficient modulus|BFV context"):
        load_public_context(upload, PARAMS)
    assert not no_tenseal_parsing


def test_context_protobuf_is_read_strictly(client_ctx):
    good = public_context_bytes(client_ctx)
    params_field = good[:2 + good[1]]  # field 1 (the parameters) comes first, length < 128
    for bad, reason in [
        (good + good, "unexpected field 1"),               # a repeated field
        (good + b"\x28\x01", "unexpected field 5"),        # a field TenSEAL never writes
        (good + b"\x22\x00", "unexpected field 4"),        # encryption type as bytes
        (good + b"\x20\x07", "unknown encryption type"),
        (good + b"\x1a\x00", "secret key"),                # an empty private part
        (good[:-1], "truncated"),
        (b"\x0a\xff\xff\xff\xff\x0f", "truncated"),
        (b"\x20" + b"\xff" * 12, "malformed integer"),
        (b"\x12\x00", "no encryption parameters"),
        (params_field[:2] + b"\0" * (len(params_field) - 2), "not a SEAL encryption parameters"),
    ]:
        with pytest.raises((she.FormatError, she.SecurityError), match=reason):
            load_public_context(bad, PARAMS)


def test_parameters_blob_is_decompressed_within_a_bound(client_ctx):
    # A compressed parameters blob that would expand to megabytes is cut at a few KiB.
    blob = sealbytes.wrap(b"\0" * (1 << 22), compress=True)
    upload = b"\x0a" + context._varint_bytes(len(blob)) + blob
    with pytest.raises(she.FormatError, match="larger than the model allows"):
        load_public_context(upload, PARAMS)
