"""``she serve --ray``: the HTTP service as a Ray Serve application with K replicas.

Every replica runs the very app of :mod:`she.service` (:func:`she.service.create_app`:
same paths, wire format, errors and ``X-API-Key``) around its own copy of the compiled
plans, with one :class:`she.Server` per model using the replica's one CPU. Ray Serve's
proxy spreads requests across the replicas and replaces a replica that dies.

Sessions live in one shared place, so that any replica can answer any session and a
restarted replica still knows them: a named, detached Ray actor (:class:`SessionTable`)
holding each session's model and public context message (the bytes the client uploaded:
public parameters and evaluation keys, never a secret key), with the service's time-to-live
and cap. A replica checks every request's session there and keeps the keys it has loaded
in a small local cache; a session it has not seen yet is loaded from the table's bytes.
A session answers only to the API key that made it (the table keeps its owner); the
key-memory budget applies to each replica's cache (see :class:`SharedSessionStore`).

Each replica runs the service's HE work as the plain service does, in a process forked per
request (:mod:`she.workers`), with a budget of one process (``workers=1``: the replica's
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

import contextlib
import os
import secrets
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .compiler import Plan
from .ray_batch import ray_connection, require_ray
from .server import EvaluationKeys, Server
from .service import ServiceConfig, Session, StoreFull, UnknownSession, check_key_budget

#: Ray namespace of the session table.
NAMESPACE = "she"
#: Application name in Ray Serve (and suffix of its session table's name).
APP_NAME = "she"


class SessionTable:
    """Ray actor: every session's model, public context message, owner (the hash of the API
    key that made it) and key size, with a time-to-live since last use and a cap (the
    service's :class:`~she.service.ServiceConfig`)."""

    def __init__(self, ttl: float, cap: int) -> None:
        self.ttl, self.cap = ttl, cap
        # id -> [model, message, owner, key bytes, last used]
        self._sessions: dict[str, list[Any]] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if now - v[4] > self.ttl]:
            del self._sessions[sid]

    def add(self, model: str, message: bytes, owner: str | None, key_bytes: int) -> str | None:
        """Store a session; its id, or None when the cap is reached."""
        self._expire()
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
    """The service's session store (the interface of :class:`she.service.SessionStore`)
    backed by the shared :class:`SessionTable`, with a local cache of loaded keys.

    The table decides whether a session exists: its time-to-live, the count cap (past it,
    :class:`~she.service.StoreFull` with 503) and the owner binding (a session answers only
    to the API key that made it, else :class:`~she.service.UnknownSession`). The key-memory
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
        #: :attr:`she.workers.WorkerPool.seal_lock`, so that no fork copies SEAL mid-call.
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
    ).remote(config.session_ttl, config.max_sessions)


def build_app(plans: list[Plan], config: ServiceConfig, *, replicas: int,
              name: str = APP_NAME) -> Any:
    """The Ray Serve application: ``replicas`` replicas of the SHE service for ``plans``."""
    require_ray()
    from ray import serve

    table = session_table(config, name)

    @serve.deployment(name="SheService", num_replicas=replicas,
                      ray_actor_options={"num_cpus": 1})
    @serve.ingress()
    class SheService:
        """One replica: its own servers (one CPU each) around the shared session table."""

        def __init__(self, plans: list[Plan], config: ServiceConfig, table: Any) -> None:
            from .service import create_app

            servers: dict[str, Server] = {p.model_name: _ReplicaServer(p, workers=1)
                                          for p in plans}
            sessions = SharedSessionStore(table, servers, config)
            # One CPU per replica: one forked worker process at a time (see the module text).
            self._app = create_app(servers, replace(config, workers=1), sessions=sessions)
            sessions.seal_lock = self._app.state.pool.seal_lock

        def __serve_build_asgi_app__(self) -> Any:
            return self._app

    return SheService.bind(plans, config, table)


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
