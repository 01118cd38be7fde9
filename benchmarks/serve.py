"""Latency, requests per second and memory of ``she serve`` under concurrent load.

Starts ``she serve`` on the shipped demo model (single packing by default: one image per
request, the latency-oriented mode) on 127.0.0.1, registers one session per client, and

* for 1, 8 and 16 concurrent clients sends requests back to back and reports p50/p99
  latency (the HTTP round trip: upload, queue, evaluation, download; requests are
  encrypted beforehand and decrypted afterwards, so the clients' own CPU work does not
  compete with the server's) and requests per second; every prediction is checked
  against the plaintext model;
* repeats the 8-client run on a server with ``--workers 1``, the serialised baseline
  (one evaluation at a time, as with the former global lock); ``--ab ROUNDS`` instead
  compares the two in alternating rounds on servers running side by side;
* soaks the server with ``--soak`` requests from 4 clients, one of which deletes and
  re-registers its session every 100 requests, and samples the server's resident memory
  every 10 requests (plotted to ``docs/results/serve_soak.png``).

Writes ``docs/results/serve.json`` and the results section of ``docs/serving.md``::

    python -m benchmarks.serve [--soak 1000] [--packing single] [--ab ROUNDS]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

import she
from benchmarks.mnist_demo import machine
from she.io import assets

DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = DOCS / "results" / "serve.json"
PLOT = DOCS / "results" / "serve_soak.png"
START, END = "<!-- serve-results:start -->", "<!-- serve-results:end -->"


class Served:
    """``she serve`` on port 0 in a subprocess (the URL is read from its log)."""

    def __init__(self, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.proc = subprocess.Popen([sys.executable, "-m", "she", "serve",
                                      str(assets.demo_model_path()), "--port", "0",
                                      "--rate-limit", "0", *extra],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.url = ""
        for line in self.proc.stderr:
            if match := re.search(r"running on (http://\S+)", line):
                self.url = match.group(1)
                break
        if not self.url:
            raise RuntimeError("she serve did not start")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        self.http = httpx.Client(base_url=self.url, timeout=600)

    def rss(self) -> int:
        """Resident bytes of the server process."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def register(self, client: she.Client) -> str:
        r = self.http.post("/v1/models/mnist_demo/sessions", content=client.public_context())
        r.raise_for_status()
        return r.json()["session"]

    def predict(self, session: str, body: bytes) -> tuple[bytes, float]:
        t = time.perf_counter()
        r = self.http.post(f"/v1/sessions/{session}/predict", content=body)
        r.raise_for_status()
        return r.content, time.perf_counter() - t

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _load(served: Served, clients: list[she.Client], sessions: list[str],
          requests: list[list[bytes]], concurrency: int, per_client: int,
          reference: np.ndarray) -> dict:
    """``concurrency`` clients, ``per_client`` requests each, back to back."""
    latencies: list[float] = []
    answers: dict[tuple[int, int], bytes] = {}

    def client_loop(c: int) -> None:
        for k in range(per_client):
            answers[c, k], latency = served.predict(sessions[c], requests[c][k])
            latencies.append(latency)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    wall = time.perf_counter() - start
    wrong = sum(int(clients[c].decrypt(answers[c, k]).argmax() != reference[k])
                for c, k in answers)
    print(f"  {concurrency:2d} clients: {len(latencies) / wall:.2f} req/s, p50 "
          f"{np.percentile(latencies, 50):.2f} s, wrong {wrong}", file=sys.stderr)
    return {"clients": concurrency, "requests": len(latencies),
            "requests_per_second": len(latencies) / wall,
            "latency_s": {"p50": float(np.percentile(latencies, 50)),
                          "p99": float(np.percentile(latencies, 99)),
                          "max": float(np.max(latencies))},
            "wrong_predictions": wrong}


def run(packing: str, soak: int, per_client: int) -> dict:
    samples, _ = assets.demo_samples()
    model = she.load(assets.demo_model_path())
    n = max(per_client, 16)  # requests made per client (a lone client sends 16)
    reference = model.run_plain(samples[:n]).argmax(1)
    plan = she.compile(model, packing=packing)
    print("making keys for 16 clients", file=sys.stderr)
    clients = [she.Client(plan.spec()) for _ in range(16)]
    requests = [[c.encrypt(samples[k:k + 1]) for k in range(n)] for c in clients]
    result: dict = {"packing": packing, "load": [], "serialised": None}

    served = Served("--packing", packing)
    try:
        sessions = [served.register(c) for c in clients]
        health = served.http.get("/v1/health").json()
        result["workers"] = health["workers"]
        result["bytes"] = {"request": len(requests[0][0]),
                           "public_context": len(clients[0].public_context()),
                           "session_keys": served.http.get("/v1/models/mnist_demo")
                           .json()["session_key_bytes"]}
        for concurrency in (1, 8, 16):
            result["load"].append(_load(served, clients, sessions, requests, concurrency,
                                        max(per_client, 16 // concurrency), reference))
        result["soak"] = _soak(served, clients[:4], sessions[:4], requests, soak, reference)
    finally:
        served.stop()

    served = Served("--packing", packing, "--workers", "1")
    try:
        sessions = [served.register(c) for c in clients[:8]]
        print("serialised baseline (--workers 1):", file=sys.stderr)
        result["serialised"] = _load(served, clients, sessions, requests, 8, per_client,
                                     reference)
    finally:
        served.stop()
    return result


def _soak(served: Served, clients: list[she.Client], sessions: list[str],
          requests: list[list[bytes]], total: int, reference: np.ndarray) -> dict:
    """``total`` requests from the clients in turn (4 at once); the first client deletes
    and re-registers its session every 100 requests; memory sampled every 10."""
    counter = iter(range(total))
    lock = threading.Lock()
    curve: list[tuple[int, int]] = [(0, served.rss())]
    wrong = [0]
    done = [0]

    def loop(c: int) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            k = i % len(requests[c])
            if c == 0 and i % 100 == 99:
                served.http.delete(f"/v1/sessions/{sessions[0]}").raise_for_status()
                sessions[0] = served.register(clients[0])
            answer, _ = served.predict(sessions[c], requests[c][k])
            with lock:
                wrong[0] += int(clients[c].decrypt(answer).argmax() != reference[k])
                done[0] += 1
                if done[0] % 10 == 0:
                    curve.append((done[0], served.rss()))
                if done[0] % 100 == 0:
                    print(f"  soak {done[0]}/{total}: server RSS "
                          f"{curve[-1][1] / 2**20:.0f} MiB", file=sys.stderr)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(loop, range(len(clients))))
    wall = time.perf_counter() - start
    rss = np.array([m for _, m in curve])
    settled = rss[len(rss) // 10:]  # after the first tenth (allocator warm-up)
    return {"requests": total, "clients": len(clients), "seconds": wall,
            "wrong_predictions": wrong[0], "curve": curve,
            "rss_mib": {"start": rss[0] / 2**20, "after_warmup": settled[0] / 2**20,
                        "end": rss[-1] / 2**20, "max": rss.max() / 2**20,
                        "growth_after_warmup": (settled.max() - settled[0]) / 2**20}}


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done, rss = zip(*result["soak"]["curve"], strict=True)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(done, np.array(rss) / 2**20)
    ax.set_xlabel("requests served")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"she serve soak: {result['soak']['requests']} requests, "
                 f"{result['packing']} packing, demo model")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def render(result: dict) -> str:
    m = result["machine"]
    rows = [f"| {r['clients']} | {r['requests']} | {r['requests_per_second']:.2f} | "
            f"{r['latency_s']['p50']:.2f} | {r['latency_s']['p99']:.2f} | "
            f"{r['wrong_predictions']} |" for r in result["load"]]
    s = result["serialised"]
    rows.append(f"| {s['clients']} (`--workers 1`) | {s['requests']} | "
                f"{s['requests_per_second']:.2f} | {s['latency_s']['p50']:.2f} | "
                f"{s['latency_s']['p99']:.2f} | {s['wrong_predictions']} |")
    soak, b = result["soak"], result["bytes"]
    r8 = next(r for r in result["load"] if r["clients"] == 8)
    return f"""{START}
`{result['command']}`, {result['date']} ({m['cores']} cores, {m['cpu']}, shared with
other jobs: 5-minute load average {result['load_average'][0]:.1f} at the start and
{result['load_average'][1]:.1f} at the end; TenSEAL {m['tenseal']}). Demo model,
{result['packing']} packing, server with
`--workers {result['workers']}` (the default: every core) and `--rate-limit 0` (every
client comes from 127.0.0.1). Request {b['request'] / 1024:.0f} KiB, registration upload
{b['public_context'] / 2**20:.1f} MiB, {b['session_keys'] / 2**20:.1f} MiB of keys per
session on the server.

| concurrent clients | requests | requests/s | latency p50 (s) | latency p99 (s) | wrong predictions |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

The `--workers 1` row comes from a second server started after the soak; with the load
of other jobs drifting meanwhile, its ratio to the 8-client row ({r8['requests_per_second'] /
s['requests_per_second']:.2f}x) is no measurement of the design: `--ab` (below) is.

Soak: {soak['requests']} requests from {soak['clients']} clients in {soak['seconds']:.0f} s
(one session deleted and registered again every 100 requests), {soak['wrong_predictions']}
wrong predictions. Server RSS {soak['rss_mib']['start']:.0f} MiB at the start,
{soak['rss_mib']['after_warmup']:.0f} MiB after the first tenth, {soak['rss_mib']['end']:.0f}
MiB at the end; growth after the first tenth at most
{soak['rss_mib']['growth_after_warmup']:.1f} MiB.

![server memory during the soak](results/serve_soak.png)
{END}"""


def ab(rounds: int, packing: str) -> dict:
    """The default server (every core) against ``--workers 1``, in alternating 8-client
    rounds on two servers running side by side, so that a shared machine's load drift
    hits both alike; 2 requests per client per round."""
    samples, _ = assets.demo_samples()
    model = she.load(assets.demo_model_path())
    plan = she.compile(model, packing=packing)
    clients = [she.Client(plan.spec()) for _ in range(8)]
    reference = model.run_plain(samples[:4]).argmax(1)
    requests = [[c.encrypt(samples[k:k + 1]) for k in range(4)] for c in clients]
    servers = {"default": Served("--packing", packing),
               "workers_1": Served("--packing", packing, "--workers", "1")}
    try:
        sessions = {name: [s.register(c) for c in clients] for name, s in servers.items()}
        rates: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(rounds):
            for name, served in servers.items():
                rates[name].append(_load(served, clients, sessions[name], requests, 8, 2,
                                         reference)["requests_per_second"])
    finally:
        for served in servers.values():
            served.stop()
    return {"rounds": rounds, "requests_per_second": rates,
            "ratio_of_medians": float(np.median(rates["default"])
                                      / np.median(rates["workers_1"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packing", choices=["single", "batch"], default="single")
    parser.add_argument("--soak", type=int, default=1000, help="requests of the soak run")
    parser.add_argument("--per-client", type=int, default=4,
                        help="requests per client in the load runs (a lone client sends 16)")
    parser.add_argument("--ab", type=int, metavar="ROUNDS",
                        help="only compare the default server with --workers 1 in ROUNDS "
                             "alternating rounds (printed, not written)")
    args = parser.parse_args()
    if args.ab:
        print(json.dumps(ab(args.ab, args.packing), indent=2))
        return
    load_before = os.getloadavg()[1]
    result = run(args.packing, args.soak, args.per_client)
    result.update(benchmark="serve", machine=machine(),
                  load_average=[load_before, os.getloadavg()[1]],
                  command=f"python -m benchmarks.serve --packing {args.packing} "
                          f"--soak {args.soak} --per-client {args.per_client}",
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    plot(result)
    doc = DOCS / "serving.md"
    text = doc.read_text()
    if START in text and END in text:
        text = text[:text.index(START)] + render(result) + text[text.index(END) + len(END):]
        doc.write_text(text)
    print(json.dumps({k: v for k, v in result.items() if k != "soak"}, indent=2))


if __name__ == "__main__":
    main()
