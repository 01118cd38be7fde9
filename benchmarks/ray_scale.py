"""Scale-out on Ray, measured on a local cluster: batch throughput with 1 and 2 worker
nodes, serving requests/s with 1 and 2 Ray Serve replicas under 8 concurrent clients, the
overhead of Ray against the embedded path on one node, and from those numbers, on paper,
the cost of a million images on K machines. Writes ``docs/results/ray_scale.json`` and
``docs/scaling.md``::

    python -m benchmarks.ray_scale [--quick] [--data DIR] [--cpu-hour-price USD]

Every node is a ``ray.cluster_utils.Cluster`` node on 127.0.0.1 limited to one CPU: a head
with no CPU (the driver, Serve's controller and proxy, the session table) and worker
nodes where every HE task and replica runs. The model is the TenSEAL-tutorial network
(``she/assets/tutorial_cnn.onnx``): batch packing (4096 images per chunk) for batch
scoring, single packing (one image per request) for serving.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

import she
from benchmarks.mnist_demo import machine
from she.io import assets
from she.io.data import load_idx_dataset

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MODEL = REPO / "she" / "assets" / "tutorial_cnn.onnx"
CLIENTS = 8
#: Object store of the head node (the driver's requests) and of each worker node.
HEAD_STORE_BYTES = 1536 * 1024 ** 2
WORKER_STORE_BYTES = 768 * 1024 ** 2


def _free_port() -> int:
    """A port on 127.0.0.1 free now (Ray Serve's proxy needs the number before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _data(data_dir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Calibration images (training split) and test images."""
    if (data_dir / "t10k-images-idx3-ubyte.gz").exists():
        train, _ = load_idx_dataset(data_dir, "train")
        test, _ = load_idx_dataset(data_dir, "test")
        return train[:1000], test, str(data_dir)
    samples, _ = assets.demo_samples()
    return samples, samples, "shipped samples (MNIST IDX files not found)"


def _timed_tasks(evaluator, refs: list, tasks: int) -> tuple[float, list]:
    """Submit ``tasks`` chunk evaluations cycling over ``refs``; wall seconds and results."""
    t = time.perf_counter()
    pending = [evaluator.submit(i, refs[i % len(refs)]) for i in range(tasks)]
    results = [evaluator.result(ref, i) for i, ref in enumerate(pending)]
    return time.perf_counter() - t, results


def embedded_batch(plan, test: np.ndarray, distinct: int) -> tuple:
    """Encrypt ``distinct`` chunks and evaluate them with the embedded server (before any
    Ray process runs in this process): the client, requests, decrypted results, timings."""
    client = she.Client(plan.spec())
    chunk = plan.batch_capacity
    t, cpu = time.perf_counter(), time.process_time()
    requests = [client.encrypt(np.resize(test[i * chunk:(i + 1) * chunk], (chunk, *test.shape[1:])))
                for i in range(distinct)]
    encrypt_s = (time.perf_counter() - t) / len(requests)
    encrypt_cpu = (time.process_time() - cpu) / len(requests)
    _log(f"batch: {distinct} chunks of {chunk} images encrypted ({encrypt_s:.1f} s each, "
         f"{len(requests[0]) / 2**20:.0f} MiB each)")
    local = she.Server(plan, workers=1)
    keys = local.load_context(client.public_context())
    t, cpu = time.perf_counter(), time.process_time()
    expected = [local.evaluate(keys, r) for r in requests]
    embedded_s = (time.perf_counter() - t) / len(requests)
    embedded_cpu = (time.process_time() - cpu) / len(requests)
    _log(f"batch: embedded Server.evaluate (one process, workers=1): {embedded_s:.1f} s/chunk")
    stats = {"chunk_images": chunk, "request_bytes": len(requests[0]),
             "response_bytes": len(expected[0]), "client_encrypt_s_per_chunk": encrypt_s,
             "client_encrypt_cpu_s_per_chunk": encrypt_cpu,
             "embedded_s_per_chunk": embedded_s, "embedded_cpu_s_per_chunk": embedded_cpu,
             "embedded_chunks": len(expected),
             "agreement_with_plaintext": float(np.mean(
                 client.decrypt(expected[0]).argmax(1)
                 == she.load(MODEL).run_plain(test[:chunk]).argmax(1)))}
    return client, requests, [client.decrypt(e) for e in expected], stats


def batch_scaling(ray, cluster, plan, embedded: tuple, tasks: int) -> dict:
    """Ray on one node, then on two nodes, with the embedded run's encrypted chunks
    (``tasks`` evaluations per configuration, after every node's worker is started and
    has loaded the plan and keys)."""
    from she.serve.ray_batch import RayEvaluator, put_request

    client, requests, expected, stats = embedded
    chunk, distinct = stats["chunk_images"], len(requests)
    refs = [put_request(r) for r in requests]  # once; every task reads them by reference
    requests.clear()
    runs = {}
    for nodes in (1, 2):
        while len(cluster.worker_nodes) < nodes:
            cluster.add_node(num_cpus=1, object_store_memory=WORKER_STORE_BYTES)
        cluster.wait_for_nodes()
        evaluator = RayEvaluator(plan, client.public_context())  # new job: new servers
        try:
            t = time.perf_counter()
            prepared = evaluator.prepare_workers()
            start_up = time.perf_counter() - t
            seconds, results = _timed_tasks(evaluator, refs, tasks)
        finally:
            evaluator.close()
        # every result is re-randomised (fresh noise): compare decrypted, as the tests do
        errors = [np.abs(client.decrypt(r.message) - expected[i % distinct]).max()
                  for i, r in enumerate(results)]
        same = all(np.array_equal(client.decrypt(r.message).argmax(1),
                                  expected[i % distinct].argmax(1)) for i, r in enumerate(results))
        cpu = sum(r.cpu_seconds for r in results)
        busy = sum(r.seconds for r in results) / (nodes * seconds)
        per_node = Counter(r.node for r in results)
        runs[nodes] = {"seconds": seconds, "tasks": tasks, "start_up_s": start_up,
                       "nodes_prepared": len(prepared),
                       "images_per_second": tasks * chunk / seconds,
                       "images_per_task_cpu_second": tasks * chunk / cpu,
                       "task_cpu_s_per_chunk": cpu / tasks, "cpus_obtained": cpu / seconds,
                       "workers_busy": busy,
                       "chunks_per_node": sorted(per_node.values(), reverse=True),
                       "max_error_vs_embedded": float(max(errors)),
                       "results_match_embedded": bool(same and max(errors) < plan.predicted_error)}
        _log(f"batch: {nodes} worker node(s): start-up {start_up:.1f} s, then {tasks} chunks in "
             f"{seconds:.1f} s ({tasks * chunk / seconds:.0f} images/s, {cpu / tasks:.1f} CPU-s "
             f"per chunk, {cpu / seconds:.2f} CPUs obtained, workers busy {busy:.0%}, chunks per node "
             f"{runs[nodes]['chunks_per_node']}), match embedded: {runs[nodes]['results_match_embedded']}")
    embedded_s, embedded_cpu = stats["embedded_s_per_chunk"], stats["embedded_cpu_s_per_chunk"]
    return {
        **stats,
        "ray_1_node_s_per_chunk": runs[1]["seconds"] / tasks,
        "ray_overhead": runs[1]["seconds"] / tasks / embedded_s - 1,
        "nodes": {str(k): v for k, v in runs.items()},
        "speedup_1_to_2": runs[2]["images_per_second"] / runs[1]["images_per_second"],
        "cpus_obtained_1_to_2": runs[2]["cpus_obtained"] / runs[1]["cpus_obtained"],
        "per_cpu_efficiency_2_vs_1": (runs[2]["images_per_task_cpu_second"]
                                      / runs[1]["images_per_task_cpu_second"]),
        "ray_cpu_overhead": runs[1]["task_cpu_s_per_chunk"] / embedded_cpu - 1,
    }


def _load(remotes: list, x: np.ndarray, requests: int) -> tuple[float, list[float], list[int]]:
    """``requests`` single-image predictions from ``len(remotes)`` concurrent clients, each
    client in its own thread, one request after the other (a client is not thread-safe)."""
    per_client = -(-requests // len(remotes))

    def client_loop(c: int) -> list[tuple[float, int]]:
        out = []
        for i in range(c * per_client, min((c + 1) * per_client, requests)):
            t = time.perf_counter()
            logits = remotes[c].predict(x[i:i + 1])
            out.append((time.perf_counter() - t, int(logits.argmax())))
        return out

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(remotes)) as pool:
        done = [r for rs in pool.map(client_loop, range(len(remotes))) for r in rs]
    return time.perf_counter() - t, [d[0] for d in done], [d[1] for d in done]


def _serving_row(wall: float, latencies: list[float], predictions: list[int],
                 reference: np.ndarray) -> dict:
    return {"requests": len(latencies), "requests_per_second": len(latencies) / wall,
            "latency_s": {"p50": float(np.percentile(latencies, 50)),
                          "p90": float(np.percentile(latencies, 90))},
            "agreement_with_plaintext": float(np.mean(
                np.array(predictions) == reference[:len(predictions)]))}


def serving_scaling(ray, cluster, plan, test: np.ndarray, requests: int, warmup: int,
                    embedded: bool) -> dict:
    """8 clients against 1 then 2 Ray Serve replicas (and the embedded server if asked)."""
    from ray import serve

    from she.serve import ray_serve
    from she.serve.remote import RemoteClient
    from she.serve.service import ServiceConfig

    while len(cluster.worker_nodes) < 2:
        cluster.add_node(num_cpus=1, object_store_memory=WORKER_STORE_BYTES)
    reference = she.load(MODEL).run_plain(test[:requests]).argmax(1)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    keydir = Path(tempfile.mkdtemp())
    out: dict = {"clients": CLIENTS}
    config = ServiceConfig()
    try:
        for replicas in (1, 2):
            ray_serve.start([plan], config, host="127.0.0.1", port=port, replicas=replicas)
            if replicas == 1:
                t = time.perf_counter()
                remotes = [RemoteClient(url, plan.model_name, key_dir=keydir / str(i))
                           for i in range(CLIENTS)]
                for r in remotes:
                    r._register()
                out["keygen_and_registration_s"] = (time.perf_counter() - t) / CLIENTS
                out["public_context_bytes"] = len(remotes[0].client.public_context())
            # warm-up: every replica loads a session's keys from the table on first sight
            _load(remotes, test, warmup * CLIENTS * replicas)
            wall, latencies, predictions = _load(remotes, test, requests)
            out[f"ray_{replicas}_replica"] = _serving_row(wall, latencies, predictions, reference)
            _log(f"serve: {replicas} replica(s): {requests / wall:.2f} requests/s")
    finally:
        ray_serve.stop()
        serve.shutdown()
    if embedded:
        out["embedded_1_worker"] = _embedded_serving(plan, test, requests, reference, keydir)
        _log(f"serve: embedded she serve --workers 1: "
             f"{out['embedded_1_worker']['requests_per_second']:.2f} requests/s")
    out["speedup_1_to_2"] = (out["ray_2_replica"]["requests_per_second"]
                             / out["ray_1_replica"]["requests_per_second"])
    return out


def _embedded_serving(plan, test, requests, reference, keydir) -> dict:
    """The same load against ``she serve --workers 1`` (one process, uvicorn)."""
    import threading

    import uvicorn

    from she.serve.remote import RemoteClient
    from she.serve.service import ServiceConfig, create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app({plan.model_name: she.Server(plan, workers=1)}, ServiceConfig()),
        host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    try:
        url = f"http://127.0.0.1:{port}"
        remotes = [RemoteClient(url, plan.model_name, key_dir=keydir / f"e{i}")
                   for i in range(CLIENTS)]
        _load(remotes, test, CLIENTS)
        wall, latencies, predictions = _load(remotes, test, requests)
        return _serving_row(wall, latencies, predictions, reference)
    finally:
        server.should_exit = True
        thread.join()


def cost(batch: dict, price: float) -> list[dict]:
    """Hours and price of a million images on K one-CPU machines, from the measured CPU
    seconds per chunk (server side, in a Ray task) and per encrypted chunk (client side)."""
    machine_rate = batch["chunk_images"] / batch["nodes"]["1"]["task_cpu_s_per_chunk"]
    client_rate = batch["chunk_images"] / batch["client_encrypt_cpu_s_per_chunk"]
    rows = []
    for k in (1, 2, 4, 8, 16, 64):
        rate = k * machine_rate
        hours = 1e6 / rate / 3600
        rows.append({"machines": k, "images_per_second": rate, "hours": hours,
                     "machine_hours": k * hours, "usd": k * hours * price,
                     "client_cores_to_keep_up": math.ceil(rate / client_rate)})
    return rows


def _md(rows: list[list[str]]) -> str:
    """A markdown table (the first row is the header)."""
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([lines[0], "|" + " --- |" * len(rows[0]), *lines[1:]])


def render(result: dict) -> str:
    b, s, m = result["batch"], result["serving"], result["machine"]
    n1, n2 = b["nodes"]["1"], b["nodes"]["2"]
    mib = 2 ** 20
    target = "met" if b["speedup_1_to_2"] >= 1.8 else "**not met on this machine**"
    batch_table = _md([
        ["", "chunks", "seconds", "images/s", "CPU-s per chunk", "CPUs obtained",
         "workers busy"],
        ["embedded `Server.evaluate`, one process (workers=1)", str(b["embedded_chunks"]),
         f"{b['embedded_s_per_chunk'] * b['embedded_chunks']:.1f}",
         f"{b['chunk_images'] / b['embedded_s_per_chunk']:.0f}",
         f"{b['embedded_cpu_s_per_chunk']:.2f}",
         f"{b['embedded_cpu_s_per_chunk'] / b['embedded_s_per_chunk']:.2f}", ""],
        *[[f"Ray, {k} worker node{'s' * (k > 1)}", str(n['tasks']), f"{n['seconds']:.1f}",
           f"{n['images_per_second']:.0f}", f"{n['task_cpu_s_per_chunk']:.2f}",
           f"{n['cpus_obtained']:.2f}", f"{n['workers_busy']:.0%}"]
          for k, n in ((1, n1), (2, n2))]])
    cost_table = _md([
        ["machines (1 CPU)", "images/s", "minutes", "machine-hours",
         f"cost at ${result['cpu_hour_price']:.3f}/CPU-hour", "client cores to keep up"],
        *[[str(c["machines"]), f"{c['images_per_second']:,.0f}", f"{c['hours'] * 60:.1f}",
           f"{c['machine_hours']:.3f}", f"${c['usd']:.4f}", str(c["client_cores_to_keep_up"])]
          for c in result["cost"]]])
    serving_rows = [("Ray Serve, 1 replica", s["ray_1_replica"]),
                    ("Ray Serve, 2 replicas", s["ray_2_replica"])]
    if "embedded_1_worker" in s:
        serving_rows.insert(0, ("embedded `she serve --workers 1`", s["embedded_1_worker"]))
    serving_table = _md([
        ["server", "requests", "requests/s", "latency p50 / p90 (s)", "agreement with plaintext"],
        *[[name, str(r["requests"]), f"{r['requests_per_second']:.2f}",
           f"{r['latency_s']['p50']:.2f} / {r['latency_s']['p90']:.2f}",
           f"{r['agreement_with_plaintext']:.0%}"] for name, r in serving_rows]])
    load = ", ".join(f"{v:.1f}" for v in result["load_average"])
    per_image = b["request_bytes"] / b["chunk_images"]
    match = ("yes" if n1["results_match_embedded"] and n2["results_match_embedded"]
             else "**no**")
    load_start = ", ".join(f"{v:.1f}" for v in result["load_average_start"])
    return f"""# Scaling out on Ray

Numbers from `docs/results/ray_scale.json`, written on {result['date']} by

    {result['command']}

({m['cores']} cores, {m['cpu']}; TenSEAL {m['tenseal']}, Ray {result['ray']}).

**Read the wall-clock ratios with care: this machine has {m['cores']} cores, possibly shared
with other jobs** (load average {load_start} over 1, 5 and 15 minutes when the run
started, {load} when it ended; niceness {result['nice']}; {result['wall_seconds'] / 60:.1f} minutes
in all). A "node" here is a Ray node limited to one CPU *on this same machine*: a second
node can only add throughput if there is a free core for it. The "CPUs obtained" column (CPU
seconds of the HE work divided by wall seconds) shows how much CPU each configuration
actually got; the CPU cost per chunk is what separate machines would each pay.

Every node is a `ray.cluster_utils.Cluster` node on 127.0.0.1 with one CPU: a head with
no CPU (the driver, Serve's controller and proxy, the session table) and worker nodes on
which every HE task and replica runs. The model is the TenSEAL-tutorial network
(`she/assets/tutorial_cnn.onnx`, calibrated on 1000 MNIST training images); images from
{result['data']}.

## Batch scoring (`she batch`)

Server side: chunks of {b['chunk_images']} images (batch packing, one ciphertext per pixel:
{b['request_bytes'] / mib:.0f} MiB up, {b['response_bytes'] / mib:.1f} MiB down) evaluated
as Ray tasks of one CPU. {b['embedded_chunks']} distinct chunk(s) are encrypted once and submitted
{n1['tasks']} times in all
(an evaluation costs the same whatever the pixel values), so that the client's encryption,
which in a deployment runs on the client's machine, does not take this machine's cores.
Each configuration is a new job: before its clock starts, every node starts its worker
process and builds its server and loads the keys once (start-up: {n1['start_up_s']:.1f} s on
one node, {n2['start_up_s']:.1f} s on two, not in the table); the table is the steady
state, with chunks per node {n1['chunks_per_node']} and {n2['chunks_per_node']}. "Workers
busy" is the share of the timed window the nodes' workers spent inside tasks (their
request in hand); the rest is Ray handing over the next request and the last chunk's
tail. "CPUs obtained" below "workers busy" means the machine's other jobs had the CPU.

{batch_table}

* **1 → 2 nodes: {b['speedup_1_to_2']:.2f}× in images/s of wall time** (target ≥ 1.8×:
  {target}). The two nodes together obtained {b['cpus_obtained_1_to_2']:.2f}× the CPU
  of one ({n1['cpus_obtained']:.2f} → {n2['cpus_obtained']:.2f} CPUs), and per CPU second
  they delivered {b['per_cpu_efficiency_2_vs_1']:.0%} of one node's throughput
  ({n1['task_cpu_s_per_chunk']:.2f} vs {n2['task_cpu_s_per_chunk']:.2f} CPU-s per chunk):
  the tasks share nothing, so on nodes that each have a core of their own the throughput
  would grow by about {2 * b['per_cpu_efficiency_2_vs_1']:.2f}× (an estimate from the CPU
  costs, not a wall-clock measurement).
* **Ray against the embedded path on one node: {b['ray_cpu_overhead']:+.0%} CPU time per
  chunk in the evaluation** ({n1['task_cpu_s_per_chunk']:.2f} vs
  {b['embedded_cpu_s_per_chunk']:.2f} CPU-s; the CPU of Ray's own processes, such as
  moving the {b['request_bytes'] / mib:.0f} MiB request through the object store, is not
  in it), and {b['ray_overhead']:+.0%} wall time per chunk
  ({b['ray_1_node_s_per_chunk']:.2f} s vs {b['embedded_s_per_chunk']:.2f} s, including
  task submission and the object store; start-up is not in it). On this machine the
  wall-time difference mostly follows the CPU each run could get
  ({n1['cpus_obtained']:.2f} vs
  {b['embedded_cpu_s_per_chunk'] / b['embedded_s_per_chunk']:.2f} CPUs obtained).
* Every Ray result, decrypted, matched the embedded result (same predictions, logits
  within the predicted error: {match}; results are re-randomised, so their bytes differ
  by design); the predictions agree with the plaintext model on {b['agreement_with_plaintext']:.2%} of
  the chunk's images.
* Client side: encrypting one chunk took {b['client_encrypt_cpu_s_per_chunk']:.1f} CPU-s
  ({b['chunk_images'] / b['client_encrypt_cpu_s_per_chunk']:.0f} images/s per core).

### A million images on K machines (on paper)

From the measured CPU cost: each one-CPU machine evaluates {b['chunk_images']}-image
chunks back to back at {n1['task_cpu_s_per_chunk']:.2f} CPU-s each, machines scale
linearly (tasks share nothing), and the price is an assumption
(`--cpu-hour-price`). The client must encrypt as fast as the machines evaluate: the last
column is the client cores that takes (`she batch` encrypts on one core today). Uploads are
{per_image / 1024:.0f} KiB per image ({per_image * 1e6 / 2**30:.0f} GiB per million
images) whatever K.

{cost_table}

## Serving (`she serve --ray --replicas K`)

{s['clients']} concurrent clients, each with its own keys and session, send single-image
requests (single packing: {s['public_context_bytes'] / mib:.1f} MiB of evaluation keys per
session, registered once) to the same HTTP API. After a warm-up in which the replicas load
the sessions' keys from the shared session table, the timed requests:

{serving_table}

* **1 → 2 replicas: {s['speedup_1_to_2']:.2f}× in requests/s.**
* Key generation and registration: {s['keygen_and_registration_s']:.1f} s per client.

## How it works

* `she batch MODEL DATA -o DIR [--ray ADDRESS]`: the client process encrypts chunks (one
  ciphertext batch each) and submits each as a Ray task with the compiled plan and its
  *public* context; tasks return encrypted results, which the client decrypts and writes,
  one file per chunk, atomically. A rerun skips the chunks already written. Tasks whose
  node dies are retried by Ray (`--max-retries`); the run reports lost nodes and retries.
* `she serve MODEL --ray [ADDRESS] --replicas K`: the HTTP app of `she serve` as a Ray
  Serve application: K HE replicas (one CPU each, each with its own copy of the plan)
  behind a front deployment (no CPU, on the head node beside Ray Serve's proxy) that
  passes every request to a replica through a Serve handle. Sessions (the uploaded public
  context) live in a named detached actor, so any replica answers any session and a
  replaced replica still knows them.
* Faults, as tested in `tests/test_ray.py` on a local cluster: a worker node killed in
  the middle of a batch run loses nothing (`test_node_killed_mid_run_nothing_lost`);
  every HE replica killed, sessions survive: requests wait for a new replica or get a
  retryable 503, then are answered (`test_sessions_survive_replica_restart`);
  one of two HE replicas killed while four clients send requests
  (`test_replica_killed_under_load_answers_are_right_or_503`): no request hangs or is
  lost, no answer is wrong, none is a 500. The requests the killed replica was running
  are sent again by the front to the other replica (an evaluation is a pure function of
  the ciphertexts and the session's keys, so this is safe); a request that cannot be
  sent again safely (registration, deletion), or that failed three times, gets 503 with
  `Retry-After` in the service's JSON error format. The replica is replaced.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer chunks and requests (< 3 min)")
    parser.add_argument("--data", type=Path, default=next(
        ((p / "shared" / "data" / "mnist").resolve() for p in REPO.parents
         if (p / "shared" / "data" / "mnist").is_dir()), REPO.parent / "shared" / "data" / "mnist"),
                        help="MNIST IDX directory (default shared/data/mnist beside the "
                             "repository or a parent of it)")
    parser.add_argument("--cpu-hour-price", type=float, default=0.04,
                        help="assumed USD per CPU-hour for the cost table (default 0.04)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite docs/scaling.md from docs/results/ray_scale.json")
    args = parser.parse_args()
    out = DOCS / "results" / "ray_scale.json"
    if args.render:
        (DOCS / "scaling.md").write_text(render(json.loads(out.read_text())))
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node on 127.0.0.1
    import ray
    from ray.cluster_utils import Cluster

    # chunk evaluations per configuration, distinct chunks, requests, warm-up rounds
    tasks, distinct, requests, warmup = (2, 1, 8, 1) if args.quick else (16, 2, 48, 3)
    load_start, started = list(os.getloadavg()), time.perf_counter()
    calibration, test, data = _data(args.data)
    _log("compiling (batch and single packing)...")
    batch_plan = she.compile(she.load(MODEL), calibration=calibration)
    single_plan = she.compile(she.load(MODEL), calibration=calibration, packing="single")
    embedded = embedded_batch(batch_plan, test, distinct)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": HEAD_STORE_BYTES, "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=WORKER_STORE_BYTES)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        batch = batch_scaling(ray, cluster, batch_plan, embedded, tasks)
        serving = serving_scaling(ray, cluster, single_plan, test, requests, warmup,
                                  embedded=not args.quick)
    finally:
        ray.shutdown()
        cluster.shutdown()
    result = {
        "benchmark": "ray_scale",
        "command": "python -m benchmarks.ray_scale" + (" --quick" if args.quick else ""),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "ray": ray.__version__, "data": data,
        "load_average_start": load_start, "load_average": list(os.getloadavg()),
        "nice": os.nice(0), "wall_seconds": time.perf_counter() - started,
        "cpu_hour_price": args.cpu_hour_price,
        "batch": batch, "serving": serving, "cost": cost(batch, args.cpu_hour_price),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    (DOCS / "scaling.md").write_text(render(result))
    print(json.dumps({k: result[k] for k in ("batch", "serving")}, indent=2))


if __name__ == "__main__":
    main()
