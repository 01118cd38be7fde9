"""A CIFAR-sized network run encrypted on random inputs (no CIFAR-10 copy is reachable).

The network is HE-friendly with random power-of-two weights (the form ``she convert``
writes): a 3x32x32 input, three 3x3 convolutions with x^2 activations, a residual block
(identity skip across an activation), 2x2 average pooling and a dense layer::

    conv 3->C (stride 2) -> x^2 -> conv C->C -> x^2 -> conv C->C (+ skip) -> x^2
        -> avgpool 2x2 -> dense -> 10

It is compiled (batch packing, calibrated on random inputs), run encrypted on other random
inputs, and compared with onnxruntime on the same inputs. Accuracy is *not* measured: the
weights are random and there is no CIFAR-10 data here. Single packing runs chains only, so
this residual network has no single-packing row. Writes ``docs/results/cifar_sized.json``::

    python -m benchmarks.cifar_sized [--channels 8] [--batch 4096] [--scale-bits 26]

With the compiler's defaults the skip is aligned by an early rescale and the plan fits
N=8192 (``she inspect`` predicts its memory: about 3.8 GiB for the server at 8 channels,
5 GiB at 16, plus the 1.5 GiB request).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import she
from she.pipeline import encrypted_predict

from .mnist_demo import machine

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
#: The SHE paper's CIFAR-10 row (TFHE, Lou & Jiang, NeurIPS 2019): seconds per image.
SHE_CIFAR_LATENCY_S = 2258.0


def network(channels: int = 16, seed: int = 0) -> she.Model:
    """The CIFAR-sized residual network with random power-of-two weights."""
    rng = np.random.default_rng(seed)

    def pow2(shape: tuple[int, ...], scale: float) -> np.ndarray:
        w = rng.normal(0, scale, shape)
        return np.sign(w) * 2.0 ** np.round(np.log2(np.clip(np.abs(w), scale / 8, None)))

    c = channels
    inits = {"w0": pow2((c, 3, 3, 3), 0.3), "b0": rng.normal(0, 0.1, c),
             "w1": pow2((c, c, 3, 3), 0.5 / c), "w2": pow2((c, c, 3, 3), 0.2 / c),
             "fc": pow2((10, c * 8 * 8), 0.5 / c)}
    pads = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], strides=[2, 2], **pads),
        helper.make_node("Mul", ["c0", "c0"], ["s0"]),
        helper.make_node("Conv", ["s0", "w1"], ["c1"], **pads),
        helper.make_node("Mul", ["c1", "c1"], ["s1"]),
        helper.make_node("Conv", ["s1", "w2"], ["c2"], **pads),
        helper.make_node("Add", ["c2", "s0"], ["r"]),
        helper.make_node("Mul", ["r", "r"], ["s2"]),
        helper.make_node("AveragePool", ["s2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["out"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cifar_sized",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return she.model.from_proto(proto, "cifar_sized")


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process (client and server; the forked workers share
    its pages copy-on-write)."""
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run(channels: int, batch: int | None, seed: int, scale_bits: int | None = None,
        weight_bits: int | None = None) -> dict[str, Any]:
    model = network(channels, seed)
    rng = np.random.default_rng(seed + 1)
    calibration = rng.uniform(0, 1, (64, 3, 32, 32))
    print("compiling", file=sys.stderr)
    started = time.perf_counter()
    plan = she.compile(model, calibration=calibration, scale_bits=scale_bits,
                       weight_bits=weight_bits)
    compile_s = time.perf_counter() - started
    batch = batch or plan.batch_capacity  # the cost of a request does not depend on it
    x = rng.uniform(0, 1, (batch, 3, 32, 32))
    describe = plan.describe()
    print(f"N={plan.params.poly_modulus_degree}, modulus bits {list(plan.params.modulus_bits)}; "
          f"encrypting {batch} inputs ({plan.n_inputs} ciphertexts)", file=sys.stderr)
    cpu = _cpu_seconds()
    out, timings = encrypted_predict(plan, x)
    cpu = _cpu_seconds() - cpu
    plain = model.run_plain(x)
    return {
        "command": ("python -m benchmarks.cifar_sized " + shlex.join(sys.argv[1:])).strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "network": (f"3x32x32 -> conv 3->{channels} (3x3, stride 2) -> x^2 -> conv "
                    f"{channels}->{channels} -> x^2 -> conv {channels}->{channels} + identity "
                    "skip -> x^2 -> avgpool 2x2 -> dense -> 10; random power-of-two weights"),
        "accuracy": "not measured (random weights, no CIFAR-10 data on this machine)",
        "inputs": "random uniform [0, 1]",
        "packing": "batch",
        "single_packing": "not available: single packing runs chains only, this network has a "
                          "skip connection",
        "batch": batch,
        "compile_s": compile_s,
        "keygen_s": timings.keygen,
        "encrypt_s": timings.encrypt,
        "evaluate_s": timings.evaluate,
        "decrypt_s": timings.decrypt,
        "evaluate_per_input_s": timings.evaluate / batch,
        "cpu_s": cpu,
        "load_average_1min": os.getloadavg()[0],
        "upload_bytes": timings.upload_bytes,
        "download_bytes": timings.download_bytes,
        "peak_rss_bytes": _peak_rss_bytes(),
        "predicted_server_bytes": describe["estimated_bytes"]["server_memory_per_request"],
        "agreement": float(np.mean(out.argmax(1) == plain.argmax(1))),
        "max_abs_logit_error": float(np.abs(out - plain).max()),
        "predicted_max_error": plan.predicted_error,
        "max_abs_logit": float(np.abs(plain).max()),
        "poly_modulus_degree": plan.params.poly_modulus_degree,
        "modulus_bits": list(plan.params.modulus_bits),
        "security_bits": plan.params.security,
        "depth": plan.depth,
        "first_layer_units": int(plan.layers[0].weights.shape[0]),
        "input_ciphertexts": plan.n_inputs,
    }


def markdown(result: dict[str, Any]) -> list[str]:
    """The benchmark report's section for this row (beside the SHE paper's CIFAR-10 row)."""
    gib = 2 ** 30
    return [
        "## CIFAR-sized network (random inputs; accuracy not measured)", "",
        f"Measured by `{result['command']}` on {result['date']} "
        f"({result['machine']['cores']} cores). {result['network']}. "
        "No CIFAR-10 copy is reachable from this machine and the weights are random, so "
        "**the accuracy column is not measured**; the encrypted outputs are compared with "
        "onnxruntime on the same random inputs. Single packing runs chains only, so this "
        "residual network has no single row. "
        f"Client and server shared the process, and the process got {result['cpu_s']:.0f} "
        f"CPU-seconds in {result['encrypt_s'] + result['evaluate_s']:.0f} s of encryption and "
        "evaluation: the 2 cores were shared with other jobs, so the CPU time is the "
        "steadier measure.", "",
        "| system | network | accuracy | latency (one request) | amortised / input | memory "
        "| agreement with onnxruntime | parameters |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| SHE, CKKS batch ({result['batch']} inputs per request) | CIFAR-sized, 3 conv + "
        f"residual block | not measured | {result['evaluate_s']:.0f} s server "
        f"(+ {result['encrypt_s']:.0f} s encrypt; {result['cpu_s']:.0f} CPU-s in all) | "
        f"{1e3 * result['evaluate_per_input_s']:.0f} ms | "
        f"{result['peak_rss_bytes'] / gib:.1f} GiB peak RSS (client and server in one "
        f"process; {result['predicted_server_bytes'] / gib:.1f} GiB predicted for the server) "
        f"| {result['agreement']:.2%} (max abs logit error "
        f"{result['max_abs_logit_error']:.1e}, predicted {result['predicted_max_error']:.1e}) "
        f"| N={result['poly_modulus_degree']}, {sum(result['modulus_bits'])}-bit modulus, depth "
        f"{result['depth']} |",
        f"| SHE (TFHE), published | SHE CIFAR-10 CNN | as published | {SHE_CIFAR_LATENCY_S:.0f} s "
        "| - | - | - | Lou & Jiang, NeurIPS 2019 (not measured here) |",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=8, help="channels of every conv (8)")
    parser.add_argument("--batch", type=int, help="random inputs per request (default: a full "
                        "ciphertext, N/2; the server's cost does not depend on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-bits", type=int, help="CKKS scale (default: the compiler's "
                        "precision ladder)")
    parser.add_argument("--weight-bits", type=int, help="weight bits (with --scale-bits)")
    args = parser.parse_args(argv)
    result = run(args.channels, args.batch, args.seed, args.scale_bits, args.weight_bits)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cifar_sized.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(markdown(result)))


if __name__ == "__main__":
    main()
