"""The HTTP service, tested against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

import she
from she.io import wire
from she.io.context import public_context_bytes
from she.pipeline import encrypted_predict
from she.serve.remote import RemoteClient, RemoteError

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"


def _free_port() -> int:
    """A port nothing listens on (for the unreachable-server test only: nothing binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``she serve`` in a subprocess on a port the OS picks (``--port 0``: no race between
    finding a free port and binding it), read back from uvicorn's startup line."""

    def __init__(self, model: Path, *extra: str) -> None:
        self.url = ""
        self.args = [sys.executable, "-m", "she", "serve", str(model), "--port", "0",
                     "--max-body-mb", "64", *extra]
        self.proc: subprocess.Popen | None = None

    def start(self) -> LiveServer:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(self.args, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                break
        else:
            self.proc.wait()
            raise RuntimeError("server did not start:\n" + "".join(lines))
        # Keep draining the log so that the server never blocks on a full pipe.
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(small_model):
    live = LiveServer(small_model[0], "--api-key", API_KEY, "--max-sessions", "12").start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def local(small_model):
    plan = she.compile(she.load(small_model[0]))
    return plan, she.Server(plan, workers=1)


def _agree(encrypted: np.ndarray, plain: np.ndarray, error: float) -> bool:
    """Every image whose top-1/top-2 plaintext margin exceeds twice the predicted error
    (each logit is within that error, so only such a margin guarantees the class) gets
    the plaintext class, and at least 7 in 8 images overall."""
    top2 = np.sort(plain, axis=1)[:, -2:]
    safe = top2[:, 1] - top2[:, 0] > 2 * error
    same = encrypted.argmax(1) == plain.argmax(1)
    return bool(same[safe].all() and same.mean() >= 0.875)


def _client(server, tmp_path, name="keys") -> RemoteClient:
    return RemoteClient(server.url, "small", api_key=API_KEY, key_dir=tmp_path / name)


def _http(server, method, path, **kw) -> httpx.Response:
    headers = {"X-API-Key": API_KEY, **kw.pop("headers", {})}
    return httpx.request(method, server.url + path, headers=headers, timeout=300, **kw)


def test_openapi_documents_versioned_endpoints(server):
    schema = _http(server, "GET", "/openapi.json").json()
    for path in ("/v1/health", "/v1/models", "/v1/models/{model}",
                 "/v1/models/{model}/sessions", "/v1/sessions/{session}/predict",
                 "/v1/sessions/{session}"):
        assert path in schema["paths"], path
    spec = _http(server, "GET", "/v1/models/small").json()
    assert spec["input_ciphertexts"] == 49 and spec["packing"] == "batch"


def test_remote_predictions_equal_local_server(server, local, small_model, tmp_path):
    plan, local_server = local
    _, x, _ = small_model
    remote = _client(server, tmp_path)
    remote_logits = remote.predict(x)
    local_logits, _ = encrypted_predict(plan, x, server=local_server)
    plain = she.load(small_model[0]).run_plain(x)
    # Two encryptions of the same input differ only by fresh noise.
    assert np.array_equal(remote_logits.argmax(1), local_logits.argmax(1))
    assert np.abs(remote_logits - local_logits).max() < plan.predicted_error
    assert np.mean(remote_logits.argmax(1) == plain.argmax(1)) >= 0.98
    remote.close()


def test_eight_concurrent_clients(server, small_model, local, tmp_path):
    path, x, _ = small_model
    plain = she.load(path).run_plain(x)
    error = local[0].predicted_error

    def one(i: int) -> bool:
        remote = _client(server, tmp_path, f"k{i}")
        chunk = slice(8 * i, 8 * i + 8)
        logits = remote.predict(x[chunk])
        remote.close()
        return _agree(logits, plain[chunk], error)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(8)))


def test_bad_input_gets_4xx_never_500(server, small_model, tmp_path):
    _, x, _ = small_model
    remote = _client(server, tmp_path)
    session = remote._register()
    cases = {
        "garbage predict": ("POST", f"/v1/sessions/{session}/predict", b"\x00" * 100, 400),
        "garbage context": ("POST", "/v1/models/small/sessions", b"junk" * 10, 400),
        "empty body": ("POST", f"/v1/sessions/{session}/predict", b"", 400),
        "unknown session": ("POST", "/v1/sessions/nope/predict", remote.client.encrypt(x[:1]), 404),
        "unknown model": ("GET", "/v1/models/nope", None, 404),
        "delete unknown": ("DELETE", "/v1/sessions/nope", None, 404),
        "oversized": ("POST", f"/v1/sessions/{session}/predict", b"\x00" * (65 << 20), 413),
    }
    for name, (method, path, body, status) in cases.items():
        r = _http(server, method, path, content=body)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.json()["detail"], name
    # a truncated real request
    request = remote.client.encrypt(x[:2])
    r = _http(server, "POST", f"/v1/sessions/{session}/predict", content=request[:-10])
    assert r.status_code == 400 and "truncated" in r.json()["detail"]
    # wrong API key
    r = httpx.get(f"{server.url}/v1/models", headers={"X-API-Key": "wrong"})
    assert r.status_code == 401


def test_secret_key_upload_is_refused(server, tmp_path):
    remote = _client(server, tmp_path)
    secret = remote.client.ctx.serialize(save_secret_key=True)
    body = wire.pack(wire.KIND_CONTEXT, {"fingerprint": remote.client.fingerprint}, [secret])
    r = _http(server, "POST", "/v1/models/small/sessions", content=body)
    assert r.status_code == 403 and "secret key" in r.json()["detail"]


def test_context_for_other_parameters_is_refused(server, small_model, tmp_path):
    other = she.compile(she.load(small_model[0]), scale_bits=30, weight_bits=16)
    client = she.Client(other.spec())
    spec = _http(server, "GET", "/v1/models/small").json()
    assert client.fingerprint != spec["fingerprint"]
    body = wire.pack(wire.KIND_CONTEXT, {"fingerprint": spec["fingerprint"]},
                     [public_context_bytes(client.ctx)])
    r = _http(server, "POST", "/v1/models/small/sessions", content=body)
    assert r.status_code == 422
    # The same context with its keys embedded is refused for those first (400).
    body = wire.pack(wire.KIND_CONTEXT, {"fingerprint": spec["fingerprint"]},
                     [client.ctx.serialize(save_secret_key=False)])
    r = _http(server, "POST", "/v1/models/small/sessions", content=body)
    assert r.status_code == 400 and "parameters only" in r.json()["detail"]


def test_restart_forgets_sessions_and_client_recovers(small_model, tmp_path):
    path, x, _ = small_model
    live = LiveServer(path, "--api-key", API_KEY).start()
    try:
        remote = _client(live, tmp_path)
        first = remote.predict(x[:4])
        session = remote._session()
        live.stop()
        live = LiveServer(path, "--api-key", API_KEY).start()
        remote.url = live.url  # the restarted server listens on another port
        r = _http(live, "POST", f"/v1/sessions/{session}/predict",
                  content=remote.client.encrypt(x[:4]))
        assert r.status_code == 404 and "register" in r.json()["detail"]
        again = remote.predict(x[:4])  # re-registers by itself, same cached keys
        assert np.array_equal(first.argmax(1), again.argmax(1))
        assert remote._session() != session
    finally:
        live.stop()


def test_plain_tenseal_client_from_docs(server, small_model, local, tmp_path):
    path, x, _ = small_model
    text = (REPO / "docs" / "http-api.md").read_text()
    code = re.search(r"plain-tenseal-client:start -->\n```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('headers={"Content-Type": "application/octet-stream"}',
                        f'headers={{"Content-Type": "application/octet-stream", '
                        f'"X-API-Key": "{API_KEY}"}}')
    script = tmp_path / "client.py"
    script.write_text(code)
    np.save(tmp_path / "images.npy", x[:16])
    env = {**os.environ, "SHE_URL": server.url, "SHE_MODEL": "small",
           "SHE_IMAGES": str(tmp_path / "images.npy")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=600, check=True).stdout
    predictions = np.array(json.loads(out.strip().splitlines()[-1]))
    plain = she.load(path).run_plain(x[:16])
    assert _agree(np.eye(plain.shape[1])[predictions], plain, local[0].predicted_error)


def test_remote_error_is_clear(tmp_path):
    with pytest.raises(RemoteError, match="cannot reach"):
        RemoteClient(f"http://127.0.0.1:{_free_port()}", "small", key_dir=tmp_path)


def test_oversized_upload_is_a_clear_413_not_a_reset(server, tmp_path):
    """The service refuses a body above its cap from Content-Length, before reading it, and
    closes; the client, still sending, must say so rather than "connection reset"."""
    remote = RemoteClient(server.url, "small", api_key=API_KEY, key_dir=tmp_path)
    with pytest.raises(RemoteError, match="413") as refused:
        remote._request("POST", "/v1/models/small/sessions", bytes(80 * 2**20))
    assert refused.value.status in (0, 413)


def test_predict_command_with_png_and_idx(server, small_model, mnist_dir, tmp_path, capsys):
    from PIL import Image

    from she.cli import main

    path, x, _ = small_model
    png = tmp_path / "digit.png"
    Image.fromarray(np.round(x[3, 0] * 255).astype(np.uint8)).save(png)
    common = ["--server", server.url, "--model", "small", "--api-key", API_KEY,
              "--key-dir", str(tmp_path / "keys"), "--json"]
    assert main(["predict", *common, str(png)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plain = she.load(path).run_plain(x[3:4])
    assert result["predictions"] == plain.argmax(1).tolist()
    assert abs(sum(result["probabilities"][0]) - 1) < 1e-3
    # An IDX file with --index: the CLI resizes nothing here, so use a 7x7 IDX we write.
    idx = tmp_path / "images-idx3-ubyte"
    pixels = np.round(x[:5, 0] * 255).astype(np.uint8)
    idx.write_bytes(bytes([0, 0, 8, 3]) + np.array([5, 7, 7], dtype=">u4").tobytes()
                    + pixels.tobytes())
    assert main(["predict", *common, str(idx), "--index", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["predictions"] == she.load(path).run_plain(pixels[2:3, None] / 255.0).argmax(1).tolist()
    assert main(["predict", *common, str(idx), "--index", "9"]) == 2
