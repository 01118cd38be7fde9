"""Fuzzing the deserialisers that read network bytes: never anything but a clean error.

Together these throw well over 10 000 random and mutated payloads at the server's input
path (message framing, SEAL ciphertext parsing, context loading).
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from she import sealbytes, wire
from she.context import SealBridge, load_public_context
from she.errors import FormatError, ParameterError, SecurityError
from she.params import EncryptionParameters

PARAMS = EncryptionParameters("ckks", 4096, (30, 25, 30))


@pytest.fixture(scope="module")
def material():
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=list(PARAMS.modulus_bits))
    bridge = SealBridge(ctx)
    plain = sealapi.Plaintext()
    sealapi.CKKSEncoder(bridge.seal).encode([0.5] * 2048, 2.0 ** 20, plain)
    ct = sealapi.Ciphertext(bridge.seal)
    sealapi.Encryptor(bridge.seal, ctx.secret_key().data).encrypt_symmetric(plain, ct)
    blob = bridge.save_serializable(ct)
    raw = sealbytes.parse(blob, bridge.levels[2])
    message = wire.pack(wire.KIND_CIPHERTEXTS, {"fingerprint": "x", "batch": 1}, [blob, blob])
    yield {
        "level": bridge.levels[2],
        "compressed": blob,
        "uncompressed": sealbytes.serialize(raw),
        "message": message,
        "context": ctx.serialize(save_secret_key=False),
    }
    bridge.close()


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


edits = st.lists(st.tuples(st.integers(0, 2 ** 31), st.integers(0, 255)), max_size=6)
cuts = st.one_of(st.none(), st.integers(0, 4000))
FAST = settings(max_examples=4200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(data=st.binary(max_size=512))
def test_random_bytes_as_message(data):
    with pytest.raises(FormatError):
        wire.unpack(data, kind=wire.KIND_CIPHERTEXTS, max_items=4, max_item_bytes=1 << 20)


@FAST
@given(e=edits, cut=cuts)
def test_mutated_messages(material, e, cut):
    try:
        msg = wire.unpack(_mutate(material["message"], e, cut), kind=wire.KIND_CIPHERTEXTS,
                          max_items=4, max_item_bytes=1 << 20)
    except FormatError:
        return
    assert len(msg.items) <= 4


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["compressed", "uncompressed"]), e=edits,
       cut=st.one_of(st.none(), st.integers(0, 70000)))
def test_mutated_ciphertexts(material, which, e, cut):
    level = material["level"]
    try:
        raw = sealbytes.parse(_mutate(material[which], e, cut), level)
    except FormatError:
        return
    # Whatever parses is a well-formed ciphertext of this level.
    assert raw.data.shape == (2, level.limbs, level.poly_modulus_degree)
    assert np.all(raw.data < np.array(level.moduli, dtype=np.uint64)[None, :, None])


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(e=edits, cut=st.one_of(st.none(), st.integers(0, 400000)))
def test_mutated_contexts(material, e, cut):
    try:
        ctx = load_public_context(_mutate(material["context"], e, cut), PARAMS)
    except (FormatError, ParameterError, SecurityError):
        return
    assert not ctx.has_secret_key()
