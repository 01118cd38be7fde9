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
from dataclasses import dataclass, field
from typing import Any

from .compiler import Plan
from .ray_batch import ray_connection, require_ray
from .server import EvaluationKeys, Server
from .service import ServiceConfig

#: Ray namespace of the session table.
NAMESPACE = "she"
#: Application name in Ray Serve (and suffix of its session table's name).
APP_NAME = "she"


class SessionTable:
    """Ray actor: every session's model and public context message, with a time-to-live
    since last use and a cap (the service's :class:`~she.service.ServiceConfig`)."""

    def __init__(self, ttl: float, cap: int) -> None:
        self.ttl, self.cap = ttl, cap
        self._sessions: dict[str, list[Any]] = {}  # id -> [model, message, last used]

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if now - v[2] > self.ttl]:
            del self._sessions[sid]

    def add(self, model: str, message: bytes) -> str | None:
        """Store a session; its id, or None when the cap is reached."""
        self._expire()
        if len(self._sessions) >= self.cap:
            return None
        sid = secrets.token_urlsafe(24)
        self._sessions[sid] = [model, message, time.monotonic()]
        return sid

    def touch(self, sid: str, with_message: bool) -> tuple[str, bytes | None] | None:
        """Mark a session used; its model (and message if asked), or None if unknown."""
        self._expire()
        entry = self._sessions.get(sid)
        if entry is None:
            return None
        entry[2] = time.monotonic()
        return entry[0], entry[1] if with_message else None

    def delete(self, sid: str) -> bool:
        return self._sessions.pop(sid, None) is not None

    def count(self) -> int:
        self._expire()
        return len(self._sessions)


@dataclass
class _RegisteredKeys(EvaluationKeys):
    """Loaded evaluation keys and, until the session table has it, the message they came in."""

    message: bytes = field(default=b"", repr=False)


class _ReplicaServer(Server):
    """A :class:`Server` whose loaded keys keep the message they were loaded from, so that
    the session store can hand it to the shared table."""

    def load_context(self, data: bytes) -> _RegisteredKeys:
        keys = super().load_context(data)
        return _RegisteredKeys(keys.ctx, keys.fingerprint, keys.relin, keys.galois, message=data)


@dataclass
class _Session:
    model: str
    keys: EvaluationKeys


class SharedSessionStore:
    """The service's session store (see :class:`she.service.SessionStore`) backed by the
    shared :class:`SessionTable`, with a local cache of loaded keys."""

    def __init__(self, table: Any, servers: dict[str, Server], cache_size: int) -> None:
        self._ray = require_ray()
        self._table, self._servers, self._cache_size = table, servers, max(1, cache_size)
        self._cache: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()

    def _remember(self, sid: str, session: _Session) -> None:
        with self._lock:
            self._cache[sid] = session
            self._cache.move_to_end(sid)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def add(self, model: str, keys: EvaluationKeys) -> str:
        from fastapi import HTTPException

        message = keys.message if isinstance(keys, _RegisteredKeys) else b""
        if not message:
            raise TypeError("shared sessions need keys loaded by a replica's server")
        sid = self._ray.get(self._table.add.remote(model, message))
        if sid is None:
            raise HTTPException(503, "session limit reached; delete a session or retry later")
        keys.message = b""  # the table has it; the cache keeps only the loaded keys
        self._remember(sid, _Session(model, keys))
        return sid

    def get(self, sid: str) -> _Session:
        from fastapi import HTTPException

        with self._lock:
            cached = self._cache.get(sid)
        found = self._ray.get(self._table.touch.remote(sid, cached is None))
        if found is None:
            with self._lock:
                self._cache.pop(sid, None)
            raise HTTPException(404, "unknown or expired session; register again")
        if cached is not None:
            return cached
        model, message = found
        keys = self._servers[model].load_context(message)  # checked again, as on upload
        keys.message = b""
        session = _Session(model, keys)
        self._remember(sid, session)
        return session

    def delete(self, sid: str) -> None:
        from fastapi import HTTPException

        with self._lock:
            self._cache.pop(sid, None)
        if not self._ray.get(self._table.delete.remote(sid)):
            raise HTTPException(404, "unknown or expired session")

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
            sessions = SharedSessionStore(table, servers, config.max_sessions)
            self._app = create_app(servers, config, sessions=sessions)

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
