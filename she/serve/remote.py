"""A client of the SHE HTTP service (``she serve``), using only the standard library.

Keys are generated locally and cached per server and model; the secret key never leaves
this machine (only the public context is uploaded). A session id is cached beside the key
and re-registered automatically when the server no longer knows it (after a restart or
when it expired).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from ..client import Client
from ..errors import FormatError, SheError
from ..io import wire
from ..io.privatefiles import private_directory, write_private
from ..plan.params import EncryptionParameters

#: Largest JSON answer (a spec, a session, an error) read from a server.
MAX_JSON_BYTES = 1 << 20
#: Largest result message read from a server, whatever its spec says.
MAX_RESULT_BYTES = 1 << 30
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")


def _read_limited(response: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of an HTTP answer; a longer one is refused (FormatError)
    without being read further."""
    declared = response.headers.get("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > limit:
        raise FormatError(f"the server's answer of {int(declared)} bytes exceeds the "
                          f"{limit} this request can take")
    data = response.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"the server's answer exceeds the {limit} bytes this request can take")
    return data


class RemoteError(SheError):
    """The server answered with an error (the message carries its status and detail)."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        super().__init__(f"server answered {status}: {detail}")


def default_key_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "she" / "keys"


class RemoteClient:
    """Encrypted predictions from a remote SHE server.

    Args:
        url: base URL of the server, e.g. ``http://127.0.0.1:8000``.
        model: model name (see ``GET /v1/models``).
        api_key: value of the ``X-API-Key`` header, if the server requires one.
        key_dir: where keys and session ids are cached (default ``~/.cache/she/keys``).
        timeout: seconds to wait for one HTTP request.
    """

    def __init__(self, url: str, model: str, *, api_key: str | None = None,
                 key_dir: str | Path | None = None, timeout: float = 900.0) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.spec: dict[str, Any] = self._request("GET", f"/v1/models/{model}")
        self.spec.pop("fingerprint", None)
        key_dir = private_directory(key_dir if key_dir else default_key_dir())
        self.client = self._load_or_create_client(key_dir)
        self._session_file = self._key_file.with_suffix(".session")

    # -- HTTP ----------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None,
                 limit: int = MAX_JSON_BYTES) -> Any:
        """One HTTP exchange; an answer longer than ``limit`` bytes is refused unread."""
        headers = {"Accept": "application/json, application/octet-stream"}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = _read_limited(response, limit)
                if response.headers.get_content_type() == "application/json":
                    return json.loads(data)
                return data
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(_read_limited(exc, MAX_JSON_BYTES)).get("detail", exc.reason)
            except (ValueError, AttributeError, FormatError):
                detail = exc.reason
            raise RemoteError(exc.code, str(detail)) from None
        except (urllib.error.URLError, ConnectionError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if body is not None and isinstance(reason, ConnectionError):
                raise RemoteError(0, f"{self.url} closed the connection while a "
                                  f"{len(body) / 2**20:.1f} MiB request body was being sent: "
                                  "the server refuses bodies above its upload limit (HTTP 413) "
                                  "before reading them, or it stopped") from None
            raise RemoteError(0, f"cannot reach {self.url}: {reason}") from None

    def _result_limit(self) -> int:
        """Most bytes a result message of this model can take (its output ciphertexts at
        the output level, uncompressed), at most :data:`MAX_RESULT_BYTES`."""
        try:
            items = int(self.spec["output_ciphertexts"])
            item = 2 * int(self.spec["output_limbs"]) * int(self.spec["poly_modulus_degree"]) * 8
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"model spec lacks the output layout: {exc}") from exc
        return min(MAX_RESULT_BYTES, items * (item + 1024) + wire.MAX_META_BYTES + 1024)

    # -- keys and sessions ---------------------------------------------------------------
    def _load_or_create_client(self, key_dir: Path) -> Client:
        server_id = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        fingerprint = EncryptionParameters.from_spec(self.spec).fingerprint()
        safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model)
        self._key_file = key_dir / f"{server_id}-{safe_model}-{fingerprint}.key"
        if self._key_file.exists():
            try:
                return Client.load(self._key_file)
            except FormatError:
                self._key_file.unlink()
        client = Client(self.spec)
        client.save(self._key_file)
        return client

    def _register(self) -> str:
        answer = self._request("POST", f"/v1/models/{self.model}/sessions",
                               self.client.public_context())
        session = answer.get("session") if isinstance(answer, dict) else None
        if not isinstance(session, str) or not _SESSION_ID.fullmatch(session):
            raise FormatError("the server answered a registration without a valid session id")
        write_private(self._session_file, session.encode())
        return session

    def _session(self) -> str:
        if self._session_file.exists():
            return self._session_file.read_text().strip()
        return self._register()

    # -- predictions ---------------------------------------------------------------------
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Encrypt ``x`` (a batch), have the server evaluate it, return decrypted outputs
        (with the model's plaintext tail re-applied: :meth:`Client.decrypt`)."""
        return self.client.decrypt(self._evaluate(x))

    def predict_outputs(self, x: np.ndarray) -> dict[str, Any]:
        """Like :meth:`predict`, but every output of the original model, by name
        (:meth:`Client.decrypt_outputs`)."""
        return self.client.decrypt_outputs(self._evaluate(x))

    def _evaluate(self, x: np.ndarray) -> bytes:
        request = self.client.encrypt(x)
        session = self._session()
        try:
            response = self._request("POST", f"/v1/sessions/{session}/predict", request,
                                     self._result_limit())
        except RemoteError as exc:
            if exc.status != 404:
                raise
            session = self._register()
            response = self._request("POST", f"/v1/sessions/{session}/predict", request,
                                     self._result_limit())
        return response

    def close(self) -> None:
        """Delete the server-side session (the local keys stay cached)."""
        if self._session_file.exists():
            try:
                self._request("DELETE", f"/v1/sessions/{self._session()}")
            except RemoteError as exc:
                if exc.status != 404:
                    raise
            self._session_file.unlink(missing_ok=True)
