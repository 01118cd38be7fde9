"""Batch scoring of a whole data set on Ray (the ``she[ray]`` extra; ``she batch``).

The client side (this process) holds the secret key. It cuts the data set into chunks of
up to one ciphertext batch, encrypts each chunk into an ordinary ciphertext message
(:meth:`she.Client.encrypt`) and submits it as a Ray task; the task evaluates it with an
ordinary :class:`she.Server` and returns the encrypted result message, which the client
decrypts and writes. Tasks receive only the compiled plan, the client's *public* context
message and ciphertext bytes: exactly what ``she serve`` receives over HTTP.

* **Where.** An embedded local Ray instance by default (one task per core), or an existing
  cluster given by its address. Each task uses one CPU and a one-process
  :class:`~she.server.Server`; the cluster's CPUs are the parallelism.
* **What moves.** The plan and the public context are stored in Ray's object store once
  per run and fetched once per worker process (which keeps its server and loaded keys for
  the run's later tasks); each request travels once, as a uint8 array that the task reads
  from its node's object store without a copy.
* **Faults.** Tasks are retried by Ray (``max_retries``) when the node or worker running
  them dies, or when a finished result is lost with its node before it was read. Every
  attempt is logged with the node it ran on (a small actor on the driver's node), so the
  report says how many evaluations were retried and which nodes were lost.
* **Resumable, in input order.** Results go to an output directory: ``manifest.json``
  (what is being scored, with digests of the plan and the inputs), one
  ``chunks/NNNNNN.npy`` per chunk written atomically (temporary file, then rename), and
  ``logits.npy`` / ``predictions.npy`` in input order once every chunk is there. A rerun
  with the same plan, inputs and chunk size skips the chunks already written; anything
  else is refused rather than mixed.

Ray is imported only here and in :mod:`she.serve.ray_serve`; without it the rest of SHE works
as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from ..client import Client
from ..errors import DataError, SheError
from ..plan.compiler import Plan
from ..server import EvaluationKeys, Server

#: Format of an output directory's manifest.
MANIFEST_VERSION = 1
#: Ray's retries of a task whose worker or node died (system failures, not SHE errors).
DEFAULT_MAX_RETRIES = 3
#: Name prefix of a run's attempt ledger (a named actor, so that tools can watch a run).
LEDGER_PREFIX = "she-batch-attempts-"
#: Object store of an embedded Ray instance (bytes): room for a few requests in flight.
EMBEDDED_OBJECT_STORE_BYTES = 2 * 1024 ** 3
#: Default cap on the bytes of requests in flight (at least two requests are).
IN_FLIGHT_BYTES = 1024 ** 3
#: Longest wait (seconds) at the end of a run with retries for the cluster to notice that
#: a node which ran a retried chunk died (its health checks take seconds).
NODE_DEATH_WAIT_S = 15.0


def require_ray() -> ModuleType:
    """The ``ray`` module, or a clear error naming the extra that provides it."""
    try:
        import ray
    except ImportError as exc:
        raise SheError("this needs Ray: pip install 'she[ray]'") from exc
    return ray


@contextmanager
def ray_connection(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to Ray for the duration of a ``with`` block.

    ``address`` names an existing cluster (``HOST:PORT`` or ``auto``), whose nodes need
    SHE's dependencies (``pip install 'she[ray]'``): this process's ``she`` package is sent
    to them with the job, so that every task runs the same code. Without an address an
    embedded local instance is started (``num_cpus`` CPUs, default all) and shut down at
    the end. If this process is already connected, that connection is used and left open.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "configure_logging": False}
    if address:  # the cluster's workers run this copy of SHE (Ray uploads it, ~5 MB)
        options.update(address=address,
                       runtime_env={"py_modules": [str(Path(__file__).resolve().parent.parent)]})
    else:  # never join a cluster by accident: "local" always starts a new instance
        options.update(address="local", num_cpus=num_cpus or os.cpu_count() or 1,
                       object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                       _node_ip_address="127.0.0.1")
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SheError(f"cannot connect to Ray{f' at {address}' if address else ''}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


# -- worker side ----------------------------------------------------------------------------

#: A worker process's server and loaded keys, for the job it last ran (keyed by job id):
#: tasks of one job reuse them instead of rebuilding the kernels and reloading the keys.
_WORKER_STATE: dict[str, tuple[Server, EvaluationKeys]] = {}


class ChunkResult(NamedTuple):
    """An evaluated chunk: the encrypted result message, the node that computed it, and
    the CPU and wall seconds the task took there (from its start, its request already in
    hand)."""

    message: bytes
    node: str
    cpu_seconds: float
    seconds: float


def _worker_server(job: str, boxed: list[Any]) -> tuple[Server, EvaluationKeys]:
    """This worker process's server and loaded keys for ``job``, built on its first task.

    ``boxed`` holds the object references of the plan and of the public context message,
    inside a list so that Ray does not fetch them for every task: they are fetched once per
    worker process and job.
    """
    import ray

    if job not in _WORKER_STATE:
        _WORKER_STATE.clear()  # one job at a time per worker process
        plan, public = ray.get(boxed)
        server = Server(plan, workers=1)  # one CPU per task; Ray provides the parallelism
        _WORKER_STATE[job] = (server, server.load_context(public))
    return _WORKER_STATE[job]


def _evaluate_chunk(job: str, boxed: list[Any], ledger: Any, index: int,
                    request: np.ndarray) -> ChunkResult:
    """Ray task body: evaluate one ciphertext message (``request``: its bytes as a uint8
    array, which Ray hands over from the object store without a copy)."""
    import ray

    cpu, wall = time.process_time(), time.perf_counter()
    node = ray.get_runtime_context().get_node_id()
    ledger.started.remote(index, node)
    server, keys = _worker_server(job, boxed)
    result = server.evaluate(keys, memoryview(request))
    return ChunkResult(result, node, time.process_time() - cpu, time.perf_counter() - wall)


def _prepare_worker(job: str, boxed: list[Any]) -> str:
    """Ray task body: build this worker's server and load the keys; its node id."""
    import ray

    _worker_server(job, boxed)
    return ray.get_runtime_context().get_node_id()


def put_request(request: bytes) -> Any:
    """Store a ciphertext message in Ray's object store (inside a Ray connection) in the
    form tasks read without copying it, to submit it several times."""
    return require_ray().put(np.frombuffer(request, dtype=np.uint8))


class _AttemptLedger:
    """Ray actor: every task attempt, with the node it started on."""

    def __init__(self) -> None:
        self.log: list[tuple[int, str]] = []

    def started(self, index: int, node: str) -> None:
        self.log.append((index, node))

    def attempts(self) -> list[tuple[int, str]]:
        return self.log


class RayEvaluator:
    """Evaluates ciphertext messages as Ray tasks, for one plan and one client's keys.

    Call inside a Ray connection (:func:`ray_connection`). ``public_context`` is the
    client's public context message (:meth:`she.Client.public_context`); it is checked
    here before any task is submitted.
    """

    def __init__(self, plan: Plan, public_context: bytes, *,
                 max_retries: int = DEFAULT_MAX_RETRIES) -> None:
        ray = require_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        Server(plan, workers=1).load_context(public_context)  # a bad context fails here
        self._ray = ray
        self.job = hashlib.sha256(os.urandom(16)).hexdigest()[:16]
        self._boxed = [ray.put(plan), ray.put(public_context)]
        here = ray.get_runtime_context().get_node_id()
        self._ledger = ray.remote(num_cpus=0)(_AttemptLedger).options(
            name=f"{LEDGER_PREFIX}{self.job}",
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
        self._task = ray.remote(num_cpus=1, max_retries=max_retries)(_evaluate_chunk)
        self.max_retries = max_retries

    def submit(self, index: int, request: bytes | Any) -> Any:
        """Start evaluating ``request`` (chunk ``index``: a ciphertext message, or what
        :func:`put_request` returned for one); returns its object reference."""
        if isinstance(request, bytes | bytearray):
            request = np.frombuffer(request, dtype=np.uint8)
        return self._task.remote(self.job, self._boxed, self._ledger, index, request)

    def prepare_workers(self) -> list[str]:
        """Start a worker on every alive node with a CPU and build its server and keys
        there, as the first task on that node would; the nodes prepared. (Tasks then run
        in these warm workers: a measurement can leave start-up out of its window.)"""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = self._ray.remote(num_cpus=1)(_prepare_worker)
        nodes = [n["NodeID"] for n in self._ray.nodes()
                 if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
        return self._ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(self.job, self._boxed) for node in nodes])

    def result(self, ref: Any, index: int) -> ChunkResult:
        """The evaluated chunk ``index`` (submitted as ``ref``).

        SHE errors from the task are raised as they are; a task that kept failing (its
        node or worker died more than ``max_retries`` times) raises :class:`SheError`.
        """
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, SheError):
                raise cause from None
            raise SheError(f"chunk {index}: evaluation failed: {cause or exc}") from exc
        except exceptions.RayError as exc:
            raise SheError(f"chunk {index}: lost after {self.max_retries} retries "
                           f"({type(exc).__name__}); rerun to resume") from exc

    def wait_any(self, refs: list[Any]) -> list[Any]:
        """Block until at least one of ``refs`` is finished; the finished ones. Results
        stay where they were computed until :meth:`result` reads them."""
        return self._ray.wait(refs, num_returns=1, fetch_local=False)[0]

    def cancel(self, refs: list[Any]) -> None:
        """Stop the tasks of ``refs`` (results no longer wanted)."""
        for ref in refs:
            self._ray.cancel(ref, force=True)

    def attempts(self) -> list[tuple[int, str]]:
        """Every attempt so far: ``(chunk index, node id)``, retries included."""
        return self._ray.get(self._ledger.attempts.remote())

    def close(self) -> None:
        self._ray.kill(self._ledger)


def alive_nodes() -> set[str]:
    """Ids of the Ray nodes alive now."""
    ray = require_ray()
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def lost_nodes(before: set[str], attempts: list[tuple[int, str]]) -> list[str]:
    """The nodes alive at the start of a run (``before``) and gone now. A node that ran a
    chunk which had to be retried (``attempts``: ``(chunk, node)`` in order) may have died
    without the cluster having noticed yet: wait for that, up to :data:`NODE_DEATH_WAIT_S`
    (a retry can also come from a worker process that died on a live node)."""
    last = {index: node for index, node in attempts}
    suspects = {node for index, node in attempts if node != last[index]} & before
    deadline = time.monotonic() + NODE_DEATH_WAIT_S
    alive = alive_nodes()
    while suspects & alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = alive_nodes()
    return sorted(before - alive)


def cluster_cpus() -> int:
    """CPUs of the connected Ray cluster."""
    return int(require_ray().cluster_resources().get("CPU", 0))


# -- driver side ----------------------------------------------------------------------------

@dataclass
class BatchReport:
    """What a batch run did."""

    output: str
    samples: int
    chunks: int
    chunk_size: int
    skipped_chunks: int  # already written by an earlier run
    evaluated_chunks: int
    seconds: float
    retries: int  # task attempts beyond one per evaluated chunk
    lost_nodes: list[str] = field(default_factory=list)
    chunks_per_node: dict[str, int] = field(default_factory=dict)
    cluster_cpus: int = 0
    task_cpu_seconds: float = 0.0  # server-side CPU time of the evaluated chunks

    @property
    def samples_per_second(self) -> float:
        evaluated = self.evaluated_chunks * self.chunk_size
        return min(evaluated, self.samples) / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_second": self.samples_per_second}

    def summary(self) -> str:
        """One sentence on faults: what was lost and retried, or that nothing was."""
        lost = len(self.lost_nodes)
        if not lost and not self.retries:
            return "no node lost, no task retried"
        return (f"{lost} node{'s' * (lost != 1)} lost, {self.retries} chunk evaluation"
                f"{'s' * (self.retries != 1)} retried by Ray; every chunk written once")


class ResultStore:
    """An output directory: manifest, one file per chunk (atomic), final arrays."""

    def __init__(self, root: str | Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.chunks = self.root / "chunks"
        path = self.root / "manifest.json"
        if path.exists():
            try:
                found = json.loads(path.read_text())
            except ValueError as exc:
                raise DataError(f"{path} is not a SHE batch manifest: {exc}") from exc
            if found != manifest:
                differ = sorted(k for k in manifest if found.get(k) != manifest[k])
                raise DataError(f"{self.root} holds results of another run (different "
                                f"{', '.join(differ) or 'format'}); choose another output "
                                "directory or delete it")
        else:
            self.chunks.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, json.dumps(manifest, indent=2).encode())
        self.chunks.mkdir(exist_ok=True)

    def _chunk_path(self, index: int) -> Path:
        return self.chunks / f"{index:06d}.npy"

    def done(self, index: int) -> bool:
        return self._chunk_path(index).exists()

    def write(self, index: int, logits: np.ndarray) -> None:
        _write_atomically(self._chunk_path(index), _npy_bytes(logits))

    def assemble(self, n_chunks: int) -> np.ndarray:
        """Every chunk's results in input order; writes ``logits.npy`` and ``predictions.npy``."""
        logits = np.concatenate([np.load(self._chunk_path(i)) for i in range(n_chunks)])
        _write_atomically(self.root / "logits.npy", _npy_bytes(logits))
        _write_atomically(self.root / "predictions.npy", _npy_bytes(logits.argmax(1)))
        return logits


def score(plan: Plan, x: np.ndarray, output: str | Path, *, chunk_size: int | None = None,
          max_in_flight: int | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
          progress: bool = True, client: Client | None = None,
          on_chunk: Callable[[int, str], None] | None = None) -> BatchReport:
    """Score ``x`` (shape ``(n, *input_shape)``) encrypted, chunk by chunk, as Ray tasks.

    Call inside a Ray connection (:func:`ray_connection`). Results (decrypted logits) go to
    the directory ``output`` (see the module docstring); a rerun resumes.

    Args:
        chunk_size: samples per chunk (one ciphertext message); default the plan's batch
            capacity (one sample per slot) in batch packing, 1 in single packing.
        max_in_flight: chunks encrypted and submitted ahead of the results; default twice
            the cluster's CPUs, and no more than :data:`IN_FLIGHT_BYTES` of requests (each
            waits in Ray's object store).
        max_retries: Ray's retries of a task whose node or worker died.
        progress: show a progress bar on stderr.
        client: the key holder (default: fresh keys for this run).
        on_chunk: called with ``(chunk index, node id)`` after each chunk is written.
    """
    capacity = plan.batch_capacity if plan.packing == "batch" else 1
    chunk_size = chunk_size or capacity
    if not 1 <= chunk_size <= capacity:
        raise DataError(f"chunk size {chunk_size} outside 1..{capacity} for this plan")
    x = np.asarray(x)
    if x.ndim < 1 or len(x) == 0:
        raise DataError("no samples to score")
    if x.shape[1:] != tuple(plan.input_shape):
        raise DataError(f"inputs have shape {x.shape}; this model takes "
                        f"(n, {', '.join(map(str, plan.input_shape))})")
    n_chunks = -(-len(x) // chunk_size)
    store = ResultStore(output, {
        "format": MANIFEST_VERSION, "model": plan.model_name, "plan": plan_digest(plan),
        "inputs": _array_digest(x), "samples": len(x), "chunk_size": chunk_size})
    todo = [i for i in range(n_chunks) if not store.done(i)]
    report = BatchReport(str(output), len(x), n_chunks, chunk_size, n_chunks - len(todo),
                         len(todo), 0.0, 0, cluster_cpus=cluster_cpus())
    if todo and report.cluster_cpus < 1:
        raise SheError("the Ray cluster has no CPU to run tasks on; add a worker node")
    t0 = time.perf_counter()
    if todo:
        _run(plan, x, store, todo, report, client or Client(plan.spec()), max_in_flight,
             max_retries, progress, on_chunk)
    store.assemble(n_chunks)
    report.seconds = time.perf_counter() - t0
    return report


def _run(plan: Plan, x: np.ndarray, store: ResultStore, todo: list[int], report: BatchReport,
         client: Client, window: int | None, max_retries: int, progress: bool,
         on_chunk: Callable[[int, str], None] | None) -> None:
    """Encrypt, submit, collect and write the chunks in ``todo`` (``window`` of them in
    flight; default from the cluster's CPUs and the size of the first request)."""
    from tqdm.auto import tqdm

    nodes_before = alive_nodes()
    evaluator = RayEvaluator(plan, client.public_context(), max_retries=max_retries)
    size = report.chunk_size
    bar = tqdm(total=sum(len(x[i * size:(i + 1) * size]) for i in todo), unit="sample",
               desc="she batch", disable=not progress, smoothing=0.1)
    pending: dict[Any, int] = {}
    queue = iter(todo)
    nodes: Counter[str] = Counter()
    try:
        while True:
            for index in queue:  # fill the window: the next chunks encrypt while others run
                request = client.encrypt(x[index * size:(index + 1) * size])
                if window is None:
                    window = max(2, min(2 * report.cluster_cpus, IN_FLIGHT_BYTES // len(request)))
                pending[evaluator.submit(index, request)] = index
                del request
                if len(pending) >= window:
                    break
            if not pending:
                break
            for ref in evaluator.wait_any(list(pending)):
                index = pending.pop(ref)
                done = evaluator.result(ref, index)
                logits = client.decrypt(done.message)
                store.write(index, logits)
                nodes[done.node] += 1
                report.task_cpu_seconds += done.cpu_seconds
                bar.update(len(logits))
                if on_chunk is not None:
                    on_chunk(index, done.node)
        attempts = evaluator.attempts()
        report.retries = max(0, len(attempts) - len(todo))
        report.chunks_per_node = dict(nodes)
        report.lost_nodes = lost_nodes(nodes_before, attempts)
    finally:
        bar.close()
        evaluator.cancel(list(pending))
        evaluator.close()


def plan_digest(plan: Plan) -> str:
    """A digest of what a plan computes: its public spec and every layer's weights."""
    h = hashlib.sha256(json.dumps(plan.spec(), sort_keys=True, default=str).encode())
    for layer in plan.layers:
        _hash_array(h, layer.weights)
        _hash_array(h, layer.bias)
        h.update(str(layer.shift).encode())
    return h.hexdigest()


def _hash_array(h: Any, a: Any) -> None:
    """Feed an array's content to ``h``: dense by dtype, shape and bytes, scipy.sparse by
    its canonical CSR arrays."""
    if sp.issparse(a):
        a = sp.csr_matrix(a)
        a.sum_duplicates()
        a.sort_indices()
        h.update(f"csr{a.shape}{a.dtype.str}".encode())
        for part in (a.indptr, a.indices, a.data):
            h.update(np.ascontiguousarray(part).tobytes())
    else:
        a = np.asarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())


def _array_digest(x: np.ndarray) -> str:
    h = hashlib.sha256()
    _hash_array(h, x)
    return h.hexdigest()


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, a)
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
