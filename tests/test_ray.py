"""Scale-out on Ray (the she[ray] extra), on a real local Ray cluster on 127.0.0.1: a head
node with no CPU (the driver, the attempt ledger, Serve's controller and the session actor)
and worker nodes of one CPU each, where every HE task and replica runs.

The Serve tests run test_service's own tests against the Ray Serve application. The model
is test_service's depth-1 7x7 MNIST model (49 ciphertexts per request), so that
a chunk costs a fraction of a second and the whole module a couple of CPU minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

import she
from she.errors import DataError

# Every node on this machine's loopback address (read by Ray when it is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'she[ray]')")

import test_service  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from test_service import local  # noqa: E402,F401  (the module-scoped fixture)

from she.serve import ray_batch, ray_serve  # noqa: E402
from she.serve.remote import RemoteClient  # noqa: E402
from she.serve.service import ServiceConfig  # noqa: E402

#: Object store per node: a few small requests in flight.
STORE_BYTES = 150 * 1024 * 1024
#: Fast failure detection, so that a killed node is noticed in about a second.
SYSTEM_CONFIG = {"health_check_period_ms": 300, "health_check_failure_threshold": 3,
                 "health_check_initial_delay_ms": 0}


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": STORE_BYTES, "include_dashboard": False,
        "_system_config": SYSTEM_CONFIG})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.workers = workers
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def plan(small_model):
    return she.compile(she.load(small_model[0]))


@pytest.fixture(scope="module")
def plain(small_model):
    path, x, _ = small_model
    return she.load(path).run_plain(x)


def test_ray_tasks_return_what_the_local_server_returns(cluster, plan, small_model):
    """The same results as the local server, up to the fresh noise of the re-randomisation
    that makes every response differ by design (and that the Ray workers apply too)."""
    _, x, _ = small_model
    client = she.Client(plan.spec())
    server = she.Server(plan, workers=1)
    keys = server.load_context(client.public_context())
    requests = [client.encrypt(x[i:i + 8]) for i in range(0, 24, 8)]
    evaluator = ray_batch.RayEvaluator(plan, client.public_context())
    try:
        workers = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")}
        assert sorted(evaluator.prepare_workers()) == sorted(workers)
        stored = ray_batch.put_request(requests[0])  # stored once, submitted by reference
        refs = [evaluator.submit(i, stored if i == 0 else r) for i, r in enumerate(requests)]
        results = [evaluator.result(ref, i) for i, ref in enumerate(refs)]
        for result, request in zip(results, requests, strict=True):
            here = server.evaluate(keys, request)
            assert result.message != here  # re-randomised, by Ray's workers as here
            ray_logits, local_logits = client.decrypt(result.message), client.decrypt(here)
            assert np.array_equal(ray_logits.argmax(1), local_logits.argmax(1))
            assert np.abs(ray_logits - local_logits).max() < plan.predicted_error
        assert all(r.cpu_seconds > 0 and r.seconds > 0 and r.node in ray_batch.alive_nodes()
                   for r in results)
        with pytest.raises(she.FormatError, match="bad magic"):  # a SHE error stays one
            evaluator.result(evaluator.submit(9, b"junk" * 10), 9)
    finally:
        evaluator.close()


def test_batch_scores_in_input_order_and_resumes(cluster, plan, plain, small_model, tmp_path):
    _, x, _ = small_model
    out = tmp_path / "run"
    report = ray_batch.score(plan, x[:40], out, chunk_size=16, progress=False)
    assert (report.chunks, report.evaluated_chunks, report.skipped_chunks) == (3, 3, 0)
    assert report.retries == 0 and report.lost_nodes == []
    logits = np.load(out / "logits.npy")
    assert logits.shape == (40, 10)
    assert np.abs(logits - plain[:40]).max() < plan.predicted_error
    assert np.array_equal(np.load(out / "predictions.npy"), plain[:40].argmax(1))
    # a rerun skips everything; a lost chunk file is the only one evaluated again
    again = ray_batch.score(plan, x[:40], out, chunk_size=16, progress=False)
    assert (again.evaluated_chunks, again.skipped_chunks) == (0, 3)
    (out / "chunks" / "000001.npy").unlink()
    again = ray_batch.score(plan, x[:40], out, chunk_size=16, progress=False)
    assert (again.evaluated_chunks, again.skipped_chunks) == (1, 2)
    assert np.abs(np.load(out / "logits.npy") - plain[:40]).max() < plan.predicted_error
    # other inputs or another chunk size are refused, not mixed in
    with pytest.raises(DataError, match="another run.*chunk_size"):
        ray_batch.score(plan, x[:40], out, chunk_size=8, progress=False)
    with pytest.raises(DataError, match="another run.*inputs"):
        ray_batch.score(plan, x[1:41], out, chunk_size=16, progress=False)


def test_node_killed_mid_run_nothing_lost(cluster, plan, plain, small_model, tmp_path):
    """A worker node is killed (no graceful shutdown) in the middle of a run: what it was
    running, and its finished results not yet read, are evaluated again elsewhere."""
    _, x, _ = small_model
    spare = cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES)
    cluster.wait_for_nodes()
    nodes = {n.node_id: n for n in [*cluster.workers, spare]}
    killed: list[str] = []
    written: list[int] = []

    def on_chunk(index: int, node: str) -> None:
        """Kill a node that has started a chunk not written yet. Results are read only
        between these calls, so that chunk is either still running there or finished
        with its result in that node's object store, which dies with it."""
        written.append(index)
        if killed:
            return
        ledger = ray.get_actor(next(name for name in ray.util.list_named_actors()
                                    if name.startswith(ray_batch.LEDGER_PREFIX)))
        busy = [n for i, n in ray.get(ledger.attempts.remote()) if i not in written]
        if busy:
            killed.append(busy[0])
            cluster.remove_node(nodes[busy[0]], allow_graceful=False)

    report = ray_batch.score(plan, x[:64], tmp_path / "run", chunk_size=8, max_in_flight=8,
                             progress=False, on_chunk=on_chunk)
    cluster.workers = [n for n in cluster.workers if n.node_id not in killed]
    if len(cluster.workers) < 2:
        cluster.workers.append(spare)
    assert sorted(written) == list(range(8))  # every chunk written exactly once
    assert report.lost_nodes == killed
    assert report.retries >= 1, report
    assert sum(report.chunks_per_node.values()) == 8
    logits = np.load(tmp_path / "run" / "logits.npy")
    assert np.abs(logits - plain[:64]).max() < plan.predicted_error
    assert "1 node lost" in report.summary()


def test_a_node_the_cluster_has_not_yet_seen_die_is_still_reported_lost(monkeypatch):
    """The end-of-run report waits (boundedly) for the cluster to notice the death of a node
    whose chunk had to be retried: health checks take seconds, and the run may end first
    (the cause of an intermittent failure of the test above). A retry on the same node (a
    worker process that died) is not waited for."""
    calls = []

    def alive():  # node "b" is noticed dead on the third look
        calls.append(1)
        return {"a", "c"} | ({"b"} if len(calls) < 3 else set())

    monkeypatch.setattr(ray_batch, "alive_nodes", alive)
    attempts = [(0, "a"), (1, "b"), (2, "c"), (1, "c")]  # chunk 1 retried elsewhere
    assert ray_batch.lost_nodes({"a", "b", "c"}, attempts) == ["b"] and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(ray_batch, "alive_nodes", lambda: calls.append(1) or {"a", "b"})
    assert ray_batch.lost_nodes({"a", "b"}, [(0, "a"), (0, "a")]) == [] and len(calls) == 1


def test_batch_command(cluster, small_model, plain, tmp_path, capsys):
    """``she batch`` on the connected cluster: input order, resume, JSON report."""
    from she.cli import main

    path, x, _ = small_model
    np.save(tmp_path / "x.npy", x[:20])
    args = ["batch", str(path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "out"),
            "--chunk-size", "8", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["chunks"], report["evaluated_chunks"], report["retries"]) == (3, 3, 0)
    assert np.array_equal(np.load(report["predictions"]), plain[:20].argmax(1))
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["evaluated_chunks"], report["skipped_chunks"]) == (0, 3)
    assert main(["serve", str(path), "--replicas", "2", "--json"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().out


def test_batch_command_joins_a_cluster_by_address(cluster, small_model, plain, tmp_path):
    """``she batch --ray ADDRESS`` from another process: a second driver on the cluster."""
    path, x, _ = small_model
    np.save(tmp_path / "x.npy", x[:12])
    out = subprocess.run(
        [sys.executable, "-m", "she", "batch", str(path), str(tmp_path / "x.npy"), "-o",
         str(tmp_path / "out"), "--ray", cluster.address, "--json"],
        capture_output=True, text=True, check=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(test_service.REPO)})
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert (report["chunks"], report["cluster_cpus"]) == (1, len(cluster.workers))
    assert np.array_equal(np.load(report["predictions"]), plain[:12].argmax(1))


# -- Ray Serve ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(cluster, plan):
    """The SHE service as a Ray Serve application with two replicas (one per worker node),
    configured as test_service's server (API key, 12 sessions, 64 MiB bodies)."""
    from ray import serve

    port = test_service._free_port()
    config = ServiceConfig(api_keys=(test_service.API_KEY,), max_sessions=12,
                           max_body_bytes=64 * 1024 * 1024)
    ray_serve.start([plan], config, host="127.0.0.1", port=port, replicas=2)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}")
    ray_serve.stop()
    serve.shutdown()


# The service's own tests, run against the Ray Serve application: same paths, wire format,
# errors and API key; the plain-TenSEAL client of docs/http-api.md works unchanged.

def test_serve_answers_the_plain_tenseal_client_from_the_docs(served, small_model, local,  # noqa: F811
                                                              tmp_path):
    test_service.test_plain_tenseal_client_from_docs(served, small_model, local, tmp_path)


def test_serve_answers_she_predict(served, small_model, mnist_dir, tmp_path, capsys):
    test_service.test_predict_command_with_png_and_idx(served, small_model, mnist_dir, tmp_path,
                                                       capsys)


def test_serve_gives_the_same_errors(served, small_model, tmp_path):
    test_service.test_bad_input_gets_4xx_never_500(served, small_model, tmp_path)
    test_service.test_secret_key_upload_is_refused(served, tmp_path)


def test_serve_checks_key_and_size_before_reading_a_body(served):
    """The front answers a wrong API key (401) and an oversized Content-Length (413) while
    the body is still being sent: it reads none of it first."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(served.url)
    for key, length, status in (("wrong", 1000, 401), (test_service.API_KEY, 1 << 40, 413)):
        with socket.create_connection((url.hostname, url.port), timeout=60) as s:
            s.sendall(f"POST /v1/sessions/nope/predict HTTP/1.1\r\nHost: {url.netloc}\r\n"
                      f"X-API-Key: {key}\r\nContent-Length: {length}\r\n\r\n".encode()
                      + b"\0" * 10)  # then nothing more: the answer must not wait for it
            head = s.recv(65536).decode("latin-1")
        assert head.startswith(f"HTTP/1.1 {status}"), head
        assert '"detail"' in head or "application/json" in head, head


def test_serve_eight_concurrent_clients_on_two_replicas(served, small_model, local,  # noqa: F811
                                                        tmp_path):
    test_service.test_eight_concurrent_clients(served, small_model, local, tmp_path)


def _replicas() -> list[tuple[str, str]]:
    """The HE replicas (not the front): (actor name, namespace)."""
    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if "SERVE_REPLICA" in a["name"] and "#SheService#" in a["name"]]


def _front_stats() -> dict[str, int]:
    from ray import serve

    return serve.get_deployment_handle("SheFront", ray_serve.APP_NAME).stats.remote().result()


def test_replica_killed_under_load_answers_are_right_or_503(served, plan, plain, small_model,
                                                           tmp_path):
    """Issue #20: one of the two HE replicas is killed (no graceful shutdown) while four
    clients keep sending requests on one session. Every request is answered (no hang, none
    lost), never with a 500: the requests the killed replica was running are sent again by
    the front to the other replica (an evaluation is a pure function of the ciphertexts and
    the keys), or answered with a retryable 503 (JSON, Retry-After); every 200 is right; a
    503, sent again once, is answered rightly; the replica is replaced and the service is
    whole again afterwards."""
    import concurrent.futures
    import threading

    _, x, _ = small_model
    remote = RemoteClient(served.url, "small", api_key=test_service.API_KEY, key_dir=tmp_path)
    remote.predict(x[:8])  # registers the session (every replica can load it)
    path = f"/v1/sessions/{remote._session()}/predict"
    threads, per_thread = 4, 5
    requests = [remote.client.encrypt(x[8 * i:8 * i + 8]) for i in range(threads)]
    deadline = time.monotonic() + 45
    first_answer = threading.Event()
    retried_before = _front_stats()["retried"]

    def post(i: int) -> httpx.Response:
        return httpx.post(served.url + path, content=requests[i], timeout=40,
                          headers={"X-API-Key": test_service.API_KEY})

    def client(i: int) -> list[tuple[httpx.Response, httpx.Response]]:
        """(first answer, final answer) of each of this client's requests."""
        out = []
        for _ in range(per_thread):
            if time.monotonic() > deadline:
                break
            first = final = post(i)
            first_answer.set()
            if first.status_code == 503:  # retryable: once more, then it must be answered
                time.sleep(float(first.headers["Retry-After"]))
                final = post(i)
            out.append((first, final))
        return out

    old = _replicas()
    assert len(old) == 2
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(client, i) for i in range(threads)]
        assert first_answer.wait(40)  # requests are in flight on both replicas now
        name, namespace = old[0]
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        _, pending = concurrent.futures.wait(futures, timeout=60)
        assert not pending, "a client hung"
    results = [f.result() for f in futures]
    firsts = [first.status_code for out in results for first, _ in out]
    assert sum(len(out) == per_thread for out in results) == threads, firsts  # none lost
    for out in results:
        for first, _ in out:
            assert first.status_code in (200, 503), (first.status_code, first.text[:300])
            if first.status_code == 503:
                assert first.json()["detail"] and int(first.headers["Retry-After"]) >= 1
    # the kill hit requests in flight, and the front sent them again
    assert _front_stats()["retried"] > retried_before, firsts
    for i, out in enumerate(results):
        for _, final in out:
            assert final.status_code == 200, (firsts, final.status_code, final.text[:200])
            logits = remote.client.decrypt(final.content)
            assert np.abs(logits - plain[8 * i:8 * i + 8]).max() < plan.predicted_error
            assert test_service._agree(logits, plain[8 * i:8 * i + 8], plan.predicted_error)
    # Serve replaces the killed replica; then the service answers as before
    wait = time.monotonic() + 60
    while (len(_replicas()) < 2 or old[0] in _replicas()) and time.monotonic() < wait:
        time.sleep(0.5)
    assert len(_replicas()) == 2 and old[0] not in _replicas(), _replicas()
    for i in range(2):
        r = post(i)
        assert r.status_code == 200, r.text
        logits = remote.client.decrypt(r.content)
        assert np.abs(logits - plain[8 * i:8 * i + 8]).max() < plan.predicted_error
    remote.close()


def test_sessions_survive_replica_restart(served, plain, small_model, tmp_path):
    _, x, _ = small_model
    remote = RemoteClient(served.url, "small", api_key=test_service.API_KEY, key_dir=tmp_path)
    first = remote.predict(x[:8])
    session = remote._session()
    old = _replicas()
    assert len(old) == 2
    for name, namespace in old:  # every replica dies; Serve starts new ones
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    request = remote.client.encrypt(x[:8])
    deadline, seen = time.monotonic() + 120, []
    while True:  # while no replica is up, the proxy answers with a retryable 5xx
        r = test_service._http(served, "POST", f"/v1/sessions/{session}/predict", content=request)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        seen.append(r.status_code)
        assert r.status_code == 503, (seen, r.text)
        time.sleep(0.5)
    assert r.status_code == 200, r.text  # the same session, on a new replica
    assert not set(old) & set(_replicas())
    again = remote.client.decrypt(r.content)
    assert np.abs(again - plain[:8]).max() < 2 * np.abs(first - plain[:8]).max() + 1e-3
    assert np.array_equal(again.argmax(1), first.argmax(1))
    health = test_service._http(served, "GET", "/v1/health").json()
    assert health["sessions"] >= 1
    remote.close()
    r = test_service._http(served, "POST", f"/v1/sessions/{session}/predict", content=request)
    assert r.status_code == 404  # deleted through one replica, gone for all


def test_shared_store_binds_owners_caps_and_reloads_evicted_keys(cluster, plan):
    """The store's interface as the service uses it: the table keeps the owner and the cap
    (StoreFull 503), the replica's cache keeps the key-memory budget (StoreFull 507 for keys
    that never fit; evicted keys are loaded again from the table's message)."""
    from she.serve.service import StoreFull, UnknownSession

    key_bytes = she.Server(plan).session_key_bytes
    config = ServiceConfig(max_sessions=2, max_key_memory=key_bytes)  # one session's keys
    table = ray_serve.session_table(config, "store-test")
    try:
        server = ray_serve._ReplicaServer(plan, workers=1)
        store = ray_serve.SharedSessionStore(table, {"small": server}, config)
        message = she.Client(plan.spec()).public_context()
        with pytest.raises(StoreFull) as full:
            store.check_fits(key_bytes + 1)
        assert full.value.status == 507
        first = store.put("small", server.load_context(message), key_bytes, "alice")
        second = store.put("small", server.load_context(message), key_bytes, "bob")
        assert len(store) == 2 and store.key_bytes == key_bytes and store.evicted == 1
        with pytest.raises(StoreFull) as full:  # the table's cap, not the cache's budget
            store.put("small", server.load_context(message), key_bytes, "alice")
        assert full.value.status == 503
        with pytest.raises(UnknownSession):  # another key's session
            store.get(first, "bob")
        session = store.get(first, "alice")  # evicted here, loaded again from the table
        assert (session.model, session.owner, session.key_bytes) == ("small", "alice", key_bytes)
        assert session.keys.public is not None and store.evicted == 2
        with pytest.raises(UnknownSession):
            store.delete(second, "alice")
        store.delete(second, "bob")
        with pytest.raises(UnknownSession):
            store.get(second, "bob")
        assert len(store) == 1
    finally:
        ray.kill(table)
