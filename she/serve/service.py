"""The MLaaS HTTP service: a FastAPI app around :class:`she.Server`.

Endpoints (all under ``/v1``; binary bodies are ``application/octet-stream`` in the
:mod:`she.io.wire` format, see ``docs/http-api.md``):

* ``GET  /v1/health``                      liveness, counts, workers and key memory
* ``GET  /v1/models``                      the models served
* ``GET  /v1/models/{model}``              a model's public spec
* ``POST /v1/models/{model}/sessions``     upload a public context, get a session id
* ``POST /v1/sessions/{session}/predict``  ciphertexts in, encrypted result out
* ``DELETE /v1/sessions/{session}``        forget a session

Nothing from the network is trusted. Every ``/v1`` route depends on the API-key check
and the rate limit (a router dependency: no path matching). Sessions and sizes are checked
before a body is read; bodies stream into a spool with a read timeout and are refused
(413) as soon as they pass their cap; malformed bytes get 400/422 with a message, unknown
sessions 404, and no exception ever leaves as a bare 500: anything unexpected is logged
and answered with a JSON error. Homomorphic work runs in a forked process per request
(:mod:`she.serve.workers`), at most ``workers`` at once; beyond that requests queue, boundedly,
and then get 503 with ``Retry-After``. Session keys live in a :class:`SessionStore`
bounded by count and by memory (the least recently used sessions are evicted first).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import IO, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import ParameterError, SecurityError, SheError
from ..io.context import MAX_CONTEXT_BYTES
from ..plan.estimate import physical_memory
from ..server import EvaluationKeys, Server
from .slow_clients import HEADER_TIMEOUT, header_timeout_protocol
from .workers import Busy, WorkerDied, WorkerPool, WorkerTimeout

API = "/v1"
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
#: Bodies up to this size stay in memory while they arrive; larger ones go to a file.
SPOOL_BYTES = 4 * 1024 * 1024
#: Most clients (API keys or addresses) whose request rate is remembered.
#: Default seconds a request body may take to arrive in all (:attr:`ServiceConfig.body_timeout`).
BODY_TIMEOUT = 600.0
RATE_CLIENTS = 4096
log = logging.getLogger("she.serve.service")


def default_key_memory() -> int:
    """Default budget for session keys: a quarter of the machine's memory (1 GiB if it
    cannot be read)."""
    return physical_memory() // 4 or 1 << 30


@dataclass
class ServiceConfig:
    """Limits and options of the HTTP service."""

    session_ttl: float = 3600.0  # seconds since last use
    max_sessions: int = 64
    #: Sessions one API key may hold: registering one more ends that key's least recently
    #: used session, so that no key can take every session slot (0: no such cap). Without
    #: API keys clients have no identity to count by (behind a proxy they share one
    #: address), and only ``max_sessions`` applies.
    max_sessions_per_key: int = 16
    max_body_bytes: int = 1024 * 1024 * 1024
    #: Bytes of request bodies held at once over all requests (arriving, or waiting for a
    #: worker); past it a body gets 503 with Retry-After. Never below the largest body
    #: a route accepts.
    max_pending_body_bytes: int = 4 * 1024 * 1024 * 1024
    max_context_bytes: int = 64 * 1024 * 1024
    #: Accepted X-API-Key values (none: no key needed). A session is bound to its key.
    api_keys: tuple[str, ...] = ()
    #: Memory all sessions' keys may hold (bytes); default :func:`default_key_memory`.
    max_key_memory: int = field(default_factory=default_key_memory)
    workers: int | None = None  # HE processes at once (default: every core)
    queue: int = 64  # requests waiting for a worker
    queue_timeout: float = 120.0  # seconds a request may wait for a worker
    job_timeout: float = 900.0  # seconds a request may compute
    rate_limit: float = 20.0  # requests per second per API key or client address (0: off)
    rate_burst: int = 40
    read_timeout: float = 30.0  # seconds without a byte of the body before 408
    body_timeout: float = BODY_TIMEOUT  # seconds for a whole body before 408
    #: Seconds a client has to send a request's line and headers (uvicorn under
    #: :func:`serve`; :mod:`she.serve.slow_clients`).
    header_timeout: float = HEADER_TIMEOUT


@dataclass
class Session:
    """One client's registered keys."""

    model: str
    keys: EvaluationKeys
    key_bytes: int
    owner: str | None
    last_used: float
    created: float = field(default_factory=time.time)


class UnknownSession(LookupError):
    """No such session (never created, expired, evicted, or another API key's)."""


class StoreFull(Exception):
    """A session cannot be stored: the count or the key memory budget is exhausted."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _context_cap(config: ServiceConfig, server: Server) -> int:
    """Largest public-context upload accepted for ``server``'s model: the configured cap, or
    what this model's keys need if more (seeded keys are smaller than expanded ones), never
    above :data:`she.io.context.MAX_CONTEXT_BYTES`."""
    return min(max(config.max_context_bytes, server.session_key_bytes), MAX_CONTEXT_BYTES)


def check_key_budget(key_bytes: int, max_key_bytes: int) -> None:
    """Raise :class:`StoreFull` (507) if one session's keys exceed the key memory budget."""
    if key_bytes > max_key_bytes:
        raise StoreFull(f"one session's keys take {key_bytes / 2**20:.1f} MiB, more than "
                        f"the server's key memory budget of {max_key_bytes / 2**20:.1f} MiB", 507)


class SessionStore:
    """Sessions with a time-to-live (since last use), a count cap, a cap per owner and a
    key-memory budget.

    :meth:`put` first ends the owner's own least recently used sessions while it holds
    ``per_owner`` of them (0, or no owner: no such cap), then evicts the least recently
    used sessions until the new one's keys fit the budget; a session whose keys alone
    exceed it, or one past the count cap (which evicts nothing: expiry only), raises
    :class:`StoreFull`. A session id is 192 random bits and
    answers only to the API key that created it. Another store (for example a shared one
    for several replicas) can replace this one: the service uses only these methods.
    """

    def __init__(self, ttl: float, cap: int, max_key_bytes: int,
                 clock: Callable[[], float] = time.monotonic, per_owner: int = 0) -> None:
        self.ttl, self.cap, self.max_key_bytes, self.clock = ttl, cap, max_key_bytes, clock
        self.per_owner = per_owner
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.key_bytes = 0
        self.evicted = 0

    def _expire(self) -> None:
        now = self.clock()
        for sid in [s for s, v in self._sessions.items() if now - v.last_used > self.ttl]:
            self._drop(sid)

    def _drop(self, sid: str) -> None:
        self.key_bytes -= self._sessions.pop(sid).key_bytes

    def check_fits(self, key_bytes: int) -> None:
        """Raise :class:`StoreFull` if keys of ``key_bytes`` can never be stored."""
        check_key_budget(key_bytes, self.max_key_bytes)

    def put(self, model: str, keys: EvaluationKeys, key_bytes: int, owner: str | None) -> str:
        self.check_fits(key_bytes)
        with self._lock:
            self._expire()
            if self.per_owner and owner is not None:
                mine = [sid for sid, s in self._sessions.items() if s.owner == owner]
                for sid in mine[:max(0, len(mine) - self.per_owner + 1)]:
                    self._drop(sid)  # least recently used first
                    self.evicted += 1
            if len(self._sessions) >= self.cap:
                raise StoreFull(f"session limit of {self.cap} reached; delete a session or "
                                "retry later", 503)
            while self.key_bytes + key_bytes > self.max_key_bytes:
                self._drop(next(iter(self._sessions)))
                self.evicted += 1
            sid = secrets.token_urlsafe(24)
            self._sessions[sid] = Session(model, keys, key_bytes, owner, self.clock())
            self.key_bytes += key_bytes
            return sid

    def get(self, sid: str, owner: str | None) -> Session:
        with self._lock:
            self._expire()
            session = self._sessions.get(sid)
            if session is None or session.owner != owner:
                raise UnknownSession(sid)
            session.last_used = self.clock()
            self._sessions.move_to_end(sid)
            return session

    def delete(self, sid: str, owner: str | None) -> None:
        with self._lock:
            session = self._sessions.get(sid)
            if session is None or session.owner != owner:
                raise UnknownSession(sid)
            self._drop(sid)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._sessions)


class RateLimiter:
    """A token bucket per client: ``rate`` requests per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, max(1, burst), clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def retry_after(self, client: str) -> float:
        """0 if ``client`` may make a request now (and count it), else seconds to wait."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, then = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self._buckets) > RATE_CLIENTS:
            self._buckets.popitem(last=False)
        return wait


class ApiKeys:
    """The accepted ``X-API-Key`` values, each with the owner its sessions are bound to
    (a hash of the key)."""

    def __init__(self, api_keys: tuple[str, ...]) -> None:
        self._keys = [(hashlib.sha256(k.encode()).digest(),
                       hashlib.sha256(k.encode()).hexdigest()[:16]) for k in api_keys]

    def owner(self, given: str) -> str | None:
        """The owner of the key ``given`` (None when no key is needed); 401 if it is not
        accepted."""
        if not self._keys:
            return None
        # digests of equal length, compared with every key: the time taken says neither
        # which key matched nor how long the accepted keys are
        digest = hashlib.sha256(given.encode()).digest()
        matches = [owner for key, owner in self._keys if hmac.compare_digest(digest, key)]
        if not matches:
            raise HTTPException(401, "missing or wrong X-API-Key")
        return matches[0]


def _too_many(rate: float, wait: float) -> HTTPException:
    return HTTPException(429, f"more than {rate:g} requests per second",
                         headers={"Retry-After": str(max(1, round(wait + 0.5)))})


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def authenticate(keys: ApiKeys, limiter: RateLimiter, request: Request) -> str | None:
    """The owner of the request's ``X-API-Key`` (:meth:`ApiKeys.owner`): 401 if the key is
    not accepted, 429 instead once the client's address has sent more wrong keys than the
    rate limit allows (so that keys cannot be guessed at network speed)."""
    try:
        return keys.owner(request.headers.get("x-api-key", ""))
    except HTTPException:
        wait = limiter.retry_after(_address(request))
        if wait:
            raise _too_many(limiter.rate, wait) from None
        raise


def _status(exc: SheError) -> int:
    if isinstance(exc, SecurityError):
        return 403
    if isinstance(exc, ParameterError):
        return 422
    return 400


def _unavailable(detail: str, retry_after: int) -> HTTPException:
    return HTTPException(503, detail, headers={"Retry-After": str(retry_after)})


class BodyBudget:
    """Bytes of request bodies held at once over all requests (in their spools, memory or
    temporary files, until the request ends): past ``limit`` a body is refused with 503
    and ``Retry-After``, so that many concurrent uploads cannot fill the server's memory
    or disk. Used from the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise _unavailable(f"the server already holds {self.used} bytes of request "
                               "bodies, its limit; retry later", 5)
        self.used += size


class _Spool(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
    """A body's spool, whose bytes count in a :class:`BodyBudget` until it is closed."""

    def __init__(self, budget: BodyBudget | None) -> None:
        super().__init__(max_size=SPOOL_BYTES)
        self._budget, self._held = budget, 0

    def hold(self, size: int) -> None:
        if self._budget is not None:
            self._budget.take(size)
            self._held += size

    def close(self) -> None:
        if self._budget is not None:
            self._budget.used -= self._held
            self._held = 0
        super().close()


async def _body_chunks(request: Request, read_timeout: float,
                       body_timeout: float) -> AsyncIterator[bytes]:
    """The chunks of the request body; 408 after ``read_timeout`` seconds without data or
    ``body_timeout`` seconds for the whole body (a client trickling a byte now and then
    would otherwise hold the request, and its connection, for ever)."""
    deadline = time.monotonic() + body_timeout
    chunks = request.stream().__aiter__()
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(chunks.__anext__(), min(read_timeout, left))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            if left <= read_timeout:
                raise HTTPException(408, f"request body not received within {body_timeout:g} s "
                                         "(too slow)") from None
            raise HTTPException(408, f"no request data for {read_timeout:g} s") from None
        yield chunk


async def _spool_body(request: Request, limit: int, read_timeout: float,
                      body_timeout: float = BODY_TIMEOUT,
                      budget: BodyBudget | None = None) -> IO[bytes]:
    """The request body in a spool (memory, then a temporary file), refused with 413 as
    soon as it passes ``limit`` bytes, with 408 after ``read_timeout`` seconds without
    data or ``body_timeout`` seconds in all, and with 503 when it does not fit ``budget``
    (its bytes count there until the spool is closed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise HTTPException(400, "invalid Content-Length") from exc
        if size > limit:
            raise HTTPException(413, f"request body larger than {limit} bytes")
    spool = _Spool(budget)
    try:
        size = 0
        async for chunk in _body_chunks(request, read_timeout, body_timeout):
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body larger than {limit} bytes")
            spool.hold(len(chunk))
            spool.write(chunk)
        if size == 0:
            raise HTTPException(400, "empty request body")
        spool.seek(0)
        return spool
    except BaseException:
        spool.close()
        raise


async def _drain(request: Request, limit: int, read_timeout: float,
                 body_timeout: float = BODY_TIMEOUT) -> None:
    """Read and discard up to ``limit`` bytes of the body, so that an early answer reaches
    a client that is still sending instead of a connection reset (nothing is read when
    ``Content-Length`` announces more, or is not a number; reading stops at the timeouts
    of :func:`_body_chunks`)."""
    try:
        if int(request.headers.get("content-length", "0")) > limit:
            return
    except ValueError:
        return
    size = 0
    try:
        async for chunk in _body_chunks(request, read_timeout, body_timeout):
            size += len(chunk)
            if size > limit:
                return
    except HTTPException:
        return


def create_app(servers: dict[str, Server], config: ServiceConfig | None = None,
               sessions: SessionStore | None = None) -> FastAPI:
    """Build the FastAPI application serving ``servers`` (model name -> Server).

    ``sessions`` replaces the in-memory :class:`SessionStore` by another with the same
    methods and attributes, e.g. :class:`she.serve.ray_serve.SharedSessionStore`.
    """
    config = config or ServiceConfig()
    if sessions is None:
        sessions = SessionStore(config.session_ttl, config.max_sessions, config.max_key_memory,
                                per_owner=config.max_sessions_per_key)
    pool = WorkerPool(config.workers, queue=config.queue, queue_timeout=config.queue_timeout,
                      job_timeout=config.job_timeout)
    limiter = RateLimiter(config.rate_limit, config.rate_burst)
    for server in servers.values():
        server.prepare()
    max_request = min(config.max_body_bytes, max(s.max_request_bytes for s in servers.values()))
    app = FastAPI(
        title="SHE encrypted inference",
        version=__version__,
        description="Send CKKS ciphertexts, receive encrypted predictions. The server never "
                    "sees inputs or results, and never receives a secret key. Binary bodies "
                    "use the SHE wire format (docs/http-api.md).",
    )
    app.state.sessions, app.state.pool = sessions, pool
    #: The largest body any route accepts (a front that buffers bodies reads no more).
    app.state.max_body_bytes = max(max_request,
                                   max(_context_cap(config, s) for s in servers.values()))
    bodies = app.state.bodies = BodyBudget(max(config.max_pending_body_bytes,
                                               app.state.max_body_bytes))
    keys = ApiKeys(config.api_keys)

    async def caller(request: Request) -> str | None:
        """The API-key check (a router dependency) and the rate limit; returns the owner
        of the sessions this caller may use (a hash of its key; None without keys)."""
        owner = authenticate(keys, limiter, request)
        wait = limiter.retry_after(owner or _address(request))
        if wait:
            raise _too_many(config.rate_limit, wait)
        return owner

    router = APIRouter(prefix=API, dependencies=[Depends(caller)])

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        reference = secrets.token_hex(4)
        log.error("unexpected error %s on %s %s", reference, request.method,
                  request.scope.get("path"), exc_info=exc)
        return JSONResponse({"detail": f"internal error (reference {reference}, in the "
                                       "server log)"}, status_code=500)

    def server_for(model: str) -> Server:
        if model not in servers:
            raise HTTPException(404, f"unknown model {model!r}; GET {API}/models lists them")
        return servers[model]

    def load_keys(server: Server, body: IO[bytes]) -> EvaluationKeys:
        with pool.seal_lock:  # no fork while this process is inside SEAL
            try:
                return server.load_context(body.read())
            except SheError as exc:
                raise HTTPException(_status(exc), str(exc)) from exc

    @router.get("/health", summary="Liveness, counts, workers and key memory")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "models": len(servers),
                "sessions": len(sessions), "key_memory_bytes": sessions.key_bytes,
                "max_key_memory_bytes": sessions.max_key_bytes,
                "evicted_sessions": sessions.evicted, "pending_body_bytes": bodies.used,
                **pool.stats()}

    @router.get("/models", summary="List the models served")
    async def list_models() -> list[dict[str, Any]]:
        return [{"name": name, "scheme": s.plan.scheme, "packing": s.plan.packing,
                 "fingerprint": s.fingerprint} for name, s in servers.items()]

    @router.get("/models/{model}", summary="A model's public spec",
                description="Everything a client needs: scheme, packing, ring size, modulus "
                            "bits and primes, input shape and scale, number and layout of the "
                            "ciphertexts expected, how to read the output, what one session's "
                            "keys cost the server, and the privacy of the results.")
    async def model_spec(model: str) -> dict[str, Any]:
        server = server_for(model)
        return {**server.spec, "fingerprint": server.fingerprint}

    @router.post("/models/{model}/sessions", status_code=201,
                 summary="Register a session by uploading the public context",
                 description="Body: a SHE context message holding TenSEAL's serialised context "
                             "(parameters only), the relinearisation keys, for single packing "
                             "the Galois keys, and a public key (SEAL format). Refused with "
                             "403 if it carries a secret key, 422 if its parameters differ "
                             "from the model's, 507 if one session's keys exceed the key "
                             "memory budget.",
                 openapi_extra={"requestBody": {"content": _BINARY, "required": True}})
    async def register(model: str, request: Request,
                       owner: str | None = Depends(caller)) -> dict[str, Any]:
        server = server_for(model)
        try:
            sessions.check_fits(server.session_key_bytes)
        except StoreFull as exc:
            raise HTTPException(exc.status, str(exc)) from None
        body = await _spool_body(request, _context_cap(config, server), config.read_timeout,
                                 config.body_timeout, bodies)
        try:
            keys = await run_in_threadpool(load_keys, server, body)
        finally:
            body.close()
        try:
            sid = sessions.put(model, keys, server.session_key_bytes, owner)
        except StoreFull as exc:
            headers = {"Retry-After": "60"} if exc.status == 503 else None
            raise HTTPException(exc.status, str(exc), headers=headers) from None
        return {"session": sid, "model": model, "ttl_seconds": config.session_ttl,
                "key_bytes": server.session_key_bytes}

    @router.post("/sessions/{session}/predict",
                 summary="Evaluate the model on ciphertexts",
                 description="Body: a SHE ciphertext message (batch packing: one SEAL "
                             "ciphertext per input feature; single packing: one compact "
                             "ciphertext). Response: a SHE ciphertext message with the "
                             "re-randomised results. 503 with Retry-After when every worker "
                             "is busy and the queue is full, or when the worker failed.",
                 response_class=Response,
                 responses={200: {"content": _BINARY, "description": "encrypted result"}},
                 openapi_extra={"requestBody": {"content": _BINARY, "required": True}})
    async def predict(session: str, request: Request,
                      owner: str | None = Depends(caller)) -> Response:
        try:
            entry = sessions.get(session, owner)
        except UnknownSession:
            await _drain(request, max_request, config.read_timeout, config.body_timeout)
            raise HTTPException(404, "unknown or expired session; register again") from None
        server = servers[entry.model]
        limit = min(max_request, server.max_request_bytes)
        body = await _spool_body(request, limit, config.read_timeout, config.body_timeout,
                                 bodies)

        def job(processes: int) -> bytes:  # runs in the forked worker
            server.use_processes(processes)
            return server.evaluate(entry.keys, body.read())

        try:
            result = await pool.run(job)
        except Busy as exc:
            raise _unavailable(str(exc), exc.retry_after) from None
        except (WorkerDied, WorkerTimeout) as exc:
            log.warning("predict on %s failed: %s", entry.model, exc)
            raise _unavailable(f"{exc}; the request was not completed, retry it", 1) from None
        except SheError as exc:
            raise HTTPException(_status(exc), str(exc)) from None
        finally:
            body.close()
        return Response(result, media_type="application/octet-stream")

    @router.delete("/sessions/{session}", status_code=204, summary="Delete a session")
    async def delete_session(session: str, owner: str | None = Depends(caller)) -> Response:
        try:
            sessions.delete(session, owner)
        except UnknownSession:
            raise HTTPException(404, "unknown or expired session") from None
        return Response(status_code=204)

    app.include_router(router)
    return app


def serve(servers: dict[str, Server], host: str, port: int, config: ServiceConfig, *,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
          max_connections: int = 256) -> None:
    """Run the service under uvicorn (blocking); HTTPS with a certificate and key file.
    Beyond ``max_connections`` open connections uvicorn answers 503; idle keep-alive
    connections close after 5 s, and a connection whose request headers take longer than
    ``config.header_timeout`` seconds is closed (:mod:`she.serve.slow_clients`)."""
    import uvicorn

    uvicorn.run(create_app(servers, config), host=host, port=port, log_level="info",
                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                limit_concurrency=max_connections, timeout_keep_alive=5,
                http=header_timeout_protocol(config.header_timeout))
