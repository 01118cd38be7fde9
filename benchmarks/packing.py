"""Single packing (one image per ciphertext, lowest latency) on real MNIST test images.

Measures, per image: client encryption, server evaluation (p50 / p90), decryption, upload
and download bytes, the public evaluation keys (relinearisation + the plan's Galois keys),
accuracy and agreement with the plaintext model (onnxruntime). Writes
``docs/results/packing.json`` and regenerates ``docs/packing.md`` from it::

    python -m benchmarks.packing --data ../shared/data/mnist [--n 100] [--model M.onnx]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import she
from benchmarks.mnist_demo import machine
from she.io import assets
from she.io.data import load_idx_dataset

DOCS = Path(__file__).resolve().parents[1] / "docs"


def run(data_dir: str, n: int, model_path: str | None) -> dict:
    """Compile the model for single packing and evaluate ``n`` test images one by one."""
    path = model_path or str(assets.demo_model_path())
    model = she.load(path)
    train_x, _ = load_idx_dataset(data_dir, "train")
    x, y = load_idx_dataset(data_dir, "test")
    x, y = x[:n], y[:n]
    started = time.perf_counter()
    plan = she.compile(model, calibration=train_x[:1000], packing="single")
    compile_s = time.perf_counter() - started
    plain = model.run_plain(x)
    server = she.Server(plan)
    client = she.Client(plan.spec())
    started = time.perf_counter()
    context = client.public_context()
    keygen_s = time.perf_counter() - started
    keys = server.load_context(context)
    stages: dict[str, list[float]] = {"encrypt": [], "evaluate": [], "decrypt": []}
    upload = download = 0
    out = np.empty((n, plan.n_outputs))
    for i in tqdm(range(n), desc="single packing", unit="img", file=sys.stderr):
        t0 = time.perf_counter()
        request = client.encrypt(x[i:i + 1])
        t1 = time.perf_counter()
        response = server.evaluate(keys, request)
        t2 = time.perf_counter()
        out[i] = client.decrypt(response)[0]
        t3 = time.perf_counter()
        stages["encrypt"].append(t1 - t0)
        stages["evaluate"].append(t2 - t1)
        stages["decrypt"].append(t3 - t2)
        upload, download = len(request), len(response)
    # The first evaluation also encodes the plan's diagonals (cached afterwards).
    warm = {k: v[1:] if len(v) > 1 else v for k, v in stages.items()}
    describe = plan.describe()
    return {
        "command": "python -m benchmarks.packing " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": Path(path).name,
        "images": n,
        "plaintext_accuracy": float(np.mean(plain.argmax(1) == y)),
        "encrypted_accuracy": float(np.mean(out.argmax(1) == y)),
        "agreement": float(np.mean(out.argmax(1) == plain.argmax(1))),
        "max_abs_logit_error": float(np.abs(out - plain).max()),
        "predicted_max_error": plan.predicted_error,
        "latency_ms": {k: {"p50": 1e3 * float(np.percentile(v, 50)),
                           "p90": 1e3 * float(np.percentile(v, 90))} for k, v in warm.items()},
        "first_evaluate_ms": 1e3 * stages["evaluate"][0],
        "upload_bytes": upload,
        "download_bytes": download,
        "public_key_bytes": len(context),
        "keygen_s": keygen_s,
        "compile_s": compile_s,
        "poly_modulus_degree": plan.params.poly_modulus_degree,
        "modulus_bits": list(plan.params.modulus_bits),
        "security_bits": plan.params.security,
        "depth": plan.depth,
        "rotations": describe["rotations"],
        "galois_steps": describe["galois_steps"],
        "threads": 1,
    }


def write_markdown(result: dict, path: Path) -> None:
    lat = result["latency_ms"]
    m = result["machine"]
    lines = [
        "# Single packing: one encrypted image, lowest latency",
        "",
        f"Generated from `docs/results/packing.json` by `{result['command']}` on "
        f"{result['date']} ({m['cores']} cores, {m['cpu']}; TenSEAL {m['tenseal']}).",
        "",
        f"Model `{result['model']}`, {result['images']} MNIST test images, each encrypted "
        "in its own ciphertext and evaluated alone.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| plaintext accuracy (onnxruntime) | {result['plaintext_accuracy']:.2%} |",
        f"| encrypted accuracy | {result['encrypted_accuracy']:.2%} |",
        f"| agreement with plaintext | {result['agreement']:.2%} |",
        f"| max abs logit error (predicted bound) | {result['max_abs_logit_error']:.2e} "
        f"({result['predicted_max_error']:.2e}) |",
        f"| server evaluation p50 / p90 | {lat['evaluate']['p50']:.0f} / "
        f"{lat['evaluate']['p90']:.0f} ms |",
        f"| first evaluation (encodes the diagonals once) | {result['first_evaluate_ms']:.0f} ms |",
        f"| client encrypt / decrypt p50 | {lat['encrypt']['p50']:.1f} / "
        f"{lat['decrypt']['p50']:.1f} ms |",
        f"| upload / download per image | {result['upload_bytes'] / 1024:.0f} KiB / "
        f"{result['download_bytes'] / 1024:.0f} KiB |",
        f"| public keys (seeded relinearisation + Galois keys) | "
        f"{result['public_key_bytes'] / 2 ** 20:.1f} MiB |",
        f"| parameters | N={result['poly_modulus_degree']}, modulus bits "
        f"{result['modulus_bits']}, {result['security_bits']}-bit security, depth "
        f"{result['depth']} |",
        f"| rotations per image / Galois steps | {result['rotations']} / "
        f"{result['galois_steps']} |",
        f"| server threads | {result['threads']} |",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="directory with the MNIST IDX files")
    parser.add_argument("--n", type=int, default=100, help="test images (default 100)")
    parser.add_argument("--model", help="HE-friendly ONNX model (default: the shipped demo)")
    args = parser.parse_args(argv)
    result = run(args.data, args.n, args.model)
    out = DOCS / "results" / "packing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, DOCS / "packing.md")
    print(json.dumps({k: result[k] for k in ("encrypted_accuracy", "agreement", "latency_ms",
                                              "upload_bytes", "public_key_bytes")}, indent=2))


if __name__ == "__main__":
    main()
