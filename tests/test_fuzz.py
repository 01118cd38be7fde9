"""Fuzzing the deserialisers that read network bytes: never anything but a clean error.

Together these throw well over 10 000 random and mutated payloads at the server's input
path (message framing, SEAL ciphertext parsing, context loading), and, at N=8192 (the
shipped models' ring), at ``Server.evaluate``, ``Server.load_context``, Galois-key
loading, ``compact.unpack`` and the HTTP endpoints.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from she.errors import FormatError, ParameterError, SecurityError
from she.io import compact, sealbytes, wire
from she.io.context import SealBridge, load_galois_keys, load_public_context, public_context_bytes
from she.plan.params import EncryptionParameters

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
        "context": public_context_bytes(ctx),
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


# -- the server's whole input path, at the ring size of the shipped models (N=8192) ---------------
# A 7x7 MNIST model (tests/test_service.py) compiled at N=8192 in both packings keeps each
# evaluation cheap; mutations aim at headers and lengths, so most are refused and the few
# that stay valid are evaluated in full.

FEW = settings(max_examples=40, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])
head_edits = st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def shipped_size(small_model):
    """Servers, clients, a context message and a request at N=8192, both packings."""
    import she

    path, x, _ = small_model
    model = she.load(path)
    out = {}
    for packing in ("batch", "single"):
        plan = she.compile(model, calibration=x, packing=packing, poly_modulus_degree=8192)
        assert plan.params.poly_modulus_degree == 8192
        server, client = she.Server(plan, workers=1), she.Client(plan.spec())
        context = client.public_context()
        out[packing] = (server, client, context, server.load_context(context),
                        client.encrypt(x[:1]))
    return out


def _refused(call) -> bool:
    try:
        call()
    except (FormatError, ParameterError, SecurityError):
        return True
    return False


@FEW
@given(packing=st.sampled_from(["batch", "single"]), e=head_edits,
       cut=st.one_of(st.none(), st.integers(0, 5000)))
def test_mutated_requests_to_server_evaluate(shipped_size, packing, e, cut):
    server, client, _, keys, request = shipped_size[packing]
    data = _mutate(request, e, cut)
    try:
        result = server.evaluate(keys, data)
    except (FormatError, ParameterError):
        return
    # Whatever is evaluated decrypts to the model's output shape.
    assert client.decrypt(result).shape[1] == server.plan.n_outputs


@FEW
@given(item=st.integers(0, 3), e=head_edits, cut=st.one_of(st.none(), st.integers(0, 2000)))
def test_mutated_context_messages_to_server(shipped_size, item, e, cut):
    server, _, context, _, _ = shipped_size["single"]
    msg = wire.unpack(context, kind=wire.KIND_CONTEXT, max_items=4, max_item_bytes=1 << 30)
    items = list(msg.items)
    items[item] = _mutate(items[item], e, cut)
    try:
        keys = server.load_context(wire.pack(wire.KIND_CONTEXT, msg.meta, items))
    except (FormatError, ParameterError, SecurityError):
        return
    assert keys.galois is not None and keys.relin.size() == 1


@FEW
@given(e=edits, cut=st.one_of(st.none(), st.integers(0, 60000)))
def test_mutated_galois_keys(shipped_size, e, cut):
    server, _, context, keys, _ = shipped_size["single"]
    blob = wire.unpack(context, kind=wire.KIND_CONTEXT, max_items=4,
                       max_item_bytes=1 << 30).items[2]
    steps = server.plan.rotation_steps()
    try:
        loaded = load_galois_keys(keys.ctx, _mutate(blob, e, cut), steps, conjugate=True)
    except FormatError:
        return
    assert loaded.size() == len(steps) + 1


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(e=st.lists(st.tuples(st.integers(0, 2 ** 31), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 70000)))
def test_mutated_compact_ciphertexts(shipped_size, e, cut):
    server, _, _, _, request = shipped_size["single"]
    plan = server.plan
    item = wire.unpack(request, kind=wire.KIND_CIPHERTEXTS, max_items=1,
                       max_item_bytes=1 << 30).items[0]
    primes = plan.params.ciphertext_primes
    try:
        v, scale, _ = compact.unpack(_mutate(item, e, cut), primes, 8192, plan.input_drop_bits)
    except FormatError:
        return
    assert v.shape == (len(primes), 8192) and scale > 0
    assert np.all(v < np.array(primes, dtype=np.uint64)[:, None])


@pytest.fixture(scope="module")
def http_app(shipped_size):
    """The HTTP app serving the batch model in process, and one registered session."""
    from fastapi.testclient import TestClient

    from she.serve.service import ServiceConfig, create_app

    server, _, context, _, _ = shipped_size["batch"]
    http = TestClient(create_app({"m": server}, ServiceConfig(max_sessions=1000)))
    session = http.post("/v1/models/m/sessions", content=context).json()["session"]
    yield http, session
    http.close()


@FEW
@given(endpoint=st.sampled_from(["sessions", "predict"]), e=head_edits,
       cut=st.one_of(st.none(), st.integers(0, 3000)))
def test_mutated_http_bodies_get_4xx(shipped_size, http_app, endpoint, e, cut):
    _, _, context, _, request = shipped_size["batch"]
    http, session = http_app
    if endpoint == "sessions":
        r = http.post("/v1/models/m/sessions", content=_mutate(context, e, cut))
        assert r.status_code in (201, 400, 403, 422), r.text
        if r.status_code == 201:
            http.delete(f"/v1/sessions/{r.json()['session']}")
    else:
        r = http.post(f"/v1/sessions/{session}/predict", content=_mutate(request, e, cut))
        assert r.status_code in (200, 400, 413, 422), r.text
