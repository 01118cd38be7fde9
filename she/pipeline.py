"""Encrypted prediction end to end, in one process: the path the demo, tests and
benchmarks share. Client and server objects are kept apart exactly as over a network:
only bytes pass between them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .client import Client
from .plan.compiler import Plan
from .server import Server


@dataclass
class Timings:
    """Wall-clock seconds and bytes, summed over batches."""

    keygen: float = 0.0
    encrypt: float = 0.0
    evaluate: float = 0.0
    decrypt: float = 0.0
    upload_bytes: int = 0
    download_bytes: int = 0
    public_context_bytes: int = 0
    batches: list[int] = field(default_factory=list)

    def per_sample(self) -> dict[str, float]:
        n = max(sum(self.batches), 1)
        return {
            "encrypt_ms": 1000 * self.encrypt / n,
            "evaluate_ms": 1000 * self.evaluate / n,
            "decrypt_ms": 1000 * self.decrypt / n,
            "upload_bytes": self.upload_bytes / n,
            "download_bytes": self.download_bytes / n,
        }


def encrypted_predict(plan: Plan, x: np.ndarray, *, batch_size: int | None = None,
                      server: Server | None = None, progress=None) -> tuple[np.ndarray, Timings]:
    """Encrypt ``x``, evaluate it on a server, decrypt; returns outputs and timings.

    ``progress``, if given, is called with the number of samples finished after each batch.
    """
    timings = Timings()
    server = server or Server(plan)
    t = time.perf_counter()
    client = Client(plan.spec())
    public = client.public_context()
    timings.keygen = time.perf_counter() - t
    timings.public_context_bytes = len(public)
    keys = server.load_context(public)
    batch_size = min(batch_size or plan.batch_capacity, plan.batch_capacity)
    outputs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        t0 = time.perf_counter()
        request = client.encrypt(chunk)
        t1 = time.perf_counter()
        response = server.evaluate(keys, request)
        t2 = time.perf_counter()
        outputs.append(client.decrypt_logits(response))
        t3 = time.perf_counter()
        timings.encrypt += t1 - t0
        timings.evaluate += t2 - t1
        timings.decrypt += t3 - t2
        timings.upload_bytes += len(request)
        timings.download_bytes += len(response)
        timings.batches.append(len(chunk))
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(outputs), timings
