"""Server-side execution of a plan on encrypted data (batch packing, CKKS or BFV).

Linear layers run in numpy through :mod:`she.runtime.kernels` (zero multiplicative depth: in CKKS
the ``2^-shift`` of the integer weights goes into the ciphertext scale; in BFV the integer
weights are the quantised model's own). Squares run in SEAL: square, relinearise, and (CKKS)
rescale by the primes the plan assigned to them. SEAL's bindings
hold the GIL, so all the work (decoding the uploaded ciphertexts, the kernels over ranges of
coefficients, the squares) is shared among ``workers`` forked processes, which exchange
arrays and ciphertexts through files in the bridge's shared-memory directory.

Wide layers are streamed: a layer's outputs are computed, squared and multiplied into the
next layer's weights a chunk of units at a time (:meth:`~she.plan.compiler.Plan.chunk_units`),
the partial products summed modulo each prime, so that neither a wide layer's outputs
nor their squares are ever held whole. The result is the same, bit for bit. A chunk of a
feature map ``(C, H, W)`` is a band of rows across all channels, so that a convolution
after it touches only the next layer's outputs near that band: each chunk's product is
restricted to the output units its weights reach.

The chunks run as a wavefront: as soon as every chunk that contributes to a chunk of a
later layer has been added into it, that chunk is computed, squared and passed on in
turn, and its accumulated outputs are released. So of a convolution followed by another,
only the few bands of the second one's outputs that the current band of the first one
reaches are alive at a time, never the whole layer; and input ciphertexts no later chunk
reads are released as the first layer advances. The accumulated outputs live in sparse
shared-memory mappings that the workers add into in place, a block of coefficients at a
time, and released units are punched out of them (``MADV_REMOVE``).

A graph (skip connections, branches) runs the same way: each square's chunks are streamed
into every later layer that reads them, and the input ciphertexts are kept until the last
chunk that reads them (see :meth:`Engine.run`).
"""

from __future__ import annotations

import collections
import mmap
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
from threadpoolctl import threadpool_limits

from ..errors import FormatError, ParameterError
from ..io import sealbytes
from ..io.context import SealBridge
from ..plan.compiler import Plan, PlanLayer
from ..plan.estimate import batch_memory_problem
from .kernels import LinearKernel, add_constant, add_constant_bfv

T = TypeVar("T")
#: Coefficients of every limb a worker multiplies at a time (bounds the kernels' temporaries).
BLOCK_COEFFICIENTS = 2048

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
        #: Of the last run: the most bytes of later layers' accumulated outputs held at once.
        self.peak_accumulated_bytes = 0
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
        #: Per hidden layer: its units whose square no later layer reads (the compiler folds
        #: constant units, whose ciphertexts would be transparent, into the biases of their
        #: readers: :func:`~she.plan.compiler.fold_constant_units`); they are not squared.
        self.unread: list[np.ndarray] = []
        for k in range(len(layers) - 1):
            blocks = {i: _block(layer, k + 1, sizes).tocsc() for i, layer in enumerate(layers)
                      if k + 1 in layer.sources}
            read = np.zeros(layers[k].weights.shape[0], dtype=bool)
            for block in blocks.values():
                read |= np.asarray(abs(block).sum(axis=0)).ravel() != 0
            self.unread.append(~read)
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
        #: Per layer i and chunk: ``{k: n}``, the chunk may run once the first ``n`` chunks
        #: of layer k (whose square it reads) have been added into it (at least one: the
        #: scale of layer k's squares is then known).
        self.needs: list[list[dict[int, int]]] = [
            [{s - 1: 1 for s in layer.sources if s} for _ in self.chunks[i]]
            for i, layer in enumerate(layers)]
        for k, per_chunk in enumerate(self.stream_kernels):
            for c, entries in enumerate(per_chunk):
                for i, reached, _ in entries:
                    owner = np.empty(layers[i].weights.shape[0], dtype=np.intp)
                    for ci, rows in enumerate(self.chunks[i]):
                        owner[rows] = ci
                    for ci in np.unique(owner[reached]):
                        self.needs[i][ci][k] = max(self.needs[i][ci][k], c + 1)
        #: Input ciphertexts no later chunk reads once chunk c of the first layer has run
        #: (None: other layers read the input too; it is then released after the last).
        self.release_inputs: list[np.ndarray] | None = None
        if [k for k, layer in enumerate(layers) if 0 in layer.sources] == [0] and \
                self.input_kernels[0] is not None:
            last_reader = np.zeros(plan.n_inputs, dtype=np.intp)  # unread: after the first
            for c, kernel in enumerate(self.input_kernels[0]):
                last_reader[_columns(kernel.weights)] = c
            self.release_inputs = [np.flatnonzero(last_reader == c)
                                   for c in range(len(self.chunks[0]))]

    def run(self, ctx: ts.Context, relin: sealapi.RelinKeys, inputs: np.ndarray,
            scale: float) -> tuple[np.ndarray, float]:
        """Evaluate the plan.

        Args:
            ctx: the client's public context (its parameters).
            relin: the client's relinearisation keys.
            inputs: ``(n_inputs, 2, limbs, N)`` uint64 coefficient arrays at the top level
                (units no later chunk reads are released from a shared mapping as the run
                advances: the array is consumed).
            scale: their CKKS scale (1 in BFV).

        Returns the output coefficient arrays and their scale.

        Layer ``k`` runs at the level of its deepest source (the others' extra primes are
        left out, which in NTT form is exact) and at that source's scale; the compiler
        folded the ratio of the scales into the weights. Each chunk of a layer is its
        accumulated outputs plus its product over the input ciphertexts; after its square,
        the chunk's product with every later layer that reads it is added into that
        layer's accumulated outputs, and every chunk of a later layer that has then
        received all its terms runs at once (:attr:`needs`), depth first.
        """
        bridge = SealBridge(ctx)
        state = _Pass(inputs, scale)
        try:
            with one_blas_thread():
                for k in range(len(self.plan.layers)):
                    while state.done[k] < len(self.chunks[k]):
                        assert self._ready(state, k), "every earlier layer has run"
                        self._chunk(bridge, relin, state, k)
            assert state.result is not None, "the output layer runs last"
            self.peak_accumulated_bytes = state.peak_held_bytes
            return state.result
        finally:
            for array in state.acc.values():
                _release(array, np.arange(len(array)))
            bridge.close()

    def _ready(self, state: _Pass, i: int) -> bool:
        """Whether layer ``i``'s next chunk has received every term it needs."""
        c = state.done[i]
        return c < len(self.chunks[i]) and all(
            state.done[k] >= n for k, n in self.needs[i][c].items())

    def _chunk(self, bridge: SealBridge, relin: sealapi.RelinKeys, state: _Pass,
               k: int) -> None:
        """Run the next chunk of layer ``k``: its outputs, their square, its products into
        every later layer; then every later chunk that became ready."""
        layers = self.plan.layers
        layer, c, level = layers[k], state.done[k], self.levels[k]
        rows = self.chunks[k][c]
        refs = self.plan.sources()[2]
        part = state.take(k, rows)
        kernels = self.input_kernels[k]
        if kernels is not None and 0 not in self.early[k]:
            direct = self._linear(bridge, kernels[c], state.inputs[:, :, :level], f"l{k}c{c}")
            part = direct if part is None else self._added(part, direct)
        for s in self.early[k]:  # shallower terms, rescaled to this level
            term = self._linear(bridge, kernels[c], state.inputs, f"l{k}c{c}") if s == 0 \
                else state.take((k, s), rows)
            if term is None:
                continue
            term, _ = self._square(bridge, relin, term, state.scales[s] * 2.0 ** layer.shift,
                                   term.shape[2] - level, times=self.plan.early_constant(k, s))
            part = term if part is None else self._added(part, term)
        if part is None:  # every weight of the chunk is zero
            part = np.zeros((len(rows), 2, level, self.plan.params.poly_modulus_degree),
                            dtype=np.uint64)
        part_scale = self._add_bias(part, k, state.scales[refs[k]], rows)
        if k == len(layers) - 1:
            state.done[k] += 1
            state.result = (part, part_scale)
            return
        squared, state.scales[k + 1] = self._square(bridge, relin, part, part_scale,
                                                    layer.rescale_primes, self.unread[k][rows])
        del part
        self._release_inputs(state, k, c)
        for i, reached, kernel in self.stream_kernels[k][c]:
            # an early-rescaled source keeps its level until layer i rescales it
            key, limbs = ((i, k + 1), squared.shape[2]) if k + 1 in self.early[i] \
                else (i, self.levels[i])
            if key not in state.acc:
                state.acc[key] = _shared_zeros(bridge, f"acc{i}s{k}", (
                    layers[i].weights.shape[0], 2, limbs, squared.shape[3]))
            self._accumulate(bridge, kernel, squared[:, :, :limbs], state.acc[key], reached)
            state.hold(key, reached)
        del squared
        state.done[k] += 1
        for i in sorted({i for i, _, _ in self.stream_kernels[k][c]}):
            while self._ready(state, i):
                self._chunk(bridge, relin, state, i)

    def _release_inputs(self, state: _Pass, k: int, c: int) -> None:
        """Release the input ciphertexts no chunk after chunk ``c`` of layer ``k`` reads."""
        if state.inputs is None:
            return
        if self.release_inputs is not None:
            if k == 0:
                _release(state.inputs, self.release_inputs[c])
        elif all(state.done[i] + (i == k) >= len(self.chunks[i])
                 for i, layer in enumerate(self.plan.layers) if 0 in layer.sources):
            _release(state.inputs, np.arange(len(state.inputs)))
            state.inputs = None

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
            with one_blas_thread():
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

    def _accumulate(self, bridge: SealBridge, kernel: LinearKernel, data: np.ndarray,
                    target: np.ndarray, rows: np.ndarray) -> None:
        """``target[rows] += kernel @ data`` modulo each limb's prime, in place (``target``:
        a shared mapping), the coefficients shared among the workers."""
        moduli = self.primes[: data.shape[2]]
        workers = min(self.workers, data.shape[3])
        _JOB.update(kernel=kernel, data=data, moduli=moduli, out=target, rows=rows)
        try:
            _run_pool(workers, _accumulate_part, _split(data.shape[3], workers))
        finally:
            _JOB.clear()

    def _in_workers(self, bridge: SealBridge, name: str, shape: tuple[int, ...],
                    part: Callable[[range], None], length: int, **job: Any) -> np.ndarray:
        """Fill a new uint64 array of ``shape`` with ``part(range)`` over ``range(length)``,
        split among the workers, which write into a shared-memory mapping."""
        workers = min(self.workers, length)
        out = _shared_zeros(bridge, name, shape)
        _JOB.update(job, out=out)
        try:
            _run_pool(workers, part, _split(length, workers))
        finally:
            _JOB.clear()
        return out

    def _square(self, bridge: SealBridge, relin: sealapi.RelinKeys, data: np.ndarray, scale: float,
                rescales: int, skip: np.ndarray | None = None,
                times: float | None = None) -> tuple[np.ndarray, float]:
        """Square every ciphertext, relinearise, and drop ``rescales`` primes; with
        ``times``, multiply by that integer (an early rescale) instead of squaring. SEAL
        reads and writes files, so each worker passes its ciphertexts through a file of its
        own, one at a time, and writes the results into a shared mapping (the serialising
        and copying run in the workers too, not one after the other in this process).

        The ciphertexts marked in ``skip`` (read by no later layer) and the zero ones (the
        square or product of zero is zero; SEAL refuses such a transparent ciphertext) are
        left out: their results stay zero. Any other transparent ciphertext (inputs that
        cancel out inside the model) gets SEAL's error."""
        out_level = bridge.levels[data.shape[2] - rescales]
        out = _shared_zeros(bridge, "squares", (len(data), 2, out_level.limbs,
                                                out_level.poly_modulus_degree))
        workers = min(self.workers, len(data))
        _JOB.update(bridge=bridge, relin=relin, rescales=rescales, data=data, scale=scale,
                    level=bridge.levels[data.shape[2]], out_level=out_level, out=out,
                    times=times, skip=np.zeros(len(data), dtype=bool) if skip is None else skip)
        try:
            scales = _run_pool(workers, _square_chunk,
                               [range(i, len(data), workers) for i in range(workers)])
        finally:
            _JOB.clear()
        squared = [s for s in scales if s is not None]
        if squared:
            return out, squared[0]
        # nothing went through SEAL: its scale arithmetic (a product, then a division by
        # every prime dropped, the last one first)
        result = scale * (scale if times is None else times)
        for prime in reversed(self.primes[out_level.limbs:data.shape[2]]):
            result /= float(prime)
        return out, result


class _Pass:
    """The state of one :meth:`Engine.run`: chunks done by layer, the scale of every
    source, the accumulated outputs of later layers (by layer, or by ``(layer, source)``
    for terms that layer rescales early), the input ciphertexts and the result."""

    def __init__(self, inputs: np.ndarray, scale: float) -> None:
        self.inputs: np.ndarray | None = inputs
        self.scales: dict[int, float] = {0: scale}
        self.acc: dict[int | tuple[int, int], np.ndarray] = {}
        self.done: dict[int, int] = collections.defaultdict(int)
        self.result: tuple[np.ndarray, float] | None = None
        #: Accumulated units written and not yet taken, by key; their bytes, and the peak.
        self.live: dict[int | tuple[int, int], np.ndarray] = {}
        self.held_bytes = self.peak_held_bytes = 0

    def hold(self, key: int | tuple[int, int], rows: np.ndarray) -> None:
        """Count ``rows`` of ``key`` as held (written into)."""
        live = self.live.setdefault(key, np.zeros(len(self.acc[key]), dtype=bool))
        self.held_bytes += int(np.count_nonzero(~live[rows])) * self.acc[key][0].nbytes
        live[rows] = True
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)

    def take(self, key: int | tuple[int, int], rows: np.ndarray) -> np.ndarray | None:
        """The accumulated outputs ``rows`` of ``key`` (None: nothing was added), released
        from the shared mapping."""
        if key not in self.acc:
            return None
        part = np.array(self.acc[key][rows])
        _release(self.acc[key], rows)
        self.held_bytes -= int(np.count_nonzero(self.live[key][rows])) * self.acc[key][0].nbytes
        self.live[key][rows] = False
        return part


def _block(layer: PlanLayer, source: int, sizes: list[int]) -> sp.csr_matrix:
    """The columns of ``layer``'s weights that read ``source`` (of ``sizes[source]`` units)."""
    start = sum(sizes[s] for s in layer.sources if s < source)
    return sp.csr_matrix(layer.weights)[:, start:start + sizes[source]]


def _chunks(shape: tuple[int, ...], units: int) -> list[np.ndarray]:
    """Unit indices (C-order) of a layer output of ``shape`` in chunks of about ``units``:
    bands of rows across all channels for a feature map ``(C, H, W)`` (a row split into
    groups of channels when one row is more than ``units``), else ranges."""
    total = int(np.prod(shape))
    if units >= total:
        return [np.arange(total)]
    if len(shape) == 3:
        channels, height, width = shape
        grid = np.arange(total).reshape(shape)
        rows = units // (channels * width)
        if rows:
            return [grid[:, h:h + rows].reshape(-1) for h in range(0, height, rows)]
        groups = -(-channels // max(1, units // width))
        group = -(-channels // groups)  # groups of about equal size
        return [grid[c:c + group, h].reshape(-1) for h in range(height)
                for c in range(0, channels, group)]
    return [np.arange(a, min(a + units, total)) for a in range(0, total, units)]


def _columns(weights: np.ndarray | sp.csr_matrix) -> np.ndarray:
    """The columns of ``weights`` holding a nonzero weight."""
    if sp.issparse(weights):
        return np.unique(weights.indices)
    return np.flatnonzero(np.abs(weights).sum(axis=0))


def _shared_zeros(bridge: SealBridge, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A zero uint64 array of ``shape`` in a shared mapping of a sparse file in the bridge's
    (shared-memory) directory: memory is taken only by the pages written, forked workers
    write into it, and :func:`_release` gives units back. The file is unlinked at once."""
    path = bridge.unit_path(name)
    array = np.memmap(path, dtype=np.uint64, mode="w+", shape=shape)
    Path(path).unlink()
    return array


def _release(array: np.ndarray, units: np.ndarray) -> None:
    """Give the memory of ``array[units]`` back (its whole pages; the values become zero);
    nothing for an array that is not a :func:`_shared_zeros` mapping."""
    mapping = getattr(array, "_mmap", None)
    if mapping is None or getattr(array, "offset", 0) or not len(units):
        return
    unit = array[0].nbytes
    units = np.unique(units)
    breaks = np.flatnonzero(np.diff(units) != 1) + 1
    for run in np.split(units, breaks):  # runs of consecutive units
        start = -(-int(run[0]) * unit // mmap.PAGESIZE) * mmap.PAGESIZE
        stop = (int(run[-1]) + 1) * unit // mmap.PAGESIZE * mmap.PAGESIZE
        if stop > start:
            try:
                mapping.madvise(mmap.MADV_REMOVE, start, stop - start)
            except (OSError, AttributeError):  # not supported here: the memory stays
                return


def one_blas_thread() -> threadpool_limits:
    """BLAS limited to one thread in this process and the workers it forks (they inherit
    the setting): the workers already share the cores, and BLAS threads on top of them
    oversubscribe the cores and spin (measured in one process on the loaded 2-core machine:
    the grouped product of a 1->16-channel convolution 0.34 s with one BLAS thread, 33 s
    with OpenBLAS's default two)."""
    return threadpool_limits(1, user_api="blas")


def _split(length: int, parts: int) -> list[range]:
    """``range(length)`` in ``parts`` contiguous ranges of about equal size."""
    bounds = np.linspace(0, length, parts + 1).astype(int)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


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


def _blocks(coefficients: range) -> list[slice]:
    """A worker's coefficients in blocks of :data:`BLOCK_COEFFICIENTS`."""
    return [slice(a, min(a + BLOCK_COEFFICIENTS, coefficients.stop))
            for a in range(coefficients.start, coefficients.stop, BLOCK_COEFFICIENTS)]


def _linear_part(coefficients: range) -> None:
    """Worker: apply the kernel to a range of coefficients of every limb."""
    kernel, data, moduli, out = _JOB["kernel"], _JOB["data"], _JOB["moduli"], _JOB["out"]
    for block in _blocks(coefficients):
        out[..., block] = kernel.apply(data[..., block], moduli)


def _accumulate_part(coefficients: range) -> None:
    """Worker: add the kernel's product over a range of coefficients into the target rows."""
    kernel, data, moduli, out, rows = (_JOB[k] for k in ("kernel", "data", "moduli", "out", "rows"))
    q = np.asarray(moduli, dtype=np.uint64)[None, None, :, None]
    for block in _blocks(coefficients):
        total = out[rows, :, :, block]
        total += kernel.apply(data[..., block], moduli)
        np.subtract(total, q, out=total, where=total >= q)
        out[rows, :, :, block] = total


def _parse_part(indices: range) -> None:
    """Worker: validate and decode the input ciphertexts at ``indices``."""
    blobs, level, scale, out = _JOB["blobs"], _JOB["level"], _JOB["scale"], _JOB["out"]
    for i in indices:
        raw = sealbytes.parse(blobs[i], level, out=out[i])
        if raw.scale != scale:
            raise FormatError(f"input ciphertext {i} has scale {raw.scale}, expected {scale}")


def _reset_signals() -> None:
    """Worker initialiser: default signal handling (a host such as uvicorn installs its own
    SIGTERM/SIGINT handlers, which a forked worker must not inherit)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _square_chunk(indices: range) -> float | None:
    """Worker: square, relinearise (or multiply by ``times``) and rescale the ciphertexts at
    ``indices`` (but those ``skip`` marks and the zero ones), through a file in the bridge's
    (shared-memory) directory, into the shared output; returns the scale of the results
    (None: none went through SEAL)."""
    bridge, relin, data, out = _JOB["bridge"], _JOB["relin"], _JOB["data"], _JOB["out"]
    level, out_level, seal = _JOB["level"], _JOB["out_level"], bridge.seal
    evaluator = sealapi.Evaluator(seal)
    path = Path(bridge.unit_path(f"square{indices.start}"))
    scale = None
    try:
        for i in indices:
            if _JOB["skip"][i] or not data[i].any():
                continue
            path.write_bytes(sealbytes.serialize(sealbytes.RawCiphertext(
                data[i], _JOB["scale"], level.parms_id, level.ntt_form)))
            ct = sealapi.Ciphertext(seal)
            ct.load(seal, str(path))
            if _JOB["times"] is None:
                evaluator.square_inplace(ct)
                evaluator.relinearize_inplace(ct, relin)
            else:  # the integer as a constant plaintext (SEAL encodes it exactly)
                plain = sealapi.Plaintext()
                sealapi.CKKSEncoder(seal).encode(1.0, ct.parms_id(), _JOB["times"], plain)
                evaluator.multiply_plain_inplace(ct, plain)
            for _ in range(_JOB["rescales"]):
                evaluator.rescale_to_next_inplace(ct)
            ct.save(str(path))
            scale = sealbytes.parse(path.read_bytes(), out_level, out=out[i]).scale
    finally:
        path.unlink(missing_ok=True)
    return scale
