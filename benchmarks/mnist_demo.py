"""Accuracy, agreement and latency of the shipped demo model on the full MNIST test set.

Writes ``docs/results/mnist_demo.json`` and regenerates ``docs/results.md`` from it::

    python -m benchmarks.mnist_demo --data ../shared/data/mnist [--n 10000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import tenseal

import she
from she.io import assets
from she.io.data import load_idx_dataset
from she.pipeline import encrypted_predict

DOCS = Path(__file__).resolve().parents[1] / "docs"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "tenseal": tenseal.__version__,
            "numpy": np.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "she": she.__version__}


def run(data_dir: str, n: int) -> dict:
    model = she.load(assets.demo_model_path())
    calibration, _ = assets.demo_samples()
    x, y = load_idx_dataset(data_dir, "test")
    x, y = x[:n], y[:n]
    t = time.perf_counter()
    plan = she.compile(model, calibration=calibration)
    compile_s = time.perf_counter() - t
    plain = model.run_plain(x)
    done = [0]

    def progress(k: int) -> None:
        done[0] += k
        print(f"  {done[0]}/{n} images", file=sys.stderr, flush=True)

    enc, timings = encrypted_predict(plan, x, progress=progress)
    per = timings.per_sample()
    return {
        "benchmark": "mnist_demo",
        "command": "python -m benchmarks.mnist_demo --data DIR" + (f" --n {n}" if n != 10000 else ""),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "images": n,
        "plaintext_accuracy": float(np.mean(plain.argmax(1) == y)),
        "encrypted_accuracy": float(np.mean(enc.argmax(1) == y)),
        "agreement": float(np.mean(enc.argmax(1) == plain.argmax(1))),
        "max_abs_logit_error": float(np.abs(enc - plain).max()),
        "predicted_max_error": plan.predicted_error,
        "batches": timings.batches,
        "seconds": {"compile": compile_s, "keygen": timings.keygen,
                    "encrypt": timings.encrypt, "evaluate": timings.evaluate,
                    "decrypt": timings.decrypt},
        "per_image_ms": {k: v for k, v in per.items() if k.endswith("_ms")},
        "bytes": {"upload_per_image": per["upload_bytes"],
                  "download_per_image": per["download_bytes"],
                  "public_context": timings.public_context_bytes},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "plan": {"poly_modulus_degree": plan.params.poly_modulus_degree,
                 "modulus_bits": list(plan.params.modulus_bits),
                 "security_bits": plan.params.security, "depth": plan.depth,
                 "slots": plan.params.slots},
    }


def render(result: dict) -> str:
    m, s, p, b = result["machine"], result["seconds"], result["per_image_ms"], result["bytes"]
    plan = result["plan"]
    return f"""# Results

Every number on this page comes from `docs/results/mnist_demo.json`, written by
`{result['command']}` on {result['date']}
({m['cores']} cores, {m['cpu']}; Python {m['python']}, TenSEAL {m['tenseal']},
numpy {m['numpy']}, onnxruntime {m['onnxruntime']}).

## Shipped demo model, MNIST test set, CKKS batch packing

Model: `she/assets/mnist_demo.onnx` (conv 5×5×5 stride 2 → quadratic → dense 845→100 →
quadratic → dense 100→10), trained by `python -m converters.train_demo`.
Parameters: N={plan['poly_modulus_degree']} ({plan['slots']} slots per ciphertext), modulus
bits {plan['modulus_bits']}, {plan['security_bits']}-bit security, depth {plan['depth']}.

| metric | value |
| --- | --- |
| images | {result['images']} (batches {result['batches']}) |
| plaintext accuracy (onnxruntime) | {result['plaintext_accuracy']:.2%} |
| encrypted accuracy | {result['encrypted_accuracy']:.2%} |
| argmax agreement with plaintext | {result['agreement']:.2%} |
| max \\|logit error\\| (predicted bound) | {result['max_abs_logit_error']:.3g} \
({result['predicted_max_error']:.3g}) |
| encrypt, per image (amortised) | {p['encrypt_ms']:.2f} ms |
| server evaluation, per image (amortised) | {p['evaluate_ms']:.2f} ms |
| decrypt, per image (amortised) | {p['decrypt_ms']:.3f} ms |
| total encrypt / evaluate / decrypt | {s['encrypt']:.1f} s / {s['evaluate']:.1f} s / \
{s['decrypt']:.2f} s |
| upload / download per image | {b['upload_per_image'] / 1024:.1f} KiB / \
{b['download_per_image'] / 1024:.2f} KiB |
| public context (parameters + seeded relinearisation keys) | {b['public_context'] / 2**20:.1f} MiB |
| peak resident memory | {result['peak_rss_mb']:.0f} MiB |

Batch packing puts one image per slot: a request of up to {plan['slots']} images costs the
server the same time as a request of one, so per-image figures are for full batches.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="MNIST IDX directory")
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--out", default=str(DOCS / "results" / "mnist_demo.json"))
    args = parser.parse_args()
    result = run(args.data, args.n)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    (DOCS / "results.md").write_text(render(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
