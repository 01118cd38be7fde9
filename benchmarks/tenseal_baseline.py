"""Plain-TenSEAL peer baselines for the TenSEAL tutorial MNIST network.

The network (``she/assets/tutorial_cnn.onnx``, trained by ``converters/train_tutorial.py``)::

    Conv(1 -> 4, 7x7, stride 3, no padding) -> x^2 -> Gemm(256 -> 64) -> x^2 -> Gemm(64 -> 10)

Two hand-written TenSEAL implementations, as a TenSEAL user would write them without SHE.
Weights come from the ONNX file (``onnx.numpy_helper``; no torch at run time).

* **single** (:func:`run_single`): one image per ciphertext, exactly the TenSEAL tutorial:
  CKKS, N=8192, ``coeff_mod_bit_sizes=[31, 26, 26, 26, 26, 26, 26, 31]``, scale 2^26,
  Galois keys. The client encodes with ``ts.im2col_encoding``; the server (holding only a
  public copy of the context) runs ``conv2d_im2col`` + bias per output channel,
  ``pack_vectors``, ``square_``, ``mm`` + bias, ``square_``, ``mm`` + bias.
* **batch** (:func:`run_batch`): one image per slot (up to N/2 images per ciphertext) with
  client-side im2col *with window duplication*: one ciphertext per (window position, kernel
  offset) pair, 64 x 49 = 3136 ciphertexts. The server computes every layer as sums of
  ciphertext x scalar products (one rescale each), squares with ciphertext x ciphertext
  products; no Galois keys are needed. The client decrypts 10 ciphertexts.

Measured: client encryption, server time (p50 / p90 per image for single; total and
amortised for batch), decryption, upload / download bytes (serialized ciphertexts), the
public context (public + relinearisation (+ Galois) keys, no secret key), peak RSS (batch,
in a fresh subprocess), accuracy and agreement with a numpy reference of the network
(itself checked against onnxruntime). Run from the repository root::

    python -m benchmarks.tenseal_baseline --data ../shared/data/mnist --single 10 \\
        --batch-images 4096 --json out.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import tenseal as ts
from onnx import numpy_helper

from she.io import assets

try:  # progress bars are optional
    from tqdm import tqdm
except ImportError:  # pragma: no cover - depends on the environment
    tqdm = None

DEFAULT_MODEL = assets.tutorial_model_path()
DEFAULT_DATA = "../shared/data/mnist"
#: The TenSEAL tutorial's encryption parameters (used by both baselines by default).
TUTORIAL_POLY_MODULUS_DEGREE = 8192
TUTORIAL_COEFF_MOD_BIT_SIZES = (31, 26, 26, 26, 26, 26, 26, 31)
TUTORIAL_SCALE_BITS = 26
IMAGE_SIDE = 28

T = TypeVar("T")


# -- the network -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TutorialWeights:
    """Weights of the tutorial network, in the layouts the TenSEAL code needs.

    Attributes:
        conv_w: convolution kernels, ``(out_channels, kernel, kernel)``.
        conv_b: convolution biases, ``(out_channels,)``.
        stride: convolution stride.
        fc1_w: first dense layer as an ``(in, out)`` matrix (``y = x @ fc1_w + fc1_b``).
        fc1_b: its bias.
        fc2_w: second dense layer, ``(in, out)``.
        fc2_b: its bias.
    """

    conv_w: np.ndarray
    conv_b: np.ndarray
    stride: int
    fc1_w: np.ndarray
    fc1_b: np.ndarray
    fc2_w: np.ndarray
    fc2_b: np.ndarray

    @property
    def kernel(self) -> int:
        return int(self.conv_w.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.conv_w.shape[0])

    @property
    def side(self) -> int:
        """Output side of the convolution on a 28 x 28 image (8 for the tutorial network)."""
        return (IMAGE_SIDE - self.kernel) // self.stride + 1


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _gemm_matrix(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(W (in, out), b (out,))`` with ``y = x @ W + b`` for a Gemm node ``A x B + C``."""
    attrs = _attributes(node)
    if attrs.get("transA", 0):
        raise ValueError(f"Gemm {node.name}: transA is not supported")
    weight = inits[node.input[1]]
    weight = weight.T if attrs.get("transB", 0) else weight
    bias = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(weight.shape[1])
    return float(attrs.get("alpha", 1.0)) * weight, float(attrs.get("beta", 1.0)) * np.broadcast_to(
        bias, (weight.shape[1],)
    )


def load_weights(onnx_path: str | Path) -> TutorialWeights:
    """Read the tutorial network's weights from ``onnx_path``.

    Expects one ``Conv`` (single input channel, square kernel, no padding, no dilation or
    groups) followed by exactly two ``Gemm`` nodes; raises :class:`ValueError` otherwise.
    """
    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    if len(convs) != 1 or len(gemms) != 2:
        raise ValueError(f"{onnx_path}: expected 1 Conv and 2 Gemm nodes, got {len(convs)} and {len(gemms)}")
    conv = convs[0]
    attrs = _attributes(conv)
    strides = list(attrs.get("strides", [1, 1]))
    if any(attrs.get("pads", [0])) or set(strides) != {strides[0]} or attrs.get("group", 1) != 1:
        raise ValueError(f"{onnx_path}: Conv must have no padding, one group and equal strides")
    kernels = inits[conv.input[1]]
    if kernels.ndim != 4 or kernels.shape[1] != 1 or kernels.shape[2] != kernels.shape[3]:
        raise ValueError(f"{onnx_path}: Conv weight must be (C, 1, k, k), got {kernels.shape}")
    conv_b = inits[conv.input[2]] if len(conv.input) > 2 else np.zeros(kernels.shape[0])
    fc1_w, fc1_b = _gemm_matrix(gemms[0], inits)
    fc2_w, fc2_b = _gemm_matrix(gemms[1], inits)
    return TutorialWeights(kernels[:, 0], conv_b, int(strides[0]), fc1_w, fc1_b, fc2_w, fc2_b)


def window_indices(weights: TutorialWeights) -> np.ndarray:
    """Flat pixel indices ``(windows, k*k)`` of every convolution window (row-major windows)."""
    k, s, side = weights.kernel, weights.stride, weights.side
    offsets = (np.arange(k)[:, None] * IMAGE_SIDE + np.arange(k)[None, :]).ravel()
    starts = (np.arange(side)[:, None] * s * IMAGE_SIDE + np.arange(side)[None, :] * s).ravel()
    return starts[:, None] + offsets[None, :]


def plain_forward(weights: TutorialWeights, images: np.ndarray) -> np.ndarray:
    """Plaintext (float64 numpy) logits ``(n, classes)`` of ``images`` ``(n, [1,] 28, 28)``."""
    flat = np.asarray(images, dtype=np.float64).reshape(len(images), IMAGE_SIDE * IMAGE_SIDE)
    patches = flat[:, window_indices(weights)]  # (n, windows, k*k)
    conv = np.einsum("nwp,cp->ncw", patches, weights.conv_w.reshape(weights.channels, -1))
    conv = conv + weights.conv_b[None, :, None]
    hidden = (conv * conv).reshape(len(images), -1) @ weights.fc1_w + weights.fc1_b
    return (hidden * hidden) @ weights.fc2_w + weights.fc2_b


def onnxruntime_forward(onnx_path: str | Path, images: np.ndarray) -> np.ndarray:
    """Logits of ``images`` under onnxruntime (to cross-check :func:`plain_forward`)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.asarray(images, dtype=np.float32).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# -- helpers ---------------------------------------------------------------------------------

def progress(items: Iterable[T], total: int, desc: str, enabled: bool = True) -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar when tqdm is installed and ``enabled``."""
    if tqdm is None or not enabled:
        return items
    return tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``(fn(), seconds taken)``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """Mean, p50 and p90 of ``values``."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p90": float(np.percentile(arr, 90))}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux's ``VmHWM`` belongs to the process image, whereas ``ru_maxrss`` survives
    ``execve``: a process spawned by a large parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def children_peak_rss_bytes() -> int:
    """Largest peak RSS among this process's finished child processes (``ru_maxrss``)."""
    return int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024


def tenseal_threads() -> int:
    """Threads TenSEAL may use: its contexts here are made without ``n_threads``, and then
    TenSEAL sizes its thread pool to ``multiprocessing.cpu_count()``."""
    return multiprocessing.cpu_count()


def make_context(
    poly_modulus_degree: int = TUTORIAL_POLY_MODULUS_DEGREE,
    coeff_mod_bit_sizes: Sequence[int] = TUTORIAL_COEFF_MOD_BIT_SIZES,
    scale_bits: int = TUTORIAL_SCALE_BITS,
    galois: bool = True,
) -> ts.Context:
    """A private CKKS context (relinearisation keys always, Galois keys if ``galois``)."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=poly_modulus_degree,
                     coeff_mod_bit_sizes=list(coeff_mod_bit_sizes))
    ctx.global_scale = 2.0**scale_bits
    if galois:
        ctx.generate_galois_keys()
    return ctx


def public_context_bytes(ctx: ts.Context) -> bytes:
    """The context as the server receives it: public, relinearisation and Galois keys (if
    any), never the secret key."""
    return ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True,
                         save_relin_keys=True)


def server_context(public_bytes: bytes) -> ts.Context:
    """Load the server's copy of the context; refuses a context that holds a secret key."""
    ctx = ts.context_from(public_bytes)
    if ctx.is_private():
        raise RuntimeError("the server's context holds the secret key")
    return ctx


def agreement(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and agreement of decrypted ``logits`` with the plaintext ``reference``."""
    scale = float(np.abs(reference).max()) or 1.0
    return {
        "accuracy": float(np.mean(logits.argmax(1) == labels)),
        "plain_accuracy": float(np.mean(reference.argmax(1) == labels)),
        "argmax_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))),
        "max_abs_error": float(np.abs(logits - reference).max()),
        "max_rel_error": float(np.abs(logits - reference).max() / scale),
    }


# -- single: one image per ciphertext (the TenSEAL tutorial) ---------------------------------

def single_encrypt(ctx: ts.Context, image: np.ndarray, weights: TutorialWeights) -> tuple[ts.CKKSVector, int]:
    """Client: im2col-encode and encrypt one 28 x 28 image; returns ``(ciphertext, windows)``."""
    matrix = np.asarray(image, dtype=np.float64).reshape(IMAGE_SIDE, IMAGE_SIDE).tolist()
    return ts.im2col_encoding(ctx, matrix, weights.kernel, weights.kernel, weights.stride)


def single_evaluate(enc_x: ts.CKKSVector, windows_nb: int, weights: TutorialWeights) -> ts.CKKSVector:
    """Server: the tutorial's ``EncConvNet.forward`` on one encrypted image."""
    channels = [
        enc_x.conv2d_im2col(kernel.tolist(), windows_nb) + float(bias)
        for kernel, bias in zip(weights.conv_w, weights.conv_b, strict=True)
    ]
    enc_x = ts.CKKSVector.pack_vectors(channels)
    enc_x.square_()
    enc_x = enc_x.mm(weights.fc1_w.tolist()) + weights.fc1_b.tolist()
    enc_x.square_()
    return enc_x.mm(weights.fc2_w.tolist()) + weights.fc2_b.tolist()


def single_server(public_ctx: ts.Context, request: bytes, windows_nb: int, weights: TutorialWeights) -> bytes:
    """Server: deserialize a request against the public context, evaluate, serialize."""
    enc_x = ts.ckks_vector_from(public_ctx, request)
    return single_evaluate(enc_x, windows_nb, weights).serialize()


def run_single(
    onnx_path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the single (tutorial) baseline on ``images`` one by one; returns the measurements.

    Times are seconds, sizes bytes. ``logits`` holds the decrypted logits (a nested list).
    """
    weights = load_weights(onnx_path)
    ctx, keygen_s = timed(make_context)
    public_bytes = public_context_bytes(ctx)
    public_ctx = server_context(public_bytes)
    reference = plain_forward(weights, images)
    rows: dict[str, list[float]] = {k: [] for k in ("encrypt", "server", "decrypt", "upload", "download")}
    logits = []
    for image in progress(images, len(images), "single", show_progress):
        (enc_x, windows_nb), enc_s = timed(lambda image=image: single_encrypt(ctx, image, weights))
        request = enc_x.serialize()
        response, server_s = timed(lambda r=request, w=windows_nb: single_server(public_ctx, r, w, weights))
        decrypted, dec_s = timed(lambda r=response: ts.ckks_vector_from(ctx, r).decrypt())
        logits.append(decrypted)
        for key, value in zip(rows, (enc_s, server_s, dec_s, len(request), len(response)), strict=True):
            rows[key].append(value)
    out = np.asarray(logits, dtype=np.float64)
    return {
        "baseline": "single",
        "images": len(images),
        "workers": tenseal_threads(),
        "poly_modulus_degree": TUTORIAL_POLY_MODULUS_DEGREE,
        "coeff_mod_bit_sizes": list(TUTORIAL_COEFF_MOD_BIT_SIZES),
        "scale_bits": TUTORIAL_SCALE_BITS,
        "keygen_s": keygen_s,
        "public_key_bytes": len(public_bytes),
        "encrypt_s": percentiles(rows["encrypt"]),
        "server_s": percentiles(rows["server"]),
        "decrypt_s": percentiles(rows["decrypt"]),
        "upload_bytes": int(np.mean(rows["upload"])),
        "download_bytes": int(np.mean(rows["download"])),
        **agreement(out, reference, np.asarray(labels)),
        "logits": out.tolist(),
    }


# -- batch: one image per slot, client-side im2col with window duplication -------------------

def batch_columns(images: np.ndarray, weights: TutorialWeights) -> np.ndarray:
    """``(windows * k*k, n)``: row ``w * k*k + p`` holds pixel ``p`` of window ``w`` of every image."""
    flat = np.asarray(images, dtype=np.float64).reshape(len(images), IMAGE_SIDE * IMAGE_SIDE)
    return flat[:, window_indices(weights).ravel()].T


def batch_encrypt(ctx: ts.Context, images: np.ndarray, weights: TutorialWeights,
                  show_progress: bool = True) -> tuple[list[bytes], float, float]:
    """Client: encrypt every im2col column; returns ``(serialized ciphertexts, encrypt s, serialize s)``."""
    columns = batch_columns(images, weights)
    payloads: list[bytes] = []
    encrypt_s = serialize_s = 0.0
    for column in progress(columns, len(columns), "batch encrypt", show_progress):
        ct, seconds = timed(lambda c=column: ts.ckks_vector(ctx, c.tolist()))
        encrypt_s += seconds
        data, seconds = timed(ct.serialize)
        serialize_s += seconds
        payloads.append(data)
    return payloads, encrypt_s, serialize_s


def weighted_sum(cts: Sequence[ts.CKKSVector], coefficients: np.ndarray, bias: float) -> ts.CKKSVector:
    """``sum_i coefficients[i] * cts[i] + bias`` with ciphertext x scalar products."""
    acc: ts.CKKSVector | None = None
    for ct, coefficient in zip(cts, coefficients, strict=True):
        if coefficient == 0.0:  # SEAL refuses products that would be transparent
            continue
        term = ct * float(coefficient)
        acc = term if acc is None else acc.add_(term)
    if acc is None:
        raise ValueError("a layer output has only zero weights")
    return acc + float(bias)


def batch_evaluate(cts: Sequence[ts.CKKSVector], weights: TutorialWeights,
                   show_progress: bool = True) -> list[ts.CKKSVector]:
    """Server: the network on im2col ciphertexts; returns one ciphertext per class."""
    taps = weights.kernel * weights.kernel
    windows = len(cts) // taps
    hidden: list[ts.CKKSVector] = []
    for channel in progress(range(weights.channels), weights.channels, "batch conv", show_progress):
        kernel = weights.conv_w[channel].ravel()
        for w in range(windows):
            out = weighted_sum(cts[w * taps:(w + 1) * taps], kernel, weights.conv_b[channel])
            hidden.append(out.square_())
    dense: list[ts.CKKSVector] = []
    for j in progress(range(weights.fc1_w.shape[1]), weights.fc1_w.shape[1], "batch fc1", show_progress):
        dense.append(weighted_sum(hidden, weights.fc1_w[:, j], weights.fc1_b[j]).square_())
    return [weighted_sum(dense, weights.fc2_w[:, j], weights.fc2_b[j]) for j in range(weights.fc2_w.shape[1])]


def batch_server(public_ctx: ts.Context, payloads: Sequence[bytes], weights: TutorialWeights,
                 show_progress: bool = True) -> tuple[list[bytes], dict[str, float]]:
    """Server: deserialize the request against the public context, evaluate, serialize.

    Returns the serialized class ciphertexts and the seconds spent in each of the three steps
    (``load_s``, ``compute_s``, ``serialize_s``).
    """
    cts, load_s = timed(lambda: [ts.ckks_vector_from(public_ctx, p)
                                 for p in progress(payloads, len(payloads), "batch load", show_progress)])
    outputs, compute_s = timed(lambda: batch_evaluate(cts, weights, show_progress))
    responses, serialize_s = timed(lambda: [ct.serialize() for ct in outputs])
    return responses, {"load_s": load_s, "compute_s": compute_s, "serialize_s": serialize_s}


def _run_batch_here(onnx_path: str, images: np.ndarray, labels: np.ndarray, poly_modulus_degree: int,
                    coeff_mod_bit_sizes: Sequence[int], scale_bits: int,
                    show_progress: bool) -> dict[str, Any]:
    """:func:`run_batch` in the current process."""
    rss_start = peak_rss_bytes()
    weights = load_weights(onnx_path)
    if len(images) > poly_modulus_degree // 2:
        raise ValueError(f"{len(images)} images do not fit in {poly_modulus_degree // 2} slots")
    ctx, keygen_s = timed(lambda: make_context(poly_modulus_degree, coeff_mod_bit_sizes, scale_bits,
                                               galois=False))
    public_bytes = public_context_bytes(ctx)
    public_ctx = server_context(public_bytes)
    payloads, encrypt_s, serialize_s = batch_encrypt(ctx, images, weights, show_progress)
    (responses, steps), server_s = timed(lambda: batch_server(public_ctx, payloads, weights, show_progress))
    decrypted, decrypt_s = timed(lambda: [ts.ckks_vector_from(ctx, r).decrypt() for r in responses])
    logits = np.asarray(decrypted, dtype=np.float64).T[: len(images)]
    n = len(images)
    return {
        "baseline": "batch",
        "images": n,
        "workers": tenseal_threads(),
        "ciphertexts_in": len(payloads),
        "ciphertexts_out": len(responses),
        "poly_modulus_degree": poly_modulus_degree,
        "coeff_mod_bit_sizes": list(coeff_mod_bit_sizes),
        "scale_bits": scale_bits,
        "keygen_s": keygen_s,
        "public_key_bytes": len(public_bytes),
        "encrypt_s": encrypt_s,
        "serialize_s": serialize_s,
        "server_s": server_s,
        "server_s_per_image": server_s / n,
        "server_load_s": steps["load_s"],
        "server_compute_s": steps["compute_s"],
        "server_serialize_s": steps["serialize_s"],
        "decrypt_s": decrypt_s,
        "upload_bytes": sum(len(p) for p in payloads),
        "download_bytes": sum(len(r) for r in responses),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_bytes": rss_start,
        **agreement(logits, plain_forward(weights, images), np.asarray(labels)),
        "logits": logits.tolist(),
    }


def run_batch(
    onnx_path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    batch: int = 4096,
    *,
    poly_modulus_degree: int = TUTORIAL_POLY_MODULUS_DEGREE,
    coeff_mod_bit_sizes: Sequence[int] = TUTORIAL_COEFF_MOD_BIT_SIZES,
    scale_bits: int = TUTORIAL_SCALE_BITS,
    subprocess: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the batch baseline on the first ``batch`` of ``images`` (one image per slot).

    The chain needs five rescales (conv product, square, dense product, square, dense
    product); the tutorial's chain has six. With ``subprocess`` (default) the work runs in a
    fresh ``spawn`` process so that ``peak_rss_bytes`` is the batch's own. Times are seconds,
    sizes bytes.
    """
    images, labels = np.asarray(images)[:batch], np.asarray(labels)[:batch]
    args = (str(onnx_path), images, labels, poly_modulus_degree, tuple(coeff_mod_bit_sizes), scale_bits,
            show_progress)
    if not subprocess:
        return _run_batch_here(*args)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        result = pool.submit(_run_batch_here, *args).result()
    result["subprocess"] = True
    return result


# -- command line ----------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text summary table of the single and/or batch results."""
    lines = [f"{'baseline':<8} {'images':>6} {'server/img':>12} {'server p90':>11} {'encrypt':>10} "
             f"{'upload':>10} {'download':>10} {'pub keys':>10} {'peak RSS':>10} {'acc':>7} {'agree':>6} "
             f"{'max err':>8}"]
    single = results.get("single")
    if single:
        lines.append(
            f"{'single':<8} {single['images']:>6} {single['server_s']['p50'] * 1e3:>9.0f} ms "
            f"{single['server_s']['p90'] * 1e3:>8.0f} ms {single['encrypt_s']['p50'] * 1e3:>7.1f} ms "
            f"{_mb(single['upload_bytes']):>10} {_mb(single['download_bytes']):>10} "
            f"{_mb(single['public_key_bytes']):>10} {'-':>10} {single['accuracy']:>7.2%} "
            f"{single['argmax_agreement']:>6.1%} {single['max_abs_error']:>8.1e}"
        )
    batch = results.get("batch")
    if batch:
        lines.append(
            f"{'batch':<8} {batch['images']:>6} {batch['server_s_per_image'] * 1e3:>9.2f} ms {'-':>11} "
            f"{batch['encrypt_s']:>8.1f} s {_mb(batch['upload_bytes']):>10} "
            f"{_mb(batch['download_bytes']):>10} {_mb(batch['public_key_bytes']):>10} "
            f"{_mb(batch['peak_rss_bytes']):>10} {batch['accuracy']:>7.2%} "
            f"{batch['argmax_agreement']:>6.1%} {batch['max_abs_error']:>8.1e}"
        )
        lines.append(
            f"batch: server total {batch['server_s']:.1f} s (load {batch['server_load_s']:.1f} s, compute "
            f"{batch['server_compute_s']:.1f} s, serialize {batch['server_serialize_s']:.2f} s), client "
            f"serialize {batch['serialize_s']:.1f} s, {batch['ciphertexts_in']} ciphertexts in, "
            f"{batch['ciphertexts_out']} out"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tenseal_baseline",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="directory holding the MNIST IDX files")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the tutorial network (ONNX)")
    parser.add_argument("--single", type=int, default=10, metavar="N",
                        help="test images for the single baseline (0 skips it)")
    parser.add_argument("--batch-images", type=int, default=4096, metavar="N",
                        help="test images for the batch baseline (0 skips it)")
    parser.add_argument("--no-subprocess", action="store_true", help="run the batch in this process")
    parser.add_argument("--json", help="write the results (without the logits) to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the requested baselines, print a table and optionally write JSON."""
    from she.io.data import load_idx_dataset

    args = parse_args(argv)
    images, labels = load_idx_dataset(args.data, "test")
    weights = load_weights(args.model)
    n_check = max(args.single, args.batch_images, 1)
    ort_diff = float(np.abs(onnxruntime_forward(args.model, images[:n_check])
                            - plain_forward(weights, images[:n_check])).max())
    print(f"numpy reference vs onnxruntime: max |diff| {ort_diff:.2e} on {n_check} images")
    results: dict[str, dict[str, Any]] = {}
    if args.single > 0:
        results["single"] = run_single(args.model, images[:args.single], labels[:args.single])
    if args.batch_images > 0:
        results["batch"] = run_batch(args.model, images, labels, args.batch_images,
                                     subprocess=not args.no_subprocess)
    print(table(results))
    if args.json:
        slim = {name: {k: v for k, v in r.items() if k != "logits"} for name, r in results.items()}
        slim["reference"] = {"numpy_vs_onnxruntime_max_abs_diff": ort_diff}
        Path(args.json).write_text(json.dumps(slim, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
