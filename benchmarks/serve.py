"""Requests per second and predict latency of ``she serve`` over loopback.

Starts ``she serve`` on the shipped demo model (127.0.0.1, a free port), then sends
``--requests`` encrypted predictions from ``--clients`` concurrent clients, each request
carrying ``--batch`` images. Writes ``docs/results/serve.json`` and ``docs/serving.md``::

    python -m benchmarks.serve [--requests 6] [--clients 2] [--batch 1]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from she import assets
from she.remote import RemoteClient

from .mnist_demo import machine

DOCS = Path(__file__).resolve().parents[1] / "docs"
COLUMNS = ("command", "date", "images / request", "clients", "requests/s", "images/s",
           "latency p50 / p90 (s)", "request", "response", "public context")
HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(requests: int, clients: int, batch: int) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "she", "serve",
                             str(assets.demo_model_path()), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        samples, _ = assets.demo_samples()
        x = np.resize(samples, (max(batch * requests, len(samples)), *samples.shape[1:]))
        keydir = tempfile.mkdtemp()
        remotes = [RemoteClient(url, "mnist_demo", key_dir=Path(keydir) / str(i))
                   for i in range(clients)]
        registration = []
        for r in remotes:
            t = time.perf_counter()
            r._register()
            registration.append(time.perf_counter() - t)
        upload = len(remotes[0].client.encrypt(x[:batch]))
        latencies: list[float] = []

        def one(i: int) -> float:
            remote = remotes[i % clients]
            t = time.perf_counter()
            remote.predict(x[i * batch:(i + 1) * batch])
            return time.perf_counter() - t

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            for i, latency in enumerate(pool.map(one, range(requests))):
                latencies.append(latency)
                print(f"  request {i + 1}/{requests}: {latency:.2f}s", file=sys.stderr)
        wall = time.perf_counter() - start
        response = remotes[0]._request(
            "POST", f"/v1/sessions/{remotes[0]._session()}/predict",
            remotes[0].client.encrypt(x[:batch]))
        download = len(response)
        context = len(remotes[0].client.public_context())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {
        "benchmark": "serve",
        "command": f"python -m benchmarks.serve --requests {requests} --clients {clients} "
                   f"--batch {batch}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "requests": requests, "clients": clients, "images_per_request": batch,
        "requests_per_second": requests / wall,
        "images_per_second": requests * batch / wall,
        "latency_s": {"p50": float(np.percentile(latencies, 50)),
                      "p90": float(np.percentile(latencies, 90)),
                      "max": float(np.max(latencies))},
        "registration_s": float(np.mean(registration)),
        "bytes": {"request": upload, "response": download, "public_context": context},
    }


def render(runs: list[dict]) -> str:
    m = runs[-1]["machine"]
    rows = []
    for r in runs:
        lat, b = r["latency_s"], r["bytes"]
        rows.append(
            f"| `{r['command']}` | {r['date']} | {r['images_per_request']} | {r['clients']} | "
            f"{r['requests_per_second']:.3f} | {r['images_per_second']:.2f} | "
            f"{lat['p50']:.1f} / {lat['p90']:.1f} | {b['request'] / 2**20:.0f} MiB | "
            f"{b['response'] / 2**20:.2f} MiB | {b['public_context'] / 2**20:.1f} MiB |")
    table = "\n".join(rows)
    return f"""# Serving

Numbers from `docs/results/serve.json`, one row per run of the command shown
({m['cores']} cores, {m['cpu']}; TenSEAL {m['tenseal']}). Each run starts `she serve` on the
shipped demo model on 127.0.0.1 and sends encrypted predictions from concurrent clients.
Latency is measured by the client: encrypt, upload, server evaluation, download, decrypt.

{HEADER}
{table}

Batch packing puts one image per slot, so a request costs the server the same for 1 or
4096 images and its upload is the same size (one ciphertext per pixel): it is built for
throughput. Low latency for a single image is the job of a single-image packing, which
this release does not have yet.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    result = run(args.requests, args.clients, args.batch)
    out = DOCS / "results" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    runs = [r for r in runs if r["command"] != result["command"]] + [result]
    out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    (DOCS / "serving.md").write_text(render(runs))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
