"""A CIFAR-sized network run encrypted on random inputs (no CIFAR-10 copy is reachable).

The network is HE-friendly with random power-of-two weights (the form ``she convert``
writes): a 3x32x32 input, three 3x3 convolutions with x^2 activations, a residual block
(identity skip across an activation), 2x2 average pooling and a dense layer::

    conv 3->C (stride 2) -> x^2 -> conv C->C -> x^2 -> conv C->C (+ skip) -> x^2
        -> avgpool 2x2 -> dense -> 10

It is compiled in each packing (calibrated on random inputs), run encrypted on other random
inputs, and compared with onnxruntime on the same inputs: single packing (one input per
ciphertext) request by request, p50 over ``--inputs`` requests; batch packing as one
request of a full ciphertext of inputs. Accuracy is *not* measured: the weights are random
and there is no CIFAR-10 data here. Writes ``docs/results/cifar_sized.json``::

    python -m benchmarks.cifar_sized [--packing both|single|batch] [--channels 8]
        [--inputs 5] [--batch 4096] [--scale-bits 26]

With the compiler's defaults, batch packing aligns the skip by an early rescale and fits
N=8192 (``she inspect`` predicts its memory: about 3.8 GiB for the server at 8 channels,
5 GiB at 16, plus the 1.5 GiB request); single packing needs N=16384 (the diagonals'
encoding precision the residual block asks for) and well under 2 GiB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import she
from benchmarks.mnist_demo import machine
from benchmarks.tenseal_baseline import peak_rss_bytes, percentiles
from she.pipeline import encrypted_predict

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
    return she.frontend.model.from_proto(proto, "cifar_sized")


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _header(argv: list[str]) -> dict[str, Any]:
    return {"command": ("python -m benchmarks.cifar_sized " + shlex.join(argv)).strip(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine()}


def _agreement(plan: she.Plan, out: np.ndarray, plain: np.ndarray) -> dict[str, Any]:
    return {"agreement": float(np.mean(out.argmax(1) == plain.argmax(1))),
            "max_abs_logit_error": float(np.abs(out - plain).max()),
            "predicted_max_error": plan.predicted_error,
            "max_abs_logit": float(np.abs(plain).max()),
            "poly_modulus_degree": plan.params.poly_modulus_degree,
            "modulus_bits": list(plan.params.modulus_bits),
            "security_bits": plan.params.security,
            "depth": plan.depth}


def _compiled(model: she.Model, calibration: np.ndarray, packing: str, scale_bits: int | None,
              weight_bits: int | None) -> tuple[she.Plan, float]:
    print(f"compiling ({packing} packing)", file=sys.stderr)
    started = time.perf_counter()
    plan = she.compile(model, calibration=calibration, packing=packing, scale_bits=scale_bits,
                       weight_bits=weight_bits)
    return plan, time.perf_counter() - started


def run_batch(model: she.Model, calibration: np.ndarray, rng: np.random.Generator,
              batch: int | None, scale_bits: int | None = None,
              weight_bits: int | None = None) -> dict[str, Any]:
    """One batch-packing request of ``batch`` random inputs (default: a full ciphertext)."""
    plan, compile_s = _compiled(model, calibration, "batch", scale_bits, weight_bits)
    batch = batch or plan.batch_capacity  # the cost of a request does not depend on it
    x = rng.uniform(0, 1, (batch, *model.input_shape))
    describe = plan.describe()
    print(f"N={plan.params.poly_modulus_degree}, modulus bits {list(plan.params.modulus_bits)}; "
          f"encrypting {batch} inputs ({plan.n_inputs} ciphertexts)", file=sys.stderr)
    cpu = _cpu_seconds()
    out, timings = encrypted_predict(plan, x)
    cpu = _cpu_seconds() - cpu
    return {
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
        "peak_rss_bytes": peak_rss_bytes(),
        "predicted_server_bytes": describe["estimated_bytes"]["server_memory_per_request"],
        **_agreement(plan, out, model.run_plain(x)),
        "first_layer_units": int(plan.layers[0].weights.shape[0]),
        "input_ciphertexts": plan.n_inputs,
    }


def run_single(model: she.Model, calibration: np.ndarray, rng: np.random.Generator,
               inputs: int, scale_bits: int | None = None,
               weight_bits: int | None = None) -> dict[str, Any]:
    """Single packing: one client and server, ``inputs`` random inputs one request each;
    server latency per request (p50/p90), CPU time, memory, agreement."""
    plan, compile_s = _compiled(model, calibration, "single", scale_bits, weight_bits)
    describe = plan.describe()
    print(f"N={plan.params.poly_modulus_degree}, modulus bits {list(plan.params.modulus_bits)}, "
          f"{describe['rotations']} rotations; {inputs} requests", file=sys.stderr)
    server = she.Server(plan)
    started = time.perf_counter()
    client = she.Client(plan.spec())
    context = client.public_context()
    keys = server.load_context(context)
    keygen_s = time.perf_counter() - started
    x = rng.uniform(0, 1, (inputs, *model.input_shape))
    outs, latencies, cpus, encrypt = [], [], [], []
    for image in x:
        t0 = time.perf_counter()
        request = client.encrypt(image[None])
        t1, cpu = time.perf_counter(), _cpu_seconds()
        response = server.evaluate(keys, request)
        latencies.append(time.perf_counter() - t1)
        cpus.append(_cpu_seconds() - cpu)
        encrypt.append(t1 - t0)
        outs.append(client.decrypt_logits(response)[0])
        print(f"  request {len(outs)}: {latencies[-1]:.1f} s", file=sys.stderr)
    return {
        "inputs": inputs,
        "compile_s": compile_s,
        "keygen_s": keygen_s,
        "encrypt_s_p50": float(np.median(encrypt)),
        "server_s": percentiles(latencies),
        "server_cpu_s": percentiles(cpus),
        "load_average_1min": os.getloadavg()[0],
        "upload_bytes": len(request),
        "download_bytes": len(response),
        "public_context_bytes": len(context),
        "peak_rss_bytes": peak_rss_bytes(),
        "rotations": describe["rotations"],
        "galois_steps": len(plan.rotation_steps()),
        "workers": server.engine.workers,
        **_agreement(plan, np.array(outs), model.run_plain(x)),
    }


def run(channels: int, packings: list[str], batch: int | None, inputs: int, seed: int,
        scale_bits: int | None = None, weight_bits: int | None = None,
        argv: list[str] | None = None) -> dict[str, Any]:
    """Run the network in each of ``packings`` (single first: its peak memory is then its
    own); every result carries the command and date that produced it."""
    model = network(channels, seed)
    rng = np.random.default_rng(seed + 1)
    calibration = rng.uniform(0, 1, (64, 3, 32, 32))
    result: dict[str, Any] = {
        "network": (f"3x32x32 -> conv 3->{channels} (3x3, stride 2) -> x^2 -> conv "
                    f"{channels}->{channels} -> x^2 -> conv {channels}->{channels} + identity "
                    "skip -> x^2 -> avgpool 2x2 -> dense -> 10; random power-of-two weights"),
        "accuracy": "not measured (random weights, no CIFAR-10 data on this machine)",
        "inputs": "random uniform [0, 1]",
    }
    header = _header(sys.argv[1:] if argv is None else argv)
    if "single" in packings:
        result["single"] = {**header, **run_single(model, calibration, rng, inputs, scale_bits,
                                                   weight_bits)}
    if "batch" in packings:
        result["batch"] = {**header, **run_batch(model, calibration, rng, batch, scale_bits,
                                                 weight_bits)}
    return result


def markdown(result: dict[str, Any]) -> list[str]:
    """The benchmark report's section for these rows (beside the SHE paper's CIFAR-10 row)."""
    gib = 2 ** 30
    rows, notes = [], []
    single, batch = result.get("single"), result.get("batch")
    if single:
        lat, cpu = single["server_s"], single["server_cpu_s"]
        notes.append(
            f"Single row: `{single['command']}` on {single['date']} "
            f"({single['machine']['cores']} cores, load average {single['load_average_1min']:.0f}"
            f"), p50 over {single['inputs']} requests; the server's CPU time per request "
            f"(p50 {cpu['p50']:.1f} CPU-s, its worker processes included) is the steadier "
            "measure on the shared machine.")
        rows.append(
            f"| SHE, CKKS single (one input per request) | CIFAR-sized, 3 conv + residual block "
            f"| not measured | {lat['p50']:.1f} s server p50 (p90 {lat['p90']:.1f} s; "
            f"{cpu['p50']:.1f} CPU-s) | - | {single['peak_rss_bytes'] / gib:.1f} GiB peak RSS "
            f"(client and server in one process) | {single['agreement']:.2%} of "
            f"{single['inputs']} (max abs logit error {single['max_abs_logit_error']:.1e}, "
            f"predicted {single['predicted_max_error']:.1e}) | N={single['poly_modulus_degree']}"
            f", {sum(single['modulus_bits'])}-bit modulus, depth {single['depth']}, "
            f"{single['rotations']} rotations |")
    if batch:
        notes.append(
            f"Batch row: `{batch['command']}` on {batch['date']} "
            f"({batch['machine']['cores']} cores); client and server shared the process, which "
            f"got {batch['cpu_s']:.0f} CPU-seconds in {batch['encrypt_s'] + batch['evaluate_s']:.0f}"
            " s of encryption and evaluation: the 2 cores were shared with other jobs, so the "
            "CPU time is the steadier measure.")
        rows.append(
            f"| SHE, CKKS batch ({batch['batch']} inputs per request) | CIFAR-sized, 3 conv + "
            f"residual block | not measured | {batch['evaluate_s']:.0f} s server "
            f"(+ {batch['encrypt_s']:.0f} s encrypt; {batch['cpu_s']:.0f} CPU-s in all) | "
            f"{1e3 * batch['evaluate_per_input_s']:.0f} ms | "
            f"{batch['peak_rss_bytes'] / gib:.1f} GiB peak RSS (client and server in one "
            f"process; {batch['predicted_server_bytes'] / gib:.1f} GiB predicted for the server) "
            f"| {batch['agreement']:.2%} (max abs logit error "
            f"{batch['max_abs_logit_error']:.1e}, predicted {batch['predicted_max_error']:.1e}) "
            f"| N={batch['poly_modulus_degree']}, {sum(batch['modulus_bits'])}-bit modulus, "
            f"depth {batch['depth']} |")
    return [
        "## CIFAR-sized network (random inputs; accuracy not measured)", "",
        f"{result['network']}. No CIFAR-10 copy is reachable from this machine and the "
        "weights are random, so **the accuracy column is not measured**; the encrypted outputs "
        "are compared with onnxruntime on the same random inputs. " + " ".join(notes), "",
        "| system | network | accuracy | latency (one request) | amortised / input | memory "
        "| agreement with onnxruntime | parameters |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        f"| SHE (TFHE), published | SHE CIFAR-10 CNN | as published | {SHE_CIFAR_LATENCY_S:.0f} s "
        "| - | - | - | Lou & Jiang, NeurIPS 2019 (not measured here) |",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=8, help="channels of every conv (8)")
    parser.add_argument("--packing", choices=["both", "single", "batch"], default="both",
                        help="which rows to measure (both); the other row of an existing "
                        "results file is kept, with its own command and date")
    parser.add_argument("--batch", type=int, help="random inputs per batch request (default: "
                        "a full ciphertext, N/2; the server's cost does not depend on it)")
    parser.add_argument("--inputs", type=int, default=5,
                        help="single packing: requests, one random input each (5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-bits", type=int, help="CKKS scale (default: the compiler's "
                        "precision ladder)")
    parser.add_argument("--weight-bits", type=int, help="weight bits (with --scale-bits)")
    args = parser.parse_args(argv)
    packings = ["single", "batch"] if args.packing == "both" else [args.packing]
    result = run(args.channels, packings, args.batch, args.inputs, args.seed, args.scale_bits,
                 args.weight_bits, argv)
    path = RESULTS / "cifar_sized.json"
    if path.exists() and args.packing != "both":  # keep the other row
        old = json.loads(path.read_text())
        if old.get("network") == result["network"]:
            result = {**old, **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(markdown(result)))


if __name__ == "__main__":
    main()
