"""Attacks of a hostile client on the HTTP service that got past the earlier checks (the
security review of the serving path): transparent ciphertexts (second polynomial zero)
as inputs or as the public key results are re-randomised with, one client taking every
session slot (per API key), and slow-loris connections (headers or body trickled). Each
attack gets its clear 4xx answer (or ends only the attacker's own sessions, or its
connections), and a good request afterwards still decrypts to the plaintext model's
outputs (7x7 MNIST model, batch packing, N=8192, real test images)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import numpy as np
import onnx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from onnx import numpy_helper

import she
from she.errors import FormatError
from she.io import context, sealbytes, wire
from she.serve.service import ServiceConfig, SessionStore, create_app
from she.serve.slow_clients import header_timeout_protocol


@pytest.fixture(scope="module")
def setup(small_model):
    path, x, _ = small_model
    model = she.load(path)
    plan = she.compile(model, calibration=x)
    server = she.Server(plan, workers=1)
    app = create_app({"m": server}, ServiceConfig(api_keys=("alice", "bob"), workers=1,
                                                  max_sessions=3, max_sessions_per_key=2))
    client = she.Client(plan.spec())
    http = TestClient(app, raise_server_exceptions=False)
    images = x[:2]
    return {"plan": plan, "server": server, "client": client, "http": http, "images": images,
            "reference": model.run_plain(images), "request": client.encrypt(images),
            "context": client.public_context()}


def _register(setup, body: bytes, key: str = "alice"):
    return setup["http"].post("/v1/models/m/sessions", content=body, headers={"X-API-Key": key})


def _predict(setup, sid: str, body: bytes, key: str = "alice"):
    return setup["http"].post(f"/v1/sessions/{sid}/predict", content=body,
                              headers={"X-API-Key": key})


def _assert_correct(setup, answer) -> None:
    assert answer.status_code == 200, answer.text
    out = setup["client"].decrypt(answer.content)
    assert np.abs(out - setup["reference"]).max() <= setup["plan"].predicted_error
    assert (out.argmax(1) == setup["reference"].argmax(1)).all()


def _with_polynomials(blob: bytes, level: sealbytes.LevelSpec, zero: slice) -> bytes:
    """``blob`` (a SEAL ciphertext at ``level``) with the polynomials ``zero`` set to 0."""
    raw = sealbytes.parse(blob, level)
    raw.data[zero] = 0
    return sealbytes.serialize(raw)


def test_transparent_input_ciphertexts_are_refused(setup):
    """A ciphertext whose second polynomial is zero is no encryption; SEAL refused to
    compute on it deep inside the worker, which answered 500 (before the fix)."""
    sid = _register(setup, setup["context"]).json()["session"]
    msg = wire.unpack(setup["request"], kind=wire.KIND_CIPHERTEXTS, max_items=10 ** 4,
                      max_item_bytes=1 << 26)
    plan = setup["plan"]
    level = context.level_specs(context.new_secret_context(plan.params))[
        len(plan.params.ciphertext_primes)]
    for zero in (slice(1, None), slice(None)):  # c1 = 0; everything 0
        items = [_with_polynomials(item, level, zero) for item in msg.items]
        answer = _predict(setup, sid, wire.pack(wire.KIND_CIPHERTEXTS, msg.meta, items))
        assert answer.status_code == 400, answer.text
        assert "transparent" in answer.json()["detail"]
    _assert_correct(setup, _predict(setup, sid, setup["request"]))


def test_public_key_with_a_zero_polynomial_is_refused(setup):
    """Results are re-randomised with the client's public key: one whose second
    polynomial is zero makes that a no-op (the client would see the result ciphertext's
    weight-dependent polynomials); before the fix it was accepted."""
    msg = wire.unpack(setup["context"], kind=wire.KIND_CONTEXT, max_items=4,
                      max_item_bytes=1 << 28)
    ctx = context.load_public_context(msg.items[0], setup["plan"].params)
    for zero in (slice(1, None), slice(None)):
        items = [*msg.items[:-1], _with_polynomials(msg.items[-1], context.key_level(ctx), zero)]
        answer = _register(setup, wire.pack(wire.KIND_CONTEXT, msg.meta, items))
        assert answer.status_code == 400, answer.text
        assert "transparent" in answer.json()["detail"]
    sid = _register(setup, setup["context"]).json()["session"]
    _assert_correct(setup, _predict(setup, sid, setup["request"]))


def test_one_client_cannot_take_every_session(setup):
    """With 3 session slots and 2 per client, alice registering again and again ends only
    her own oldest sessions; bob still registers (before the fix he got 503 until alice's
    sessions expired) and gets correct results."""
    http = setup["http"]
    alice = [_register(setup, setup["context"]).json()["session"] for _ in range(4)]
    assert _predict(setup, alice[0], setup["request"]).status_code == 404
    bob = _register(setup, setup["context"], key="bob")
    assert bob.status_code == 201, bob.text
    _assert_correct(setup, _predict(setup, bob.json()["session"], setup["request"], key="bob"))
    _assert_correct(setup, _predict(setup, alice[-1], setup["request"]))
    health = http.get("/v1/health", headers={"X-API-Key": "bob"}).json()
    assert health["sessions"] == 3 and health["evicted_sessions"] >= 2


def test_per_key_cap_of_the_store_ends_the_least_recently_used():
    store = SessionStore(ttl=100, cap=10, max_key_bytes=1000, per_owner=2)
    a, b = store.put("m", None, 1, "o"), store.put("m", None, 1, "o")
    other = store.put("m", None, 1, "p")
    store.get(a, "o")  # b is now o's least recently used
    c = store.put("m", None, 1, "o")
    for sid, owner in ((a, "o"), (c, "o"), (other, "p")):
        assert store.get(sid, owner).owner == owner
    with pytest.raises(LookupError):
        store.get(b, "o")
    assert len(store) == 3 and store.evicted == 1
    anonymous = [store.put("m", None, 1, None) for _ in range(4)]  # no key: no such cap
    assert all(store.get(sid, None) for sid in anonymous) and len(store) == 7


def test_parse_refuses_transparent_ciphertexts_but_not_seeded_ones(setup):
    plan = setup["plan"]
    ctx = context.new_secret_context(plan.params)
    level = context.level_specs(ctx)[len(plan.params.ciphertext_primes)]
    blob = wire.unpack(setup["request"], kind=wire.KIND_CIPHERTEXTS, max_items=10 ** 4,
                       max_item_bytes=1 << 26).items[0]
    with pytest.raises(FormatError, match="transparent"):
        sealbytes.parse(_with_polynomials(blob, level, slice(1, None)), level)
    # a seeded key stores one polynomial: nothing to refuse there
    relin = context.load_relin_keys(ctx, context.relin_key_bytes(ctx))
    assert relin.size() == 1


def test_per_key_cap_of_the_shared_session_table():
    """The Ray front's shared table (a plain class; Ray makes it an actor) caps the same."""
    from she.serve.ray_serve import SessionTable

    table = SessionTable(ttl=100, cap=10, per_owner=2)
    ids = [table.add("m", b"message", "o", 1) for _ in range(3)]
    other = table.add("m", b"message", "p", 1)
    assert table.touch(ids[0], "o", False) is None  # the least recently used one ended
    assert all(table.touch(sid, owner, False) for sid, owner in
               ((ids[1], "o"), (ids[2], "o"), (other, "p")))
    assert table.count() == 3


@pytest.fixture(scope="module")
def slow_limits_server(setup):
    """A real uvicorn (slow clients need sockets) with short header and body deadlines,
    room for one largest body at a time and for three connections (uvicorn answers 503 from the fourth on)."""
    server = setup["server"]
    config = ServiceConfig(api_keys=("alice",), workers=1, read_timeout=1.0,
                           body_timeout=2.5, header_timeout=1.5,
                           max_pending_body_bytes=1)  # raised to the largest body, 64 MiB
    app = create_app({"m": server}, config)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                       limit_concurrency=4, timeout_keep_alive=5,
                                       http=header_timeout_protocol(config.header_timeout)))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield uv.servers[0].sockets[0].getsockname()[1]
    uv.should_exit = True
    thread.join(timeout=30)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1 << 16, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_slow_loris_connections_are_closed_and_others_get_in(setup, slow_limits_server):
    """Three connections (uvicorn's limit here) held by a client that never finishes its
    headers, trickles them, or trickles its body: before the deadlines, uvicorn kept the
    first two open for ever (every other client got 503) and the body's read timeout
    alone never fired on a trickle. Now both are closed and the trickled body gets 408;
    then a good client registers and gets correct results."""
    port = slow_limits_server
    idle, trickle, body = (socket.create_connection(("127.0.0.1", port)) for _ in range(3))
    idle.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
    trickle.sendall(b"GET /v1/health HTTP/1.1\r\n")
    body.sendall(b"POST /v1/models/m/sessions HTTP/1.1\r\nHost: x\r\nX-API-Key: alice\r\n"
                 b"Content-Length: 1000000\r\n\r\n")
    answer = b""
    for i in range(80):  # at most 8 s of trickling, a byte every 0.1 s
        time.sleep(0.1)
        for sock, data in ((trickle, b"X-%d: y\r\n" % i), (body, b"x")):
            with contextlib.suppress(OSError):
                sock.sendall(data)
        with contextlib.suppress(BlockingIOError, OSError):
            answer += body.recv(1 << 16, socket.MSG_DONTWAIT)
        if _closed(idle) and _closed(trickle) and b"too slow" in answer:
            break
    assert _closed(idle) and _closed(trickle)
    assert answer.startswith(b"HTTP/1.1 408") and b"too slow" in answer
    for sock in (idle, trickle, body):
        sock.close()
    url, headers = f"http://127.0.0.1:{port}", {"X-API-Key": "alice"}
    sid = httpx.post(f"{url}/v1/models/m/sessions", content=setup["context"],
                     headers=headers, timeout=60).json()["session"]
    _assert_correct(setup, httpx.post(f"{url}/v1/sessions/{sid}/predict",
                                      content=setup["request"], headers=headers, timeout=60))


def test_inputs_that_cancel_out_inside_the_model_get_400(small_model, tmp_path_factory):
    """Every input ciphertext valid on its own, all the same: a hidden unit whose weights
    sum to zero turns them into a transparent ciphertext, on which SEAL refuses to compute
    (500 before the fix). Honest inputs are still evaluated correctly by that model."""
    path, x, _ = small_model
    proto = onnx.load(path)
    for init in proto.graph.initializer:
        if init.name == "w1":
            w1 = numpy_helper.to_array(init).copy()
            w1[0] = 0
            w1[0, 10], w1[0, 20] = 0.5, -0.5  # unit 0: pixel 10 minus pixel 20
            init.CopyFrom(numpy_helper.from_array(w1, "w1"))
    edited = tmp_path_factory.mktemp("zero_sum") / "zero_sum.onnx"
    onnx.save(proto, edited)
    model = she.load(edited)
    plan = she.compile(model, calibration=x)
    http = TestClient(create_app({"m": she.Server(plan, workers=1)}, ServiceConfig(workers=1)),
                      raise_server_exceptions=False)
    client = she.Client(plan.spec())
    sid = http.post("/v1/models/m/sessions", content=client.public_context()).json()["session"]
    request = client.encrypt(x[:2])
    msg = wire.unpack(request, kind=wire.KIND_CIPHERTEXTS, max_items=10 ** 4,
                      max_item_bytes=1 << 26)
    same = wire.pack(wire.KIND_CIPHERTEXTS, msg.meta, [msg.items[0]] * len(msg.items))
    answer = http.post(f"/v1/sessions/{sid}/predict", content=same)
    assert answer.status_code == 400, answer.text
    assert "transparent" in answer.json()["detail"]
    honest = http.post(f"/v1/sessions/{sid}/predict", content=request)
    _assert_correct({"client": client, "plan": plan, "reference": model.run_plain(x[:2])},
                    honest)


def test_guessing_api_keys_is_rate_limited_and_the_right_key_still_works(setup):
    """Wrong keys got 401 at any rate (the rate limit counted only accepted keys), so keys
    could be guessed as fast as the network allows; now they count against the address."""
    config = ServiceConfig(api_keys=("alice",), workers=1, rate_limit=0.001, rate_burst=3)
    http = TestClient(create_app({"m": setup["server"]}, config))
    codes = [http.get("/v1/health", headers={"X-API-Key": f"guess{i}"}).status_code
             for i in range(6)]
    assert codes == [401] * 3 + [429] * 3
    assert http.get("/v1/health", headers={"X-API-Key": "alice"}).status_code == 200


def test_bodies_held_at_once_are_bounded(setup, slow_limits_server):
    """One upload of the largest body a route takes (64 MiB here), held open: before the
    bound, concurrent uploads like it could fill the server's memory and disk without
    limit; now the next body gets 503 with Retry-After until that one ends (here with
    408), and then registration and prediction work again."""
    port = slow_limits_server
    url, headers = f"http://127.0.0.1:{port}", {"X-API-Key": "alice"}
    cap = 64 * 1024 * 1024  # ServiceConfig.max_context_bytes: the largest body here
    hog = socket.create_connection(("127.0.0.1", port))
    hog.sendall(b"POST /v1/models/m/sessions HTTP/1.1\r\nHost: x\r\nX-API-Key: alice\r\n"
                b"Content-Length: %d\r\n\r\n" % cap)
    hog.sendall(bytes(cap - 10))
    for _ in range(200):  # until the server has read it all
        health = httpx.get(f"{url}/v1/health", headers=headers).json()
        if health["pending_body_bytes"] == cap - 10:
            break
        time.sleep(0.05)
    refused = httpx.post(f"{url}/v1/models/m/sessions", content=setup["context"],
                         headers=headers, timeout=60)
    assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text
    hog.settimeout(30)
    assert hog.recv(1 << 16).startswith(b"HTTP/1.1 408")  # the hog stalls: read timeout
    hog.close()
    registered = httpx.post(f"{url}/v1/models/m/sessions", content=setup["context"],
                            headers=headers, timeout=60)
    assert registered.status_code == 201, registered.text
    _assert_correct(setup, httpx.post(f"{url}/v1/sessions/{registered.json()['session']}"
                                      "/predict", content=setup["request"], headers=headers,
                                      timeout=60))
    assert httpx.get(f"{url}/v1/health", headers=headers).json()["pending_body_bytes"] == 0
