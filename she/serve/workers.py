"""Homomorphic work for a server: one forked process per request, a bounded budget.

SEAL's Python bindings hold the GIL, so threads cannot run two evaluations at once; and a
long-lived pool of worker processes would need every session's evaluation keys (tens of
MiB each) copied into it. Instead every request runs in a process forked for it: the child
shares the parent's memory copy-on-write (the compiled models, the encoded weights and the
session's keys cost nothing to hand over), computes, writes its answer into a pipe and
exits. A crash, a kill or a timeout therefore costs only that request: the parent reports
:class:`WorkerDied` (or :class:`WorkerTimeout`) and the next request forks a fresh child.
Nothing needs rebuilding.

The budget is ``workers`` processes. A request takes one slot; a request that finds the
server idle and nobody waiting takes them all (its own evaluation then splits its work
among that many processes, see :mod:`she.runtime.engine`). Requests beyond the budget wait in a
queue of at most ``queue`` requests for at most ``queue_timeout`` seconds; past either
they get :class:`Busy` (the service answers 503 with ``Retry-After``), never a hang.

Forking while another thread of the parent is inside SEAL could copy a locked SEAL mutex
into the child, so the parent's own SEAL work (loading a session's keys) and the forks
exclude each other through :attr:`WorkerPool.seal_lock`.

A fork costs in proportion to the parent's page tables, and the parent holds every
session's keys (single packing: ~70 MiB each). With glibc's malloc on transparent huge
pages (:func:`reexec_with_huge_pages`, done by ``she serve``) the page tables are 512
times smaller: measured on a server process of 1.2 GiB (12 sessions of the demo model),
fork and exit took 0.21 s with 4 KiB pages and 0.02 s with huge pages. The child also
turns Python's garbage collector off, which would otherwise touch (and so copy) every
object of the parent's heap.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

_LENGTH = struct.Struct("<Q")
#: glibc tunable: malloc asks for transparent huge pages (glibc 2.35+; ignored elsewhere).
HUGE_PAGES = "glibc.malloc.hugetlb=1"
_OK, _RAISED = 0, 1


class Busy(Exception):
    """Every worker is busy and the queue is full, or the wait for a worker was too long."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WorkerDied(Exception):
    """The process running a request ended without an answer (killed, out of memory)."""


class WorkerTimeout(Exception):
    """A request ran longer than the job timeout; its process was killed."""


class WorkerPool:
    """At most ``workers`` forked processes at a time, with a bounded waiting queue.

    Args:
        workers: the process budget (default: every core).
        queue: most requests waiting for a slot; one more is refused with :class:`Busy`.
        queue_timeout: seconds a request may wait for a slot.
        job_timeout: seconds a request may compute before its process is killed.
    """

    def __init__(self, workers: int | None = None, *, queue: int = 64,
                 queue_timeout: float = 120.0, job_timeout: float = 900.0) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.queue, self.queue_timeout, self.job_timeout = queue, queue_timeout, job_timeout
        #: Held by the parent's own SEAL work and by every fork.
        self.seal_lock = threading.Lock()
        self._free = self.workers
        self._waiting = 0
        self._condition: asyncio.Condition | None = None
        #: Process ids of the running children (for health reports and tests).
        self.running: set[int] = set()
        #: Requests that lost their process (killed, crashed) or timed out.
        self.failures = 0

    def stats(self) -> dict[str, int]:
        return {"workers": self.workers, "busy": self.workers - self._free,
                "waiting": self._waiting, "worker_failures": self.failures}

    async def run(self, fn: Callable[[int], bytes]) -> bytes:
        """``fn(processes)`` in a forked process; ``processes`` is how many it may use.

        Raises :class:`Busy`, :class:`WorkerDied`, :class:`WorkerTimeout`, or whatever
        exception ``fn`` raised in the child (pickled back).
        """
        if self._condition is None:
            self._condition = asyncio.Condition()
        condition = self._condition
        retry = max(1, round(self.queue_timeout / 4))
        async with condition:
            if self._free == 0 or self._waiting:
                if self._waiting >= self.queue:
                    raise Busy(f"all {self.workers} workers are busy and {self._waiting} "
                               "requests are waiting; retry later", retry)
                self._waiting += 1
                try:
                    await asyncio.wait_for(condition.wait_for(lambda: self._free > 0),
                                           self.queue_timeout)
                except asyncio.TimeoutError:
                    raise Busy(f"no worker became free within {self.queue_timeout:g} s; "
                               "retry later", retry) from None
                finally:
                    self._waiting -= 1
            taken = self._free if self._waiting == 0 and self._free == self.workers else 1
            self._free -= taken
        try:
            return await run_in_threadpool(self._fork, fn, taken)
        finally:
            async with condition:
                self._free += taken
                condition.notify_all()

    def _fork(self, fn: Callable[[int], bytes], processes: int) -> bytes:
        read_end, write_end = os.pipe()
        try:
            with self.seal_lock:
                pid = os.fork()
        except OSError as exc:  # no memory or process slots left: a 503, not a 500
            os.close(read_end)
            os.close(write_end)
            self.failures += 1
            raise WorkerDied(f"cannot start a worker process: {exc}") from None
        if pid == 0:  # the child: answer through the pipe, never return into the server
            os.close(read_end)
            _child(fn, processes, write_end)
        os.close(write_end)
        self.running.add(pid)
        try:
            data, timed_out = _read_all(read_end, time.monotonic() + self.job_timeout)
            if timed_out:
                os.kill(pid, signal.SIGKILL)
        finally:
            os.close(read_end)
            _, status = os.waitpid(pid, 0)
            self.running.discard(pid)
        if timed_out:
            self.failures += 1
            raise WorkerTimeout(f"the request took longer than {self.job_timeout:g} s")
        if len(data) < 1 + _LENGTH.size or len(data) != 1 + _LENGTH.size + _LENGTH.unpack_from(
                data, 1)[0]:
            self.failures += 1
            raise WorkerDied(f"the worker process ended without an answer ({_describe(status)})")
        payload = data[1 + _LENGTH.size:]
        if data[0] == _OK:
            return payload
        try:
            error = pickle.loads(payload)
        except Exception:  # an exception class whose constructor takes other arguments
            error = RuntimeError("the worker process failed with an error that did not unpickle")
        raise error


def _child(fn: Callable[[int], bytes], processes: int, fd: int) -> None:
    """Run ``fn`` in the forked child and write ``kind | length | payload`` to ``fd``."""
    code = 1
    try:
        gc.disable()  # a collection would touch, and so copy, every object of the parent
        # The host's handlers (uvicorn's graceful shutdown) must not run here.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            kind, payload = _OK, fn(processes)
        except Exception as exc:  # handed to the parent, which maps it to an answer
            try:
                kind, payload = _RAISED, pickle.dumps(exc)
            except Exception:  # an exception that does not pickle
                kind, payload = _RAISED, pickle.dumps(RuntimeError(repr(exc)))
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(bytes([kind]) + _LENGTH.pack(len(payload)))
            pipe.write(payload)
        code = 0
    finally:
        os._exit(code)


def _read_all(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Everything written to ``fd`` until its end; ``(data, timed_out)``."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"", True
        ready, _, _ = select.select([fd], [], [], min(left, 5.0))
        if not ready:
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def reexec_with_huge_pages() -> None:
    """Restart this process (same pid, same arguments) with :data:`HUGE_PAGES` in
    ``GLIBC_TUNABLES`` unless it is there already (Linux only; glibc reads tunables at
    start-up). Call it first thing in a command that serves."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables:
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
