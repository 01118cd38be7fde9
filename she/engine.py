"""Server-side execution of a plan on encrypted data (batch packing, CKKS or BFV).

Linear layers run in numpy through :mod:`she.kernels` (zero multiplicative depth: in CKKS
the ``2^-shift`` of the integer weights goes into the ciphertext scale; in BFV the integer
weights are the quantised model's own). Squares run in SEAL: square, relinearise, and (CKKS)
rescale by the primes the plan assigned to them. SEAL's bindings
hold the GIL, so all the work (decoding the uploaded ciphertexts, the kernels over ranges of
coefficients, the squares) is shared among ``workers`` forked processes, which exchange
arrays and ciphertexts through files in the bridge's shared-memory directory.

Wide layers are streamed: a layer's outputs are computed, squared and multiplied into the
next layer's weights a chunk of units at a time (:meth:`~she.compiler.Plan.chunk_units`),
the partial products summed modulo each prime, so that neither a wide layer's outputs
nor their squares are ever held whole. The result is the same, bit for bit. A chunk of a
feature map ``(C, H, W)`` is a band of rows across all channels, so that a convolution
after it touches only the next layer's outputs near that band: each chunk's product is
restricted to the output units its weights reach.

A graph (skip connections, branches) runs the same way: each square's chunks are streamed
into every later layer that reads them, and the input ciphertexts are kept until the last
layer that reads them (see :meth:`Engine.run`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import scipy.sparse as sp
import tenseal as ts
import tenseal.sealapi as sealapi

from . import sealbytes
from .compiler import Plan, PlanLayer
from .context import SealBridge
from .errors import FormatError, ParameterError
from .kernels import LinearKernel, add_constant, add_constant_bfv

T = TypeVar("T")

#: What the forked workers need; set by the parent just before it forks.
_JOB: dict[str, Any] = {}


class Engine:
    """Runs one plan; the integer kernels are prepared once and shared by all sessions.

    Args:
        plan: the compiled plan.
        workers: processes sharing the work (the thread-count setting); default: every core.
    """

    def __init__(self, plan: Plan, workers: int | None = None) -> None:
        self.plan = plan
        self.workers = max(1, workers or os.cpu_count() or 1)
        problem = batch_memory_problem(plan)
        if problem:
            raise ParameterError(problem)
        self.primes = plan.params.ciphertext_primes
        q = max(self.primes)
        layers = plan.layers
        self.levels = plan.levels()
        #: Unit indices of every layer, computed (and squared) one chunk after the other;
        #: the output layer in one piece.
        self.chunks = [_chunks(layer.out_shape, plan.chunk_units(k))
                       for k, layer in enumerate(layers[:-1])]
        self.chunks.append([np.arange(layers[-1].weights.shape[0])])
        sizes = plan.chain.source_sizes
        #: Per layer and chunk: the kernel over the input ciphertexts (None: the layer does
        #: not read the input).
        self.input_kernels: list[list[LinearKernel] | None] = []
        for k, layer in enumerate(layers):
            block = _block(layer, 0, sizes) if 0 in layer.sources else None
            self.input_kernels.append(None if block is None else
                                      [LinearKernel.build(block[rows], q) for rows in self.chunks[k]])
        #: Per hidden layer k and chunk: ``(i, reached, kernel)`` for every later layer ``i``
        #: that reads the square of layer k (source k + 1): the chunk's columns of layer i,
        #: restricted to the output rows they reach.
        self.stream_kernels: list[list[list[tuple[int, np.ndarray, LinearKernel]]]] = []
        self.early = [dict.fromkeys(layer.early_sources) for layer in layers]
        for k in range(len(layers) - 1):
            blocks = {i: _block(layer, k + 1, sizes).tocsc() for i, layer in enumerate(layers)
                      if k + 1 in layer.sources}
            per_chunk = []
            for cols in self.chunks[k]:
                entries = []
                for i, block in blocks.items():
                    part = block[:, cols]
                    reached = np.flatnonzero(np.asarray(abs(part).sum(axis=1)).ravel())
                    if len(reached):
                        entries.append((i, reached, LinearKernel.build(part[reached], q)))
                per_chunk.append(entries)
            self.stream_kernels.append(per_chunk)

    def run(self, ctx: ts.Context, relin: sealapi.RelinKeys, inputs: np.ndarray,
            scale: float) -> tuple[np.ndarray, float]:
        """Evaluate the plan.

        Args:
            ctx: the client's public context (its parameters).
            relin: the client's relinearisation keys.
            inputs: ``(n_inputs, 2, limbs, N)`` uint64 coefficient arrays at the top level.
            scale: their CKKS scale (1 in BFV).

        Returns the output coefficient arrays and their scale.

        Layer ``k`` runs at the level of its deepest source (the others' extra primes are
        left out, which in NTT form is exact) and at that source's scale; the compiler
        folded the ratio of the scales into the weights. Each chunk of a layer is its
        accumulated outputs plus its product over the input ciphertexts; after its square,
        the chunk's product with every later layer that reads it is added into that
        layer's accumulated outputs.
        """
        layers = self.plan.layers
        last = len(layers) - 1
        refs = self.plan.sources()[2]
        last_input = max(k for k, layer in enumerate(layers) if 0 in layer.sources)
        source_scales = [scale]
        # accumulated linear outputs of later layers (by layer, or by (layer, source) for
        # terms that layer rescales early)
        acc: dict[int | tuple[int, int], np.ndarray] = {}
        bridge = SealBridge(ctx)
        try:
            for k, layer in enumerate(layers):
                level = self.levels[k]
                next_scale = scale
                for c, rows in enumerate(self.chunks[k]):
                    part = acc[k][rows] if k in acc else None
                    kernels = self.input_kernels[k]
                    if kernels is not None and 0 not in self.early[k]:
                        direct = self._linear(bridge, kernels[c], inputs[:, :, :level], f"l{k}c{c}")
                        part = direct if part is None else self._added(part, direct)
                    for s in self.early[k]:  # shallower terms, rescaled to this level
                        if s == 0:
                            term = self._linear(bridge, kernels[c], inputs, f"l{k}c{c}")
                        elif (k, s) in acc:
                            term = acc[(k, s)][rows]
                        else:
                            continue
                        term, _ = self._square(bridge, relin, term,
                                               source_scales[s] * 2.0 ** layer.shift,
                                               term.shape[2] - level,
                                               times=self.plan.early_constant(k, s))
                        part = term if part is None else self._added(part, term)
                    if part is None:  # every weight of the chunk is zero
                        part = np.zeros((len(rows), 2, level, self.plan.params.poly_modulus_degree),
                                        dtype=np.uint64)
                    part_scale = self._add_bias(part, k, source_scales[refs[k]], rows)
                    if k == last:
                        return part, part_scale
                    squared, next_scale = self._square(bridge, relin, part, part_scale,
                                                       layer.rescale_primes)
                    del part
                    for i, reached, kernel in self.stream_kernels[k][c]:
                        # an early-rescaled source keeps its level until layer i rescales it
                        key, limbs = ((i, k + 1), squared.shape[2]) if k + 1 in self.early[i] \
                            else (i, self.levels[i])
                        contribution = self._linear(bridge, kernel, squared[:, :, :limbs],
                                                    f"l{i}s{k}c{c}")
                        if key not in acc:
                            acc[key] = np.zeros((layers[i].weights.shape[0],
                                                 *contribution.shape[1:]), dtype=np.uint64)
                        acc[key][reached] = self._added(acc[key][reached], contribution)
                    del squared
                for key in [key for key in acc if key == k or isinstance(key, tuple)
                            and key[0] == k]:
                    del acc[key]
                source_scales.append(next_scale)
                if k >= last_input:
                    inputs = None  # the input ciphertexts are no longer needed
            raise AssertionError("the output layer returns")
        finally:
            bridge.close()

    def _add_bias(self, data: np.ndarray, index: int, scale: float, rows: np.ndarray) -> float:
        """Add layer ``index``'s biases of units ``rows`` to their linear outputs ``data``
        (in place); returns the scale of ``data`` (CKKS: the layer's ``2^shift`` applied)."""
        layer = self.plan.layers[index]
        moduli = self.primes[: data.shape[2]]
        bias = layer.bias[rows]
        if self.plan.scheme == "bfv":
            add_constant_bfv(data, bias, self.plan.params.plain_modulus, moduli)
            return scale
        scale *= 2.0 ** layer.shift
        add_constant(data, bias, scale, moduli)
        return scale

    def _added(self, acc: np.ndarray, part: np.ndarray) -> np.ndarray:
        """``acc + part`` modulo each limb's prime (``acc`` is overwritten)."""
        q = np.asarray(self.primes[: acc.shape[2]], dtype=np.uint64)[None, None, :, None]
        acc += part
        np.subtract(acc, q, out=acc, where=acc >= q)
        return acc

    def parse_inputs(self, ctx: ts.Context, blobs: list[bytes], level: sealbytes.LevelSpec,
                     scale: float) -> np.ndarray:
        """Validate and decode the input ciphertexts (shared among the workers).

        Raises :class:`~she.errors.FormatError` naming the first bad ciphertext.
        """
        shape = (len(blobs), 2, level.limbs, level.poly_modulus_degree)
        bridge = SealBridge(ctx)
        try:
            return self._in_workers(bridge, "inputs", shape, _parse_part, len(blobs),
                                    blobs=blobs, level=level, scale=scale)
        finally:
            bridge.close()

    def _linear(self, bridge: SealBridge, kernel: LinearKernel, data: np.ndarray,
                name: str) -> np.ndarray:
        """``kernel`` on every limb of ``data``, the coefficients shared among the workers."""
        moduli = self.primes[: data.shape[2]]
        shape = (kernel.n_out, data.shape[1], len(moduli), data.shape[3])
        return self._in_workers(bridge, name, shape, _linear_part, data.shape[3],
                                kernel=kernel, data=data, moduli=moduli)

    def _in_workers(self, bridge: SealBridge, name: str, shape: tuple[int, ...],
                    part: Callable[[range], None], length: int, **job: Any) -> np.ndarray:
        """Fill a new uint64 array of ``shape`` with ``part(range)`` over ``range(length)``,
        split among the workers, which write into a shared-memory file."""
        workers = min(self.workers, length)
        if workers == 1:
            _JOB.update(job, out=np.empty(shape, dtype=np.uint64))
            try:
                part(range(length))
                return _JOB["out"]
            finally:
                _JOB.clear()
        path = bridge.unit_path(name)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint64, shape=shape).flush()
        _JOB.update(job, out=path)
        try:
            bounds = np.linspace(0, length, workers + 1).astype(int)
            _run_pool(workers, part,
                      [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        finally:
            _JOB.clear()
        result = np.load(path, mmap_mode="r+")
        Path(path).unlink()  # the mapping stays valid; the memory goes with it
        return result

    def _square(self, bridge: SealBridge, relin: sealapi.RelinKeys, data: np.ndarray, scale: float,
                rescales: int, times: float | None = None) -> tuple[np.ndarray, float]:
        """Square every ciphertext, relinearise, and drop ``rescales`` primes; with
        ``times``, multiply by that integer (an early rescale) instead of squaring."""
        level = bridge.levels[data.shape[2]]
        out_level = bridge.levels[data.shape[2] - rescales]
        paths = [bridge.unit_path(i) for i in range(len(data))]
        for unit, path in zip(data, paths, strict=True):
            raw = sealbytes.RawCiphertext(unit, scale, level.parms_id, level.ntt_form)
            Path(path).write_bytes(sealbytes.serialize(raw))
        _JOB.update(seal=bridge.seal, relin=relin, rescales=rescales,
                    paths=paths, level=out_level, times=times)
        workers = min(self.workers, len(paths))
        try:
            scales = _run_pool(workers, _square_chunk,
                               [range(i, len(paths), workers) for i in range(workers)])
        finally:
            _JOB.clear()
        shape = (2, out_level.limbs, out_level.poly_modulus_degree)
        out = np.empty((len(paths), *shape), dtype=np.uint64)
        for i, path in enumerate(paths):
            out[i] = np.fromfile(f"{path}.raw", dtype=np.uint64).reshape(shape)
            Path(path).unlink()  # shared memory: free it as soon as it is read
            Path(f"{path}.raw").unlink()
        return out, scales[0]


def _block(layer: PlanLayer, source: int, sizes: list[int]) -> sp.csr_matrix:
    """The columns of ``layer``'s weights that read ``source`` (of ``sizes[source]`` units)."""
    start = sum(sizes[s] for s in layer.sources if s < source)
    return sp.csr_matrix(layer.weights)[:, start:start + sizes[source]]


def _chunks(shape: tuple[int, ...], units: int) -> list[np.ndarray]:
    """Unit indices (C-order) of a layer output of ``shape`` in chunks of about ``units``:
    bands of rows across all channels for a feature map ``(C, H, W)``, else ranges."""
    total = int(np.prod(shape))
    if units >= total:
        return [np.arange(total)]
    if len(shape) == 3:
        channels, height, width = shape
        rows = max(1, units // (channels * width))
        grid = np.arange(total).reshape(shape)
        return [grid[:, h:h + rows].reshape(-1) for h in range(0, height, rows)]
    return [np.arange(a, min(a + units, total)) for a in range(0, total, units)]


def batch_memory_problem(plan: Plan) -> str | None:
    """Why one batch of ``plan`` does not fit this machine's memory (None when it does): the
    check the server makes before running a plan, and the converter's search before choosing
    a setting (:mod:`she.estimate`)."""
    need, have = plan.batch_memory_bytes(), _physical_memory()
    if have and need > 0.6 * have:
        return (f"one batch of this plan holds about {need / 2**30:.1f} GiB of ciphertexts, more "
                f"than this machine's {have / 2**30:.1f} GiB allow; use single packing, or a "
                "model whose activations act on fewer values (pool before the activation)")
    return None


def _physical_memory() -> int:
    """Bytes of physical memory (0 if unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _run_pool(workers: int, fn: Callable[[range], T], chunks: list[range]) -> list[T]:
    """``[fn(chunk) for chunk in chunks]``, in ``workers`` forked processes when above one."""
    if workers <= 1:
        return [fn(chunk) for chunk in chunks]
    pool = multiprocessing.get_context("fork").Pool(workers, _reset_signals)
    try:
        return pool.map(fn, chunks)
    finally:
        pool.close()
        pool.join()


def _output() -> np.ndarray:
    """The array a worker writes into: in memory, or the shared-memory file's mapping."""
    out = _JOB["out"]
    return out if isinstance(out, np.ndarray) else np.load(out, mmap_mode="r+")


def _linear_part(coefficients: range) -> None:
    """Worker: apply the kernel to a range of coefficients of every limb."""
    kernel, data, moduli = _JOB["kernel"], _JOB["data"], _JOB["moduli"]
    part = slice(coefficients.start, coefficients.stop)
    out = _output()
    out[..., part] = kernel.apply(data[..., part], moduli)


def _parse_part(indices: range) -> None:
    """Worker: validate and decode the input ciphertexts at ``indices``."""
    blobs, level, scale = _JOB["blobs"], _JOB["level"], _JOB["scale"]
    out = _output()
    for i in indices:
        raw = sealbytes.parse(blobs[i], level, out=out[i])
        if raw.scale != scale:
            raise FormatError(f"input ciphertext {i} has scale {raw.scale}, expected {scale}")


def _reset_signals() -> None:
    """Worker initialiser: default signal handling (a host such as uvicorn installs its own
    SIGTERM/SIGINT handlers, which a forked worker must not inherit)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _square_chunk(indices: range) -> float:
    """Worker: square, relinearise (or multiply by ``times``) and rescale the ciphertexts at
    ``indices`` (files)."""
    seal, relin, paths = _JOB["seal"], _JOB["relin"], _JOB["paths"]
    evaluator = sealapi.Evaluator(seal)
    scale = 0.0
    for i in indices:
        ct = sealapi.Ciphertext(seal)
        ct.load(seal, paths[i])
        if _JOB["times"] is None:
            evaluator.square_inplace(ct)
            evaluator.relinearize_inplace(ct, relin)
        else:  # the integer as a constant plaintext (SEAL encodes it exactly)
            plain = sealapi.Plaintext()
            sealapi.CKKSEncoder(seal).encode(1.0, ct.parms_id(), _JOB["times"], plain)
            evaluator.multiply_plain_inplace(ct, plain)
        for _ in range(_JOB["rescales"]):
            evaluator.rescale_to_next_inplace(ct)
        ct.save(paths[i])
        raw = sealbytes.parse(Path(paths[i]).read_bytes(), _JOB["level"])
        raw.data.tofile(f"{paths[i]}.raw")
        scale = raw.scale
    return scale
