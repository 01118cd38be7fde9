"""``she serve --ray``: the HTTP service as a Ray Serve application with K replicas.

Every HE replica (:class:`Replica`) runs the very app of :mod:`she.serve.service`
(:func:`she.serve.service.create_app`: same paths, wire format, errors and ``X-API-Key``) around
its own copy of the compiled plans, with one :class:`she.Server` per model using the
replica's one CPU. Ray Serve's proxy hands every request to a :class:`Front` (no CPU, on
the head node), which passes it whole to a replica through a Serve handle; Serve spreads
them across the replicas and replaces a replica that dies. The front is there for that
death: Ray Serve's proxy would answer a bare 500 for the requests inside a dead replica,
while the front sends them again to another replica when that is safe (reads and
predictions) and otherwise answers a retryable 503 in the service's JSON format.

Sessions live in one shared place, so that any replica can answer any session and a
restarted replica still knows them: a named, detached Ray actor (:class:`SessionTable`)
holding each session's model and public context message (the bytes the client uploaded:
public parameters and evaluation keys, never a secret key), with the service's time-to-live
and cap. A replica checks every request's session there and keeps the keys it has loaded
in a small local cache; a session it has not seen yet is loaded from the table's bytes.
A session answers only to the API key that made it (the table keeps its owner); the
key-memory budget applies to each replica's cache (see :class:`SharedSessionStore`).

Each replica runs the service's HE work as the plain service does, in a process forked per
request (:mod:`she.serve.workers`), with a budget of one process (``workers=1``: the replica's
one CPU). Forking a Ray worker, which has threads of its own (gRPC, the core worker), is
safe here because the child never touches Ray or those threads' state: it only evaluates
with SEAL on memory it shares copy-on-write, writes the result into a pipe and leaves with
``os._exit`` (no atexit handlers, no Ray shutdown); glibc's malloc and CPython reset their
own locks in the child, and SEAL's are covered by the pool's ``seal_lock``, which this
module's store also holds while it loads keys. A child that dies costs only its request
(503, retryable), as in the plain service, and the replica itself is untouched.

Ray is imported lazily; without the ``she[ray]`` extra the rest of SHE works as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..plan.compiler import Plan
from ..server import EvaluationKeys, Server
from .ray_batch import ray_connection, require_ray
from .service import (
    API,
    ApiKeys,
    BodyBudget,
    RateLimiter,
    ServiceConfig,
    Session,
    StoreFull,
    UnknownSession,
    _spool_body,
    authenticate,
    check_key_budget,
)

#: Ray namespace of the session table.
NAMESPACE = "she"
#: Application name in Ray Serve (and suffix of its session table's name).
APP_NAME = "she"
#: Ray's resource of the head node (where Ray Serve's proxy runs with ``HeadOnly``).
HEAD_NODE = "node:__internal_head__"
log = logging.getLogger("she.serve.ray_serve")


class SessionTable:
    """Ray actor: every session's model, public context message, owner (the hash of the API
    key that made it) and key size, with a time-to-live since last use, a cap and a cap
    per owner (the service's :class:`~she.serve.service.ServiceConfig`: past the latter an
    owner's least recently used session ends)."""

    def __init__(self, ttl: float, cap: int, per_owner: int = 0) -> None:
        self.ttl, self.cap, self.per_owner = ttl, cap, per_owner
        # id -> [model, message, owner, key bytes, last used]
        self._sessions: dict[str, list[Any]] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if now - v[4] > self.ttl]:
            del self._sessions[sid]

    def add(self, model: str, message: bytes, owner: str | None, key_bytes: int) -> str | None:
        """Store a session; its id, or None when the cap is reached."""
        self._expire()
        if self.per_owner and owner is not None:
            mine = sorted((v[4], s) for s, v in self._sessions.items() if v[2] == owner)
            for _, sid in mine[:max(0, len(mine) - self.per_owner + 1)]:
                del self._sessions[sid]  # least recently used first
        if len(self._sessions) >= self.cap:
            return None
        sid = secrets.token_urlsafe(24)
        self._sessions[sid] = [model, message, owner, key_bytes, time.monotonic()]
        return sid

    def touch(self, sid: str, owner: str | None,
              with_message: bool) -> tuple[str, bytes | None, int] | None:
        """Mark a session used; its model, message (if asked) and key size, or None if it
        is unknown or belongs to another owner."""
        self._expire()
        entry = self._sessions.get(sid)
        if entry is None or entry[2] != owner:
            return None
        entry[4] = time.monotonic()
        return entry[0], entry[1] if with_message else None, entry[3]

    def delete(self, sid: str, owner: str | None) -> bool:
        entry = self._sessions.get(sid)
        if entry is None or entry[2] != owner:
            return False
        del self._sessions[sid]
        return True

    def count(self) -> int:
        self._expire()
        return len(self._sessions)


@dataclass
class _RegisteredKeys(EvaluationKeys):
    """Loaded evaluation keys and, until the session table has it, the message they came in."""

    message: bytes = field(default=b"", repr=False)


class _ReplicaServer(Server):
    """A :class:`Server` whose loaded keys keep the message they were loaded from, so that
    the session store can hand it to the shared table (the service's register endpoint
    passes the store only the loaded keys)."""

    def load_context(self, data: bytes) -> _RegisteredKeys:
        keys = super().load_context(data)
        return _RegisteredKeys(**{f.name: getattr(keys, f.name) for f in fields(keys)},
                               message=data)


class SharedSessionStore:
    """The service's session store (the interface of :class:`she.serve.service.SessionStore`)
    backed by the shared :class:`SessionTable`, with a local cache of loaded keys.

    The table decides whether a session exists: its time-to-live, the count cap (past it,
    :class:`~she.serve.service.StoreFull` with 503) and the owner binding (a session answers only
    to the API key that made it, else :class:`~she.serve.service.UnknownSession`). The key-memory
    budget ``max_key_bytes`` applies to each replica's cache of loaded keys: a replica
    evicts its least recently used keys to make room, and ``evicted`` counts those, but
    the session itself stays in the table and is loaded again from its message when next
    used. So ``key_bytes`` in ``/v1/health`` is the replica that answered's cache, and the
    table holds at most ``cap`` messages of at most ``max_context_bytes`` each. Keys that
    alone exceed the budget are refused (507) as by the local store.
    """

    def __init__(self, table: Any, servers: dict[str, Server], config: ServiceConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ray = require_ray()
        self._table, self._servers, self.clock = table, servers, clock
        self.ttl, self.cap, self.max_key_bytes = (config.session_ttl, config.max_sessions,
                                                  config.max_key_memory)
        self._cache: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        #: Held while this process loads keys (SEAL work): the app's
        #: :attr:`she.serve.workers.WorkerPool.seal_lock`, so that no fork copies SEAL mid-call.
        self.seal_lock = threading.Lock()
        self.key_bytes = 0
        self.evicted = 0

    def _drop(self, sid: str) -> None:  # under self._lock
        session = self._cache.pop(sid, None)
        if session is not None:
            self.key_bytes -= session.key_bytes

    def _remember(self, sid: str, session: Session) -> None:
        with self._lock:
            self._drop(sid)
            now = self.clock()
            for old in [s for s, v in self._cache.items() if now - v.last_used > self.ttl]:
                self._drop(old)  # expired here; the table is the judge if it comes back
            while self._cache and (len(self._cache) >= self.cap
                                   or self.key_bytes + session.key_bytes > self.max_key_bytes):
                self._drop(next(iter(self._cache)))
                self.evicted += 1
            self._cache[sid] = session
            self.key_bytes += session.key_bytes

    def check_fits(self, key_bytes: int) -> None:
        """Raise :class:`StoreFull` if keys of ``key_bytes`` can never be stored."""
        check_key_budget(key_bytes, self.max_key_bytes)

    def put(self, model: str, keys: EvaluationKeys, key_bytes: int, owner: str | None) -> str:
        self.check_fits(key_bytes)
        message = keys.message if isinstance(keys, _RegisteredKeys) else b""
        if not message:
            raise TypeError("shared sessions need keys loaded by a replica's server")
        sid = self._ray.get(self._table.add.remote(model, message, owner, key_bytes))
        if sid is None:
            raise StoreFull(f"session limit of {self.cap} reached; delete a session or "
                            "retry later", 503)
        keys.message = b""  # the table has it; the cache keeps only the loaded keys
        self._remember(sid, Session(model, keys, key_bytes, owner, self.clock()))
        return sid

    def get(self, sid: str, owner: str | None) -> Session:
        with self._lock:
            cached = self._cache.get(sid)
        found = self._ray.get(self._table.touch.remote(sid, owner, cached is None))
        if found is None:
            with self._lock:
                self._drop(sid)
            raise UnknownSession(sid)
        if cached is not None and cached.owner == owner:
            with self._lock:
                cached.last_used = self.clock()
                if sid in self._cache:
                    self._cache.move_to_end(sid)
            return cached
        model, message, key_bytes = found
        if message is None:  # dropped from the cache meanwhile: ask again for the message
            found = self._ray.get(self._table.touch.remote(sid, owner, True))
            if found is None:
                raise UnknownSession(sid)
            model, message, key_bytes = found
        with self.seal_lock:  # checked again, as on upload
            keys = self._servers[model].load_context(message)
        keys.message = b""
        session = Session(model, keys, key_bytes, owner, self.clock())
        self._remember(sid, session)
        return session

    def delete(self, sid: str, owner: str | None) -> None:
        if not self._ray.get(self._table.delete.remote(sid, owner)):
            raise UnknownSession(sid)
        with self._lock:
            self._drop(sid)

    def __len__(self) -> int:
        return int(self._ray.get(self._table.count.remote()))


def session_table(config: ServiceConfig, name: str = APP_NAME) -> Any:
    """The application's session table actor, created if needed (detached: it outlives
    replicas and this driver until :func:`stop` or the cluster ends)."""
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()  # beside the driver, if it can
    return ray.remote(num_cpus=0, max_restarts=-1)(SessionTable).options(
        name=f"sessions-{name}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
    ).remote(config.session_ttl, config.max_sessions, config.max_sessions_per_key)


#: The path of the evaluation route (``POST /v1/sessions/{session}/predict``): a pure
#: function of the ciphertexts and the session's keys, so the front may send it again.
_PREDICT = re.compile(rf"^{re.escape(API)}/sessions/[^/]+/predict$")
#: Attempts of a request whose replica died (or became unreachable) while it ran it.
FRONT_ATTEMPTS = 3
#: Requests the front passes on at once, per HE replica.
FRONT_REQUESTS_PER_REPLICA = 8


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the front received it, whole: what an HE replica's app needs."""

    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    client: tuple[str, int] | None
    body: bytes


@dataclass(frozen=True)
class ForwardedResponse:
    """The app's whole answer to a :class:`ForwardedRequest`."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def call_app(app: Any, request: ForwardedRequest) -> ForwardedResponse:
    """Run one request through an ASGI ``app`` in this process and collect its answer."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": request.method, "scheme": "http",
             "path": request.path, "raw_path": request.raw_path,
             "query_string": request.query_string, "root_path": "",
             "headers": request.headers, "client": request.client, "server": None}
    sent, answered = False, asyncio.Event()
    status, headers, body = 500, [], bytearray()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await answered.wait()  # the client stays connected until the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    try:
        await app(scope, receive, send)
    finally:
        answered.set()
    return ForwardedResponse(status, headers, bytes(body))


def _json_error(status: int, detail: str, retry_after: int | None = None) -> Any:
    """An error in the service's JSON format (``{"detail": ...}``)."""
    from starlette.responses import JSONResponse

    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class Front:
    """The application's HTTP ingress: passes each request whole to an HE replica through
    a Ray Serve handle, so that a replica's death is this front's to answer rather than
    Ray Serve's proxy's (which answers a bare 500 for requests inside a dead replica).

    A request whose replica died or became unreachable while it ran it is sent again,
    to another replica (Ray Serve's router stops choosing a dead one), when sending it
    again is safe: reads, and evaluations, which are a pure function of the ciphertexts
    and the session's keys. Anything else, or a request that failed
    :data:`FRONT_ATTEMPTS` times, is answered 503 with ``Retry-After`` in the service's
    JSON error format: the client may send it again. The front holds no state but
    counters. Before it reads a body, it checks the API key (401) and ``Content-Length``
    against the largest body the replicas accept (413), and it reads no more than that:
    the checks the service makes before reading a body. (These only spare reading bodies
    that would be refused: the replicas' app makes every access decision.) Bodies count
    in a :class:`~she.serve.service.BodyBudget` of ``max_pending_body_bytes`` until their
    answer is back (503 past it), and wrong API keys in the rate limit of their address."""

    def __init__(self, replicas: Any, config: ServiceConfig) -> None:
        self._replicas = replicas
        self._keys = ApiKeys(config.api_keys)
        #: Counts requests with a wrong API key per address (the replicas count the rest).
        self._wrong_keys = RateLimiter(config.rate_limit, config.rate_burst)
        self._read_timeout, self._body_timeout = config.read_timeout, config.body_timeout
        self._max_body: int | None = None
        self._max_pending = config.max_pending_body_bytes
        #: Bodies held until their answer comes (created with ``_max_body``).
        self._bodies: BodyBudget | None = None
        #: Requests sent again after their replica died, and requests answered 503.
        self.retried = self.unavailable = 0

    def stats(self) -> dict[str, int]:
        return {"retried": self.retried, "unavailable": self.unavailable}

    async def _call(self, method: str, *args: Any, retry: bool) -> Any:
        """``method`` on an HE replica; the retryable failures per the class text raise
        :class:`_Unavailable`."""
        from ray.exceptions import RayActorError, RayTaskError
        from ray.serve.exceptions import (
            BackPressureError,
            DeploymentUnavailableError,
            ReplicaUnavailableError,
        )

        for attempt in range(1, FRONT_ATTEMPTS + 1):
            try:
                return await getattr(self._replicas, method).remote(*args)
            except BackPressureError as exc:
                raise _Unavailable(f"every replica is busy; retry later ({exc.message})",
                                   max(1, round(exc.retry_after_s or 1))) from None
            except DeploymentUnavailableError as exc:
                raise _Unavailable(f"no replica is available; retry later ({exc.message})",
                                   5) from None
            except (RayActorError, ReplicaUnavailableError, RayTaskError) as exc:
                if isinstance(exc, RayTaskError) and not isinstance(
                        exc.cause, RayActorError | ReplicaUnavailableError):
                    raise
                if not retry or attempt == FRONT_ATTEMPTS:
                    raise _Unavailable("the replica running this request stopped before "
                                       "it answered; the request was not completed, retry "
                                       "it", 1) from None
                self.retried += 1
                log.warning("replica lost a request (%s); sending it again",
                            type(exc).__name__)
        raise AssertionError("unreachable")

    async def __call__(self, request: Any) -> Any:
        from fastapi import HTTPException
        from starlette.responses import Response

        method, scope = request.method, request.scope
        retry = method in ("GET", "HEAD") or (method == "POST"
                                               and bool(_PREDICT.match(scope["path"])))
        spool = None
        try:
            body = b""  # no other method of the service reads a body
            if method == "POST":  # whatever the path: no path matching decides this
                authenticate(self._keys, self._wrong_keys, request)
                if self._max_body is None:
                    self._max_body = await self._call("max_body_bytes", retry=True)
                    self._bodies = BodyBudget(max(self._max_pending, self._max_body))
                # the body counts in the budget until its answer is back
                spool = await _spool_body(request, self._max_body, self._read_timeout,
                                          self._body_timeout, self._bodies)
                body = spool.read()
            forwarded = ForwardedRequest(method, scope["path"], scope.get("raw_path") or b"",
                                         scope.get("query_string", b""),
                                         list(scope.get("headers", [])),
                                         tuple(scope["client"]) if scope.get("client") else None,
                                         body)
            answer = await self._call("forward", forwarded, retry=retry)
        except HTTPException as exc:
            return _json_error(exc.status_code, str(exc.detail))
        except _Unavailable as exc:
            self.unavailable += 1
            return _json_error(503, str(exc), exc.retry_after)
        except Exception as exc:
            reference = secrets.token_hex(4)
            log.error("unexpected error %s on %s %s", reference, method, scope.get("path"),
                      exc_info=exc)
            return _json_error(500, f"internal error (reference {reference}, in the "
                                    "server log)")
        finally:
            if spool is not None:
                spool.close()
        response = Response(answer.body, status_code=answer.status)
        response.raw_headers = answer.headers
        return response


class _Unavailable(Exception):
    """A request the front answers 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Replica:
    """One HE replica: its own servers (one CPU each) around the shared session table,
    running the service's app on the requests the :class:`Front` passes it."""

    def __init__(self, plans: list[Plan], config: ServiceConfig, table: Any) -> None:
        from .service import create_app

        servers: dict[str, Server] = {p.model_name: _ReplicaServer(p, workers=1)
                                      for p in plans}
        sessions = SharedSessionStore(table, servers, config)
        # One CPU per replica: one forked worker process at a time (see the module text).
        self._app = create_app(servers, replace(config, workers=1), sessions=sessions)
        sessions.seal_lock = self._app.state.pool.seal_lock

    def max_body_bytes(self) -> int:
        return int(self._app.state.max_body_bytes)

    async def forward(self, request: ForwardedRequest) -> ForwardedResponse:
        return await call_app(self._app, request)


def build_app(plans: list[Plan], config: ServiceConfig, *, replicas: int,
              name: str = APP_NAME) -> Any:
    """The Ray Serve application: a :class:`Front` (no CPU, on the head node, beside Ray
    Serve's proxy) before ``replicas`` :class:`Replica` deployments of one CPU each."""
    require_ray()
    from ray import serve

    table = session_table(config, name)
    replica = serve.deployment(name="SheService", num_replicas=replicas,
                               ray_actor_options={"num_cpus": 1})(Replica)
    front = serve.deployment(
        name="SheFront", num_replicas=1,
        max_ongoing_requests=FRONT_REQUESTS_PER_REPLICA * replicas,
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE: 0.001}})(Front)
    return front.bind(replica.bind(plans, config, table), config)


def start(plans: list[Plan], config: ServiceConfig, *, host: str, port: int, replicas: int,
          name: str = APP_NAME) -> None:
    """Deploy the application on the connected Ray cluster, listening on ``host:port``;
    returns once every replica is up."""
    require_ray()
    from ray import serve

    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    serve.run(build_app(plans, config, replicas=replicas, name=name), name=name,
              route_prefix="/", blocking=False)


def stop(name: str = APP_NAME) -> None:
    """Delete the application and its session table from the connected cluster."""
    ray = require_ray()
    from ray import serve

    serve.delete(name)
    with contextlib.suppress(ValueError):  # already gone
        ray.kill(ray.get_actor(f"sessions-{name}", namespace=NAMESPACE))


def serve_forever(plans: list[Plan], config: ServiceConfig, *, host: str, port: int,
                  replicas: int, address: str | None) -> None:
    """``she serve --ray``: deploy, block until interrupted (Ctrl-C or SIGTERM), then
    delete the application (and stop the embedded Ray instance, if one was started)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with ray_connection(address or None, num_cpus=max(os.cpu_count() or 1, replicas)):
        start(plans, config, host=host, port=port, replicas=replicas)
        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            stop()
