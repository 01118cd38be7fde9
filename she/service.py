"""The MLaaS HTTP service: a FastAPI app around :class:`she.Server`.

Endpoints (all under ``/v1``; binary bodies are ``application/octet-stream`` in the
:mod:`she.wire` format, see ``docs/http-api.md``):

* ``GET  /v1/health``                      liveness and counts
* ``GET  /v1/models``                      the models served
* ``GET  /v1/models/{model}``              a model's public spec
* ``POST /v1/models/{model}/sessions``     upload a public context, get a session id
* ``POST /v1/sessions/{session}/predict``  ciphertexts in, encrypted result out
* ``DELETE /v1/sessions/{session}``        forget a session

Nothing from the network is trusted: bodies are capped while they stream in (413),
malformed bytes get 400/422 with a message, unknown sessions 404, and homomorphic work
runs in a worker thread, never on the event loop. SEAL work is serialised by one lock:
each evaluation already uses every core (see :mod:`she.engine`), and forking worker
processes while another thread is inside SEAL would not be safe.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from . import __version__
from .context import MAX_CONTEXT_BYTES
from .errors import ParameterError, SecurityError, SheError
from .server import EvaluationKeys, Server

API = "/v1"
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


@dataclass
class ServiceConfig:
    """Limits and options of the HTTP service."""

    session_ttl: float = 3600.0  # seconds since last use
    max_sessions: int = 64
    max_body_bytes: int = 1024 * 1024 * 1024
    max_context_bytes: int = 64 * 1024 * 1024
    api_key: str | None = None


@dataclass
class _Session:
    model: str
    keys: EvaluationKeys
    last_used: float
    created: float = field(default_factory=time.time)


class SessionStore:
    """Sessions with a time-to-live (since last use) and a cap."""

    def __init__(self, ttl: float, cap: int, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.cap, self.clock = ttl, cap, clock
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def _expire(self) -> None:
        now = self.clock()
        for sid in [s for s, v in self._sessions.items() if now - v.last_used > self.ttl]:
            del self._sessions[sid]

    def add(self, model: str, keys: EvaluationKeys) -> str:
        with self._lock:
            self._expire()
            if len(self._sessions) >= self.cap:
                raise HTTPException(503, f"session limit of {self.cap} reached; delete a "
                                         "session or retry later")
            sid = secrets.token_urlsafe(24)
            self._sessions[sid] = _Session(model, keys, self.clock())
            return sid

    def get(self, sid: str) -> _Session:
        with self._lock:
            self._expire()
            session = self._sessions.get(sid)
            if session is None:
                raise HTTPException(404, "unknown or expired session; register again")
            session.last_used = self.clock()
            return session

    def delete(self, sid: str) -> None:
        with self._lock:
            if self._sessions.pop(sid, None) is None:
                raise HTTPException(404, "unknown or expired session")

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._sessions)


def _status(exc: SheError) -> int:
    if isinstance(exc, SecurityError):
        return 403
    if isinstance(exc, ParameterError):
        return 422
    return 400


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HTTPException(413, f"request body larger than {limit} bytes")
        except ValueError as exc:
            raise HTTPException(400, "invalid Content-Length") from exc
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    if size == 0:
        raise HTTPException(400, "empty request body")
    return b"".join(chunks)


def create_app(servers: dict[str, Server], config: ServiceConfig | None = None,
               sessions: SessionStore | None = None) -> FastAPI:
    """Build the FastAPI application serving ``servers`` (model name -> Server).

    ``sessions`` replaces the in-memory session store by another with the same methods
    (``add``, ``get``, ``delete``, ``len``), e.g. :class:`she.ray_serve.SharedSessionStore`.
    """
    config = config or ServiceConfig()
    if sessions is None:
        sessions = SessionStore(config.session_ttl, config.max_sessions)
    he_lock = threading.Lock()
    max_request = min(config.max_body_bytes, max(s.max_request_bytes for s in servers.values()))
    app = FastAPI(
        title="SHE encrypted inference",
        version=__version__,
        description="Send CKKS ciphertexts, receive encrypted predictions. The server never "
                    "sees inputs or results, and never receives a secret key. Binary bodies "
                    "use the SHE wire format (docs/http-api.md).",
    )
    app.state.sessions = sessions

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if config.api_key and request.url.path.startswith(API):
            given = request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                return JSONResponse({"detail": "missing or wrong X-API-Key"}, status_code=401)
        return await call_next(request)

    def server_for(model: str) -> Server:
        if model not in servers:
            raise HTTPException(404, f"unknown model {model!r}; GET {API}/models lists them")
        return servers[model]

    def guarded(fn: Callable[..., Any], *args: Any) -> Any:
        with he_lock:
            try:
                return fn(*args)
            except SheError as exc:
                raise HTTPException(_status(exc), str(exc)) from exc

    @app.get(f"{API}/health", summary="Liveness and counts")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "models": len(servers),
                "sessions": len(sessions)}

    @app.get(f"{API}/models", summary="List the models served")
    async def list_models() -> list[dict[str, Any]]:
        return [{"name": name, "scheme": s.plan.scheme, "packing": s.plan.packing,
                 "fingerprint": s.fingerprint} for name, s in servers.items()]

    @app.get(f"{API}/models/{{model}}", summary="A model's public spec",
             description="Everything a client needs: scheme, packing, ring size, modulus "
                         "bits and primes, input shape and scale, number and layout of "
                         "the ciphertexts expected, and how to read the output.")
    async def model_spec(model: str) -> dict[str, Any]:
        server = server_for(model)
        return {**server.spec, "fingerprint": server.fingerprint}

    @app.post(f"{API}/models/{{model}}/sessions", status_code=201,
              summary="Register a session by uploading the public context",
              description="Body: a SHE context message holding TenSEAL's serialised context "
                          "(parameters only), the relinearisation keys and, for single "
                          "packing, the Galois keys (SEAL format). Refused with 403 if it "
                          "carries a secret key, 422 if its parameters differ from the model's.",
              openapi_extra={"requestBody": {"content": _BINARY, "required": True}})
    async def register(model: str, request: Request) -> dict[str, Any]:
        # The body is read before anything can fail: answering early while the client is
        # still sending makes many HTTP clients see a connection reset instead of the answer.
        body = await _read_body(request, min(config.max_context_bytes, MAX_CONTEXT_BYTES))
        server = server_for(model)
        keys = await run_in_threadpool(guarded, server.load_context, body)
        sid = sessions.add(model, keys)
        return {"session": sid, "model": model, "ttl_seconds": config.session_ttl}

    @app.post(f"{API}/sessions/{{session}}/predict",
              summary="Evaluate the model on ciphertexts",
              description="Body: a SHE ciphertext message (one SEAL ciphertext per input "
                          "feature, batch packing). Response: a SHE ciphertext message with "
                          "one ciphertext per output.",
              response_class=Response,
              responses={200: {"content": _BINARY, "description": "encrypted result"}},
              openapi_extra={"requestBody": {"content": _BINARY, "required": True}})
    async def predict(session: str, request: Request) -> Response:
        body = await _read_body(request, max_request)
        entry = sessions.get(session)
        server = servers[entry.model]
        if len(body) > server.max_request_bytes:
            raise HTTPException(413, f"request body larger than {server.max_request_bytes} "
                                     f"bytes, the most model {entry.model!r} can take")
        result = await run_in_threadpool(guarded, server.evaluate, entry.keys, body)
        return Response(result, media_type="application/octet-stream")

    @app.delete(f"{API}/sessions/{{session}}", status_code=204, summary="Delete a session")
    async def delete_session(session: str) -> Response:
        sessions.delete(session)
        return Response(status_code=204)

    return app


def serve(servers: dict[str, Server], host: str, port: int, config: ServiceConfig) -> None:
    """Run the service under uvicorn (blocking)."""
    import uvicorn

    uvicorn.run(create_app(servers, config), host=host, port=port, log_level="info")
