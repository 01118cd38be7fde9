"""Server-side execution of a plan in single packing (one sample per ciphertext, CKKS).

The layout and the diagonal schedule come from :mod:`she.layout`; this module runs them
with SEAL's evaluator: rotations (Galois keys for the plan's power-of-two steps only),
plaintext-diagonal products, bias addition, and square / relinearise / rescale between
layers. Each linear layer multiplies by diagonals encoded at scale ``2^shift``; that scale
is removed by the rescale after the following square, exactly as the plan's scales say.

SEAL's bindings hold the GIL, so with ``workers`` > 1 a layer's giant steps are shared with
a forked process: it sums the upper half of the giant steps (Horner form) while this
process sums the lower half, and one rotation by :attr:`~she.layout.LayerLayout.split_step`
joins them. Forking and passing the half back cost about 10-20 ms, so only layers with at
least :data:`SPLIT_MIN_PRODUCTS` products in that half are split (measured: a GHN MNIST
network with a 1024-diagonal layer 0.88 s -> 0.72 s; the small TenSEAL-tutorial network
would go from 0.19 s to 0.23 s, so it is not split).
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from . import layout
from .compiler import Plan
from .errors import ParameterError

#: Fewest diagonal products in the upper half of a layer's giant steps worth a fork.
SPLIT_MIN_PRODUCTS = 256


class SingleEngine:
    """Runs one single-packing plan; encoded diagonals are shared by all sessions.

    ``workers``: processes per request (the thread-count setting; default every core, at
    most 2 are used: the giant steps of a layer are split in two halves).
    """

    def __init__(self, plan: Plan, workers: int | None = None) -> None:
        if plan.packing != "single":
            raise ParameterError("SingleEngine needs a single-packing plan")
        for k, layer in enumerate(plan.layers):
            if not layer.weights.any():
                raise ParameterError(f"layer {k} has only zero weights; single packing cannot run it")
        self.plan = plan
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.layouts = plan.layouts()
        self.slots = plan.params.slots
        self._diagonals = [lay.diagonals(layer.weights * 2.0 ** -layer.shift)
                           for lay, layer in zip(self.layouts, plan.layers, strict=True)]
        #: Layers whose giant steps are shared with a forked process.
        self.split = [self.workers > 1 and lay.giant > 1 and int(
            np.count_nonzero(diags[lay.giant // 2:].any(axis=2))) >= SPLIT_MIN_PRODUCTS
            for lay, diags in zip(self.layouts, self._diagonals, strict=True)]
        self._biases = [layout.replicate(layer.bias, self.slots) for layer in plan.layers]
        self._plain: list[list[list[sealapi.Plaintext | None]]] | None = None
        self._lock = threading.Lock()

    def _encode_diagonals(self, seal: sealapi.SEALContext) -> list[list[list[sealapi.Plaintext | None]]]:
        """Encode every non-zero diagonal once, at its layer's level and scale."""
        with self._lock:
            if self._plain is None:
                encoder = sealapi.CKKSEncoder(seal)
                parms = _parms_ids(seal)
                encoded = []
                for diags, scale, limbs in zip(self._diagonals, self.plan.diagonal_scales(),
                                               self.plan.levels(), strict=True):
                    rows = []
                    for row in diags:
                        cells: list[sealapi.Plaintext | None] = []
                        for diag in row:
                            if not diag.any():
                                cells.append(None)
                                continue
                            plain = sealapi.Plaintext()
                            encoder.encode(diag.tolist(), parms[limbs], scale, plain)
                            cells.append(plain)
                        rows.append(cells)
                    encoded.append(rows)
                self._plain = encoded
                self._diagonals = []  # the encoded form is all that is needed from now on
            return self._plain

    def run(self, ctx: ts.Context, relin: sealapi.RelinKeys, galois: sealapi.GaloisKeys,
            ct: sealapi.Ciphertext) -> sealapi.Ciphertext:
        """Evaluate the plan on one input ciphertext (consumed) and return the output."""
        seal = ctx.seal_context().data
        plain = self._encode_diagonals(seal)
        evaluator = sealapi.Evaluator(seal)
        encoder = sealapi.CKKSEncoder(seal)
        for k, (lay, layer) in enumerate(zip(self.layouts, self.plan.layers, strict=True)):
            ct = _diagonal_product(evaluator, galois, lay, plain[k], ct, seal,
                                   split=self.split[k])
            for _ in range(layer.product_primes):
                evaluator.rescale_to_next_inplace(ct)
            bias = sealapi.Plaintext()
            encoder.encode(self._biases[k].tolist(), ct.parms_id(), ct.scale, bias)
            evaluator.add_plain_inplace(ct, bias)
            if k < self.plan.depth:
                evaluator.square_inplace(ct)
                evaluator.relinearize_inplace(ct, relin)
                for _ in range(layer.rescale_primes):
                    evaluator.rescale_to_next_inplace(ct)
        return ct


def _diagonal_product(evaluator: sealapi.Evaluator, galois: sealapi.GaloisKeys,
                      lay: layout.LayerLayout, plain: list[list[sealapi.Plaintext | None]],
                      x: sealapi.Ciphertext, seal: sealapi.SEALContext,
                      split: bool = False) -> sealapi.Ciphertext:
    """``sum_d diag_d * rot(x, d)`` baby-step giant-step, then the hybrid fold. With
    ``split``, a forked process sums the upper half of the giant steps."""
    babies = [x]
    for _ in range(1, lay.baby):
        nxt = sealapi.Ciphertext()
        evaluator.rotate_vector(babies[-1], 1, galois, nxt)
        babies.append(nxt)
    half = lay.giant // 2
    if split and half:
        upper = _in_child(seal, lambda: _giant_steps(evaluator, galois, lay, plain, babies,
                                                     range(half, lay.giant)))
        try:
            acc = _giant_steps(evaluator, galois, lay, plain, babies, range(half))
        finally:
            joined = upper.result()  # always reap the child
        if joined is not None:
            evaluator.rotate_vector_inplace(joined, lay.split_step, galois)
            acc = joined if acc is None else _added(evaluator, acc, joined)
    else:
        acc = _giant_steps(evaluator, galois, lay, plain, babies, range(lay.giant))
    assert acc is not None  # SingleEngine refuses all-zero layers
    for step in lay.fold_steps:
        rotated = sealapi.Ciphertext()
        evaluator.rotate_vector(acc, step, galois, rotated)
        evaluator.add_inplace(acc, rotated)
    return acc


def _giant_steps(evaluator: sealapi.Evaluator, galois: sealapi.GaloisKeys,
                 lay: layout.LayerLayout, plain: list[list[sealapi.Plaintext | None]],
                 babies: list[sealapi.Ciphertext], steps: range) -> sealapi.Ciphertext | None:
    """``sum_{j in steps} rot(sum_i diag_ji * baby_i, (j - steps.start) * baby)`` in Horner
    form; None if every diagonal of ``steps`` is zero."""
    acc: sealapi.Ciphertext | None = None
    for j in reversed(steps):
        if acc is not None:
            evaluator.rotate_vector_inplace(acc, lay.baby, galois)
        for i, diag in enumerate(plain[j]):
            if diag is None:
                continue
            term = sealapi.Ciphertext()
            evaluator.multiply_plain(babies[i], diag, term)
            acc = term if acc is None else _added(evaluator, acc, term)
    return acc


def _added(evaluator: sealapi.Evaluator, acc: sealapi.Ciphertext,
           term: sealapi.Ciphertext) -> sealapi.Ciphertext:
    evaluator.add_inplace(acc, term)
    return acc


class _Child:
    """A computation running in a forked process; :meth:`result` waits for it."""

    def __init__(self, seal: sealapi.SEALContext, pid: int, path: str) -> None:
        self._seal, self._pid, self._path = seal, pid, path

    def result(self) -> sealapi.Ciphertext | None:
        _, status = os.waitpid(self._pid, 0)
        try:
            code = os.waitstatus_to_exitcode(status)
            if code == 2:
                return None
            if code != 0:
                raise RuntimeError(f"single-packing worker process failed (exit status {code})")
            ct = sealapi.Ciphertext(self._seal)
            ct.load(self._seal, self._path)
            return ct
        finally:
            if os.path.exists(self._path):
                os.unlink(self._path)


def _in_child(seal: sealapi.SEALContext, work) -> _Child:
    """Run ``work()`` (returning a ciphertext or None) in a forked process."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="she-single-", dir=shm)
    os.close(fd)
    pid = os.fork()
    if pid == 0:  # the child: no cleanup handlers, no return into the caller's stack
        code = 1
        try:
            ct = work()
            if ct is None:
                code = 2
            else:
                ct.save(path)
                code = 0
        finally:
            os._exit(code)
    return _Child(seal, pid, path)


def _parms_ids(seal: sealapi.SEALContext) -> dict[int, list[int]]:
    """parms_id of every level, keyed by its number of ciphertext primes."""
    out = {}
    data = seal.first_context_data()
    while data is not None:
        out[len(data.parms().coeff_modulus())] = data.parms_id()
        data = data.next_context_data()
    return out
