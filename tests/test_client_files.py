"""The client's local files and what it reads from a server (issue #21, items 7 and 10).

Secret keys and session ids are written 0600 through a new file renamed into place (never
readable by others, never through a planted symbolic link) in 0700 directories; a
server's answers are read up to a bound.
"""

from __future__ import annotations

import http.server
import json
import os
import stat
import threading

import pytest

import she
from she.io import privatefiles
from she.plan.params import EncryptionParameters
from she.serve.remote import MAX_JSON_BYTES, RemoteClient

SPEC = {"scheme": "ckks", "poly_modulus_degree": 4096, "modulus_bits": [30, 25, 30],
        "packing": "batch", "input_shape": [1, 2, 2], "input_scale": 2.0 ** 25,
        "batch_capacity": 2048, "output_ciphertexts": 2, "output_limbs": 1,
        "output_scale": 2.0 ** 25, "security_bits": 128, "model": "m",
        "primes": list(EncryptionParameters("ckks", 4096, (30, 25, 30)).primes)}
SPEC_INPUT = [[[[0.1, 0.2], [0.3, 0.4]]]]


@pytest.fixture(scope="module")
def client() -> she.Client:
    return she.Client(SPEC)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_secret_key_file_is_0600_whatever_the_umask(client, tmp_path):
    old = os.umask(0)
    try:
        client.save(tmp_path / "key")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "key") == 0o600
    assert she.Client.load(tmp_path / "key").fingerprint == client.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temporary left behind


def test_secret_key_is_never_written_through_a_symbolic_link(client, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    victim.chmod(0o644)
    (tmp_path / "key").symlink_to(victim)
    client.save(tmp_path / "key")
    assert victim.read_bytes() == b"keep me" and _mode(victim) == 0o644
    assert not (tmp_path / "key").is_symlink() and _mode(tmp_path / "key") == 0o600


def test_secret_key_never_exists_in_a_wider_file(client, tmp_path, monkeypatch):
    # At the moment the key file appears under its name it is already complete and 0600:
    # catch the rename and look at the file being renamed.
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((_mode(src), os.path.getsize(src), os.path.exists(dst)))
        real(src, dst)

    monkeypatch.setattr(privatefiles.os, "replace", spy)
    old = os.umask(0)
    try:
        client.save(tmp_path / "key")
    finally:
        os.umask(old)
    assert seen == [(0o600, (tmp_path / "key").stat().st_size, False)]


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(privatefiles.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        privatefiles.write_private(tmp_path / "key", b"secret")
    assert list(tmp_path.iterdir()) == []


def test_key_directory_is_created_0700_and_must_not_be_writable_by_others(tmp_path):
    assert _mode(privatefiles.private_directory(tmp_path / "new" / "keys")) == 0o700
    readable = tmp_path / "readable"
    readable.mkdir()
    readable.chmod(0o755)  # others may list it (the key files stay 0600): accepted as is
    assert _mode(privatefiles.private_directory(readable)) == 0o755
    for mode in (0o777, 0o775, 0o757):
        shared = tmp_path / f"shared{mode:o}"
        shared.mkdir()
        shared.chmod(mode)
        with pytest.raises(she.SecurityError, match="writable by other users"):
            privatefiles.private_directory(shared)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        privatefiles.private_directory(tmp_path / "file")


# -- RemoteClient against a small fake server ----------------------------------------------------

class _Fake(http.server.BaseHTTPRequestHandler):
    """GET answers the spec (padded to ``pad`` bytes); POST /sessions a session id; POST
    predict ``result`` bytes, with or without a Content-Length."""

    pad = 0
    result = b""
    declare = True

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, kind: str, declare: bool = True) -> None:
        self.send_response(201 if self.path.endswith("/sessions") else 200)
        self.send_header("Content-Type", kind)
        if declare:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        spec = {**SPEC, "padding": "x" * self.pad}
        self._send(json.dumps(spec).encode(), "application/json")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.endswith("/sessions"):
            self._send(json.dumps({"session": "s" * 32}).encode(), "application/json")
        else:
            self.close_connection = True
            self._send(self.result, "application/octet-stream", self.declare)


@pytest.fixture()
def fake():
    handler = type("Handler", (_Fake,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_session_file_and_key_cache_are_private(fake, tmp_path, client):
    handler, url = fake
    remote = RemoteClient(url, "m", key_dir=tmp_path / "keys")
    remote.client = client
    assert remote._register() == "s" * 32
    assert _mode(tmp_path / "keys") == 0o700
    files = sorted(tmp_path.joinpath("keys").iterdir())
    assert [p.suffix for p in files] == [".key", ".session"]
    assert all(_mode(p) == 0o600 for p in files)


def test_an_oversized_spec_is_refused(fake, tmp_path):
    handler, url = fake
    handler.pad = MAX_JSON_BYTES
    with pytest.raises(she.FormatError, match="exceeds"):
        RemoteClient(url, "m", key_dir=tmp_path)


@pytest.mark.parametrize("declare", [True, False])
def test_an_oversized_result_is_refused_unread(fake, tmp_path, client, declare):
    handler, url = fake
    remote = RemoteClient(url, "m", key_dir=tmp_path)
    limit = remote._result_limit()
    # Two output ciphertexts of one limb at N=4096 are ~131 KB: the bound is near that.
    assert 2 * 2 * 4096 * 8 < limit < 2 * 2 * 4096 * 8 + 256 * 1024
    handler.result, handler.declare = b"\0" * (limit + 1), declare
    with pytest.raises(she.FormatError, match="exceeds"):
        remote.predict(SPEC_INPUT)

