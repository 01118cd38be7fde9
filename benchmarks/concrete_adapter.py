"""The Concrete ML side of the benchmark: run INSIDE the Concrete ML environment.

Concrete ML pins its own torch, so this script cannot import SHE or the project's converters:
it needs only numpy, onnx, torch and ``concrete.ml`` (all in that environment) and is started
as a subprocess by :mod:`benchmarks.concrete_peer`::

    CONCRETE_PYTHON benchmarks/concrete_adapter.py --model M.onnx --data D.npz --out R.json

``--model`` is one of the trained ReLU (or square-activation) ONNX networks in
``she/assets``; :class:`OnnxModule` turns it back into a torch module with the same weights,
and Concrete ML's own API does the rest: ``compile_torch_model`` (``n_bits``,
``rounding_threshold_bits``, ``p_error`` as given), the quantised model in the clear
(``fhe="disable"``) on every test image in ``--data``, FHE simulation (one image at a
time, slow) on the first ``--simulate-images``, then the deployment flow,
``FHEModelDev`` / ``FHEModelClient`` / ``FHEModelServer``, which encrypts, evaluates and
decrypts one image per request until ``--fhe-images`` images are done (0: no keys, no
encrypted run) or ``--fhe-budget-s`` seconds of server evaluation are spent (an
evaluation still running then is given up and reported as unfinished).
``--data`` holds ``calibration`` (compilation input set), ``x`` and ``y`` (the test
images, ``N x 1 x 28 x 28`` in ``[0, 1]``, and labels). The JSON
written to ``--out`` holds timings, sizes, accuracies, predictions and the parameters
Concrete ML chose; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

#: ONNX operators :class:`OnnxModule` evaluates (those of the networks in ``she/assets``).
SUPPORTED_OPS = frozenset({"Conv", "Relu", "MaxPool", "AveragePool", "Flatten", "Gemm",
                           "MatMul", "Add", "Mul", "Reshape", "Constant"})


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _symmetric_padding(node: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, ...]:
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    half = len(pads) // 2
    if pads[:half] != pads[half:] or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError(f"{node.op_type} {node.name!r}: only symmetric explicit padding is supported")
    return tuple(pads[:half])


class OnnxModule(torch.nn.Module):
    """A torch module computing an ONNX graph node by node with the graph's weights (as
    parameters), so that ``torch.onnx.export`` (which Concrete ML calls) traces the same
    network again."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        super().__init__()
        graph = proto.graph
        unsupported = sorted({n.op_type for n in graph.node} - SUPPORTED_OPS)
        if unsupported:
            raise ValueError(f"operators not supported by the Concrete ML adapter: {unsupported}")
        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                initializers[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        self.index = {name: i for i, name in enumerate(initializers)}
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.from_numpy(np.array(v, dtype=np.float32)), requires_grad=False)
            if v.dtype.kind == "f" else torch.nn.Parameter(torch.from_numpy(np.array(v)),
                                                           requires_grad=False)
            for v in initializers.values())
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n), n)
                      for n in graph.node if n.op_type != "Constant"]
        inputs = [i.name for i in graph.input if i.name not in initializers]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ValueError("the adapter needs a graph with one input and one output")
        self.input_name, self.output_name = inputs[0], graph.output[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {self.input_name: x}

        def get(name: str) -> torch.Tensor:
            return values[name] if name in values else self.weights[self.index[name]]

        for op, ins, outs, attrs, node in self.nodes:
            a = [get(name) for name in ins if name]
            values[outs[0]] = self._run(op, a, attrs, node)
        return values[self.output_name]

    @staticmethod
    def _run(op: str, a: list[torch.Tensor], attrs: dict[str, Any],
             node: onnx.NodeProto) -> torch.Tensor:
        f = torch.nn.functional
        if op == "Conv":
            return f.conv2d(a[0], a[1], a[2] if len(a) > 2 else None,
                            stride=tuple(attrs.get("strides", (1, 1))),
                            padding=_symmetric_padding(node, attrs),
                            dilation=tuple(attrs.get("dilations", (1, 1))),
                            groups=attrs.get("group", 1))
        if op == "Relu":
            return torch.relu(a[0])
        if op in ("MaxPool", "AveragePool"):
            pool = f.max_pool2d if op == "MaxPool" else f.avg_pool2d
            return pool(a[0], tuple(attrs["kernel_shape"]),
                        stride=tuple(attrs.get("strides", attrs["kernel_shape"])),
                        padding=_symmetric_padding(node, attrs))
        if op == "Flatten":
            return torch.flatten(a[0], start_dim=attrs.get("axis", 1))
        if op == "Gemm":
            left = a[0].t() if attrs.get("transA", 0) else a[0]
            right = a[1].t() if attrs.get("transB", 0) else a[1]
            out = attrs.get("alpha", 1.0) * (left @ right)
            return out + attrs.get("beta", 1.0) * a[2] if len(a) > 2 else out
        if op == "MatMul":
            return a[0] @ a[1]
        if op == "Add":
            return a[0] + a[1]
        if op == "Mul":
            return a[0] * a[1]
        # Reshape: the batch axis stays free
        return a[0].reshape(a[0].shape[0], *[int(d) for d in a[1].tolist()[1:]])


def _percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p90": float(np.percentile(arr, 90))}


def _log(message: str) -> None:
    print(f"[concrete] {message}", file=sys.stderr, flush=True)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _bounded(fn: Callable[[], Any], timeout: float) -> tuple[Any, float, bool]:
    """``(fn(), seconds, still running)``: ``fn`` runs in a daemon thread that is given up
    on after ``timeout`` seconds (the process then ends with :func:`os._exit`)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(max(timeout, 0.0))
    seconds = time.perf_counter() - start
    if "error" in box:
        raise box["error"]
    return box.get("value"), seconds, thread.is_alive()


def _predict(fn: Callable[[np.ndarray], Any], x: np.ndarray, what: str,
             chunk: int = 500) -> np.ndarray:
    out = []
    for i in range(0, len(x), chunk):
        out.append(np.asarray(fn(x[i:i + chunk])))
        _log(f"{what}: {min(i + chunk, len(x))}/{len(x)} images")
    return np.concatenate(out)


def measure(model_path: str, calibration: np.ndarray, x: np.ndarray, y: np.ndarray, *,
            n_bits: int = 6, rounding_threshold_bits: int | None = 5,
            p_error: float | None = None, simulate_images: int | None = None,
            fhe_images: int = 10, fhe_budget_s: float = 300.0) -> dict[str, Any]:
    """Compile ``model_path`` with Concrete ML, run its quantised model in the clear on
    ``x``, simulate FHE on the first ``simulate_images`` (default: all), run it encrypted on
    the first images within the budget; returns the JSON-ready result."""
    from concrete.ml.torch.compile import compile_torch_model

    module = OnnxModule(onnx.load(model_path)).eval()
    with torch.no_grad():
        float_pred = _predict(lambda b: module(torch.from_numpy(b)).argmax(1).numpy(), x, "float")
    _log(f"compiling {Path(model_path).name} (n_bits={n_bits}, "
         f"rounding_threshold_bits={rounding_threshold_bits}, p_error={p_error})")
    options: dict[str, Any] = {"n_bits": n_bits, "rounding_threshold_bits": rounding_threshold_bits}
    if p_error is not None:
        options["p_error"] = p_error
    quantized, compile_s = _timed(lambda: compile_torch_model(module, calibration, **options))
    circuit = quantized.fhe_circuit
    statistics = {k: v for k, v in circuit.statistics.items()
                  if isinstance(v, int | float | str) and not isinstance(v, bool)}
    _log(f"compiled in {compile_s:.0f} s: {statistics.get('programmable_bootstrap_count')} "
         f"PBS, max bit width {circuit.graph.maximum_integer_bit_width()}")
    clear_pred = quantized.forward(x, fhe="disable").argmax(1)
    ns = len(x) if simulate_images is None else min(simulate_images, len(x))
    sim_pred, simulate_s = _timed(lambda: _predict(
        lambda b: quantized.forward(b, fhe="simulate").argmax(1), x[:ns], "simulate"))
    result: dict[str, Any] = {
        "model": Path(model_path).name, "compile_s": compile_s, "images": len(x),
        "float_predictions": float_pred.tolist(),
        "float_accuracy": float(np.mean(float_pred == y)),
        "quantized_accuracy": float(np.mean(clear_pred == y)),
        "quantized_agreement_with_float": float(np.mean(clear_pred == float_pred)),
        "simulate_images": ns, "simulate_s": simulate_s,
        "simulate_accuracy": float(np.mean(sim_pred == y[:ns])),
        "simulate_agreement_with_quantized": float(np.mean(sim_pred == clear_pred[:ns])),
        "parameters": {"n_bits": n_bits, "rounding_threshold_bits": rounding_threshold_bits,
                       "p_error_requested": p_error, "p_error": circuit.p_error,
                       "global_p_error": circuit.global_p_error,
                       "max_bit_width": int(circuit.graph.maximum_integer_bit_width()),
                       "statistics": statistics},
    }
    result.update(_deployment(quantized, x, fhe_images, fhe_budget_s))
    n = result["fhe_images"]
    fhe_pred = np.array(result["fhe_predictions"], dtype=np.int64)
    result.update({
        "fhe_accuracy": float(np.mean(fhe_pred == y[:n])) if n else None,
        "fhe_agreement_with_simulation": float(np.mean(fhe_pred == sim_pred[:n])) if n else None,
        "versions": _versions(), "threads": torch.get_num_threads(),
    })
    return result


def _deployment(quantized: Any, x: np.ndarray, fhe_images: int,
                fhe_budget_s: float) -> dict[str, Any]:
    """The deployment flow on the first ``fhe_images`` images of ``x`` (0: nothing, not even
    keys), one request each, until ``fhe_budget_s`` seconds of server time are spent."""
    from concrete.ml.deployment import FHEModelClient, FHEModelDev, FHEModelServer

    stages: dict[str, list[float]] = {"encrypt": [], "server": [], "decrypt": []}
    out: dict[str, Any] = {"fhe_images": 0, "fhe_budget_s": fhe_budget_s, "fhe_predictions": [],
                           "fhe_unfinished_s": None, "keygen_s": None,
                           "evaluation_key_bytes": None, "upload_bytes": None,
                           "download_bytes": None}
    if fhe_images <= 0:
        return {**out, **{f"{k}_s": None for k in stages}}
    spent = 0.0
    with tempfile.TemporaryDirectory(prefix="concrete-bench-") as tmp:
        FHEModelDev(f"{tmp}/model", quantized).save()
        client = FHEModelClient(f"{tmp}/model", key_dir=f"{tmp}/keys")
        _, out["keygen_s"] = _timed(client.generate_private_and_evaluation_keys)
        evaluation_keys = client.get_serialized_evaluation_keys()
        out["evaluation_key_bytes"] = len(evaluation_keys)
        server = FHEModelServer(f"{tmp}/model")
        server.load()
        _log(f"keys generated in {out['keygen_s']:.1f} s ({len(evaluation_keys) / 2 ** 20:.1f} MiB)")
        for i in range(min(fhe_images, len(x))):
            request, enc_s = _timed(lambda i=i: client.quantize_encrypt_serialize(x[i:i + 1]))
            out["upload_bytes"] = len(request)
            response, server_s, running = _bounded(
                lambda r=request: server.run(r, evaluation_keys), fhe_budget_s - spent)
            if running:
                out["fhe_unfinished_s"] = server_s
                _log(f"encrypted image {i + 1} unfinished after {server_s:.0f} s: budget spent")
                break
            logits, dec_s = _timed(lambda r=response: client.deserialize_decrypt_dequantize(r))
            out["fhe_predictions"].append(int(np.asarray(logits).argmax(1)[0]))
            for key, value in zip(stages, (enc_s, server_s, dec_s), strict=True):
                stages[key].append(value)
            out["download_bytes"] = len(response)
            spent += server_s
            _log(f"encrypted image {i + 1}: server {server_s:.1f} s")
            if spent >= fhe_budget_s:
                break
    out["fhe_images"] = len(out["fhe_predictions"])
    return {**out, **{f"{k}_s": _percentiles(v) if v else None for k, v in stages.items()}}


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("concrete-ml", "concrete-python", "torch")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", required=True, help="ONNX network (trained, ReLU)")
    parser.add_argument("--data", required=True, help=".npz with calibration, x, y")
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--n-bits", type=int, default=6)
    parser.add_argument("--rounding-threshold-bits", type=int, default=5)
    parser.add_argument("--p-error", type=float, default=None, help="default: Concrete ML's")
    parser.add_argument("--simulate-images", type=int, default=None, help="default: all")
    parser.add_argument("--fhe-images", type=int, default=10)
    parser.add_argument("--fhe-budget-s", type=float, default=300.0)
    args = parser.parse_args(argv)
    data = np.load(args.data)
    result = measure(args.model, data["calibration"], data["x"], data["y"], n_bits=args.n_bits,
                     rounding_threshold_bits=args.rounding_threshold_bits, p_error=args.p_error,
                     simulate_images=args.simulate_images, fhe_images=args.fhe_images,
                     fhe_budget_s=args.fhe_budget_s)
    Path(args.out).write_text(json.dumps(result) + "\n")
    if result["fhe_unfinished_s"] is not None:
        sys.stderr.flush()
        os._exit(0)  # the given-up evaluation still runs in its thread


if __name__ == "__main__":
    main()
