"""Documented service behaviour that had no test (issue #21 test audit): the session cap
(503), session expiry, 401 without the API key (from SHE_API_KEY or --api-key-file),
single packing and BFV over HTTP through RemoteClient, checked against onnxruntime on
real MNIST. One in-process uvicorn on a port the OS picks (no free-port race)."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

import she
from she.cli import API_KEY_ENV, _api_key, _api_keys, build_parser
from she.serve.remote import RemoteClient, RemoteError
from she.serve.service import ServiceConfig, SessionStore, StoreFull, UnknownSession, create_app

KEY = "s3cret-test-key"




@pytest.fixture(scope="module")
def plans(small_model):
    """The 7x7 MNIST model in single packing (CKKS) and in BFV."""
    path, x, _ = small_model
    model = she.load(path)
    return {"small_single": (she.compile(model, calibration=x, packing="single"), path),
            "small_bfv": (she.compile(model, scheme="bfv", calibration=x), path)}


@pytest.fixture(scope="module")
def live(plans):
    servers = {name: she.Server(plan, workers=1) for name, (plan, _) in plans.items()}
    config = ServiceConfig(api_keys=(KEY,), max_sessions=3)
    app = create_app(servers, config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def images(small_model):
    return small_model[1][:8]


def test_every_endpoint_needs_the_api_key(live):
    url, _ = live
    for method, path in [("GET", "/v1/health"), ("GET", "/v1/models"),
                         ("GET", "/v1/models/small_single"),
                         ("POST", "/v1/models/small_single/sessions"),
                         ("POST", "/v1/sessions/x/predict"), ("DELETE", "/v1/sessions/x")]:
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY[:-1]}):
            r = httpx.request(method, url + path, headers=headers, content=b"x" * 10)
            assert r.status_code == 401, (method, path, headers)
            assert "X-API-Key" in r.json()["detail"]
    assert httpx.get(url + "/v1/health", headers={"X-API-Key": KEY}).status_code == 200


def test_single_packing_over_http(live, plans, images, tmp_path):
    url, _ = live
    plan, path = plans["small_single"]
    remote = RemoteClient(url, "small_single", api_key=KEY, key_dir=tmp_path)
    reference = she.load(path).run_plain(images[:3])
    for i in range(3):
        out = remote.predict(images[i:i + 1])
        assert np.abs(out - reference[i]).max() <= plan.predicted_error
        assert out.argmax() == reference[i].argmax()
    remote.close()


def test_bfv_over_http_is_exact(live, plans, images, tmp_path):
    url, _ = live
    plan, path = plans["small_bfv"]
    remote = RemoteClient(url, "small_bfv", api_key=KEY, key_dir=tmp_path)
    out = remote.predict(images)
    exact = plan.run_integers(plan.quantise_inputs(images)) / plan.output_scale()
    assert np.array_equal(out, exact)
    reference = she.load(path).run_plain(images)
    assert np.array_equal(out.argmax(1), reference.argmax(1))
    remote.close()


def test_session_cap_gives_503_and_frees_on_delete(live, plans, tmp_path):
    url, app = live
    remote = RemoteClient(url, "small_bfv", api_key=KEY, key_dir=tmp_path)
    body = remote.client.public_context()
    headers = {"X-API-Key": KEY}
    free = app.state.sessions.cap - len(app.state.sessions)
    ids = [httpx.post(f"{url}/v1/models/small_bfv/sessions", content=body, headers=headers,
                      timeout=120).json()["session"] for _ in range(free)]
    r = httpx.post(f"{url}/v1/models/small_bfv/sessions", content=body, headers=headers,
                   timeout=120)
    assert r.status_code == 503 and "session limit" in r.json()["detail"]
    assert httpx.delete(f"{url}/v1/sessions/{ids[0]}", headers=headers).status_code == 204
    r = httpx.post(f"{url}/v1/models/small_bfv/sessions", content=body, headers=headers,
                   timeout=120)
    assert r.status_code == 201
    for sid in [*ids[1:], r.json()["session"]]:
        assert httpx.delete(f"{url}/v1/sessions/{sid}", headers=headers).status_code == 204


def test_sessions_expire_after_their_ttl_without_use():
    now = [1000.0]
    store = SessionStore(ttl=60, cap=2, max_key_bytes=10, clock=lambda: now[0])
    a = store.put("m", None, 1, "owner")
    b = store.put("m", None, 1, "owner")
    with pytest.raises(StoreFull) as full:
        store.put("m", None, 1, "owner")
    assert full.value.status == 503
    now[0] += 50
    store.get(a, "owner")     # use renews a's lease, not b's
    now[0] += 20              # b: 70 s unused -> expired; a: 20 s
    with pytest.raises(UnknownSession):
        store.get(b, "owner")
    assert len(store) == 1 and store.get(a, "owner").model == "m"
    store.put("m", None, 1, "owner")  # the expired one no longer counts against the cap
    now[0] += 61
    assert len(store) == 0


def test_api_key_from_environment_or_file(tmp_path, monkeypatch, capsys):
    parser = build_parser()
    base = ["predict", "--server", "http://x", "--model", "m", "in.png"]
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert _api_key(parser.parse_args(base)) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert _api_key(parser.parse_args([*base, "--api-key-file", str(key_file)])) == "from-file"
    assert _api_key(parser.parse_args([*base, "--api-key", "argv"])) == "argv"
    assert "process list" in capsys.readouterr().err
    with pytest.raises(she.SheError, match="not both"):
        _api_key(parser.parse_args([*base, "--api-key", "a", "--api-key-file", str(key_file)]))
    key_file.write_text("\n")
    with pytest.raises(she.DataError, match="empty"):
        _api_key(parser.parse_args([*base, "--api-key-file", str(key_file)]))
    monkeypatch.delenv(API_KEY_ENV)
    assert _api_key(parser.parse_args(base)) is None
    serve = parser.parse_args(["serve", "m.onnx", "--api-key-file", str(tmp_path / "none")])
    with pytest.raises(she.DataError, match="cannot read"):
        _api_keys(serve)


def test_wrong_key_from_remote_client_is_a_clear_error(live, tmp_path):
    url, _ = live
    with pytest.raises(RemoteError, match="401"):
        RemoteClient(url, "small_single", api_key="wrong", key_dir=tmp_path)
