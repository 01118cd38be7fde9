"""Server-side execution of a plan in single packing (one sample per ciphertext, CKKS).

The layout and the diagonal schedule come from :mod:`she.plan.layout`; this module runs them
with SEAL's evaluator: rotations (Galois keys for the plan's steps only),
plaintext-diagonal products, bias addition, and square / relinearise / rescale between
layers. Each linear layer multiplies by diagonals encoded at scale ``2^shift``; that scale
is removed by the rescale after the following square, exactly as the plan's scales say.

Hidden units sit where :mod:`she.plan.placement` put them, so a convolution needs only a few of
its diagonals; only those are multiplied (see :class:`~she.plan.layout.LayerLayout`).

A layer that reads several sources (a skip connection, branches) is one diagonal product
per source, summed. Every source ciphertext is kept until the last layer that reads it; a
shallower one (more primes) is first brought to the layer's level by dropping its extra
primes (``mod_switch``: exact), and its diagonals are encoded at the scale that makes its
product land at the reference product's scale (:meth:`~she.plan.compiler.Plan.diagonal_scales`),
so the sum is exact; the two scales then differ by the rounding of one floating-point
product at most, and the sum takes the reference's.

SEAL's bindings hold the GIL, so with ``workers`` > 1 a layer's giant steps are shared with
a forked process: it sums the upper ones (about half of the products, Horner form) and
rotates its sum into place while this process sums the lower ones. Forking and passing the
half back cost about 10-20 ms, so only layers whose upper half costs at least
:data:`SPLIT_MIN_COST` products are split (measured: a GHN MNIST network with a
1024-diagonal layer 0.88 s -> 0.72 s; the small TenSEAL-tutorial network would go from
0.19 s to 0.23 s, so it is not split).
"""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from ..errors import ParameterError
from ..plan import layout
from ..plan.compiler import Plan

#: Cheapest upper half of a layer's giant steps worth a fork, in diagonal products (a
#: rotation counts as :data:`she.plan.layout.ROTATION_COST` products).
SPLIT_MIN_COST = 256


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
        #: One layout per block (a layer's product over one of its sources; see
        #: :meth:`~she.plan.compiler.Plan.layouts`) and the blocks of every layer.
        self.layouts = plan.layouts()
        self.blocks = plan.layer_blocks()
        self.slots = plan.params.slots
        sizes = plan.chain.source_sizes
        self._diagonals = []
        for layer, blocks in zip(plan.layers, self.blocks, strict=True):
            bounds = np.cumsum([0] + [sizes[s] for s in layer.sources])
            weights = np.asarray(layer.weights) * 2.0 ** -layer.shift
            self._diagonals += [self.layouts[b].diagonals(weights[:, start:stop])
                                for b, start, stop in zip(blocks, bounds[:-1], bounds[1:],
                                                          strict=True)]
        #: Per block: the group index from which a forked process takes the giant steps
        #: (0: the block is not split).
        self.split = [lay.split if self.workers > 1 and _upper_cost(lay) >= SPLIT_MIN_COST else 0
                      for lay in self.layouts]
        self._biases = [layout.replicate(self.layouts[blocks[0]].place_output(layer.bias),
                                         self.slots)
                        for layer, blocks in zip(plan.layers, self.blocks, strict=True)]
        #: The last layer that reads every source (its ciphertext is dropped after it).
        self._last_reader = {s: k for k, layer in enumerate(plan.layers) for s in layer.sources}
        self._plain: list[list[list[sealapi.Plaintext | None]]] | None = None
        #: Encoded biases by layer, level and scale (see :meth:`_bias`).
        self._bias_plain: dict[tuple[int, tuple[int, ...], float], sealapi.Plaintext] = {}
        self._lock = threading.Lock()

    def _encode_diagonals(self, seal: sealapi.SEALContext) -> list[list[list[sealapi.Plaintext | None]]]:
        """Encode every non-zero diagonal once, at its layer's level and scale."""
        with self._lock:
            if self._plain is None:
                encoder = sealapi.CKKSEncoder(seal)
                parms = _parms_ids(seal)
                encoded = []
                levels = self.plan.levels()
                block_levels = [levels[k] for k, blocks in enumerate(self.blocks) for _ in blocks]
                for diags, scale, limbs in zip(self._diagonals, self.plan.diagonal_scales(),
                                               block_levels, strict=True):
                    rows = []
                    for row in diags:
                        cells: list[sealapi.Plaintext | None] = []
                        for diag in row:
                            if diag is None:
                                cells.append(None)
                                continue
                            plain = sealapi.Plaintext()
                            encoder.encode(diag.tolist(), parms[limbs], scale, plain)
                            # weights too small for the scale encode to zero: skip them
                            cells.append(None if plain.is_zero() else plain)
                        rows.append(cells)
                    encoded.append(rows)
                self._plain = encoded
                self._diagonals = []  # the encoded form is all that is needed from now on
            return self._plain

    def _bias(self, encoder: sealapi.CKKSEncoder, k: int,
              ct: sealapi.Ciphertext) -> sealapi.Plaintext:
        """Layer ``k``'s bias encoded at ``ct``'s level and scale (the same for every
        request of a plan: encoded once)."""
        key = (k, tuple(ct.parms_id()), ct.scale)
        with self._lock:
            plain = self._bias_plain.get(key)
            if plain is None:
                plain = sealapi.Plaintext()
                encoder.encode(self._biases[k].tolist(), ct.parms_id(), ct.scale, plain)
                self._bias_plain[key] = plain
            return plain

    def run(self, ctx: ts.Context, relin: sealapi.RelinKeys, galois: sealapi.GaloisKeys,
            ct: sealapi.Ciphertext) -> sealapi.Ciphertext:
        """Evaluate the plan on one input ciphertext (consumed) and return the output."""
        seal = ctx.seal_context().data
        plain = self._encode_diagonals(seal)
        evaluator = sealapi.Evaluator(seal)
        encoder = sealapi.CKKSEncoder(seal)
        parms = _parms_ids(seal)
        levels, refs = self.plan.levels(), self.plan.sources()[2]
        sources = {0: ct}  # the input and the squares later layers still read
        for k, (blocks, layer) in enumerate(zip(self.blocks, self.plan.layers, strict=True)):
            ct = None
            # the reference source's product first: the others land at its scale
            for s, b in sorted(zip(layer.sources, blocks, strict=True),
                               key=lambda sb: sb[0] != refs[k]):
                x = sources[s]
                if self._last_reader[s] == k:
                    del sources[s]
                if x.coeff_modulus_size() > levels[k]:  # a shallower source: drop primes
                    lower = sealapi.Ciphertext()
                    evaluator.mod_switch_to(x, parms[levels[k]], lower)
                    x = lower
                term = _diagonal_product(evaluator, galois, self.layouts[b], plain[b], x, seal,
                                         split=self.split[b])
                if term is None:  # every weight of this block encoded to zero
                    continue
                if ct is not None:  # equal up to the rounding of a floating-point product
                    assert abs(term.scale / ct.scale - 1) < 1e-12, (term.scale, ct.scale)
                    term.scale = ct.scale
                ct = term if ct is None else _added(evaluator, ct, term)
            if ct is None:
                raise ParameterError(f"layer {k}: every weight encodes to zero at its scale")
            for _ in range(layer.product_primes):
                evaluator.rescale_to_next_inplace(ct)
            evaluator.add_plain_inplace(ct, self._bias(encoder, k, ct))
            if k < self.plan.squares:
                evaluator.square_inplace(ct)
                evaluator.relinearize_inplace(ct, relin)
                for _ in range(layer.rescale_primes):
                    evaluator.rescale_to_next_inplace(ct)
                if k + 1 in self._last_reader:
                    sources[k + 1] = ct
        return ct


def _diagonal_product(evaluator: sealapi.Evaluator, galois: sealapi.GaloisKeys,
                      lay: layout.LayerLayout, plain: list[list[sealapi.Plaintext | None]],
                      x: sealapi.Ciphertext, seal: sealapi.SEALContext,
                      split: int = 0) -> sealapi.Ciphertext | None:
    """``sum_d diag_d * rot(x, d)`` baby-step giant-step (:class:`~she.plan.layout.Schedule`),
    then the hybrid fold (None if every diagonal is zero). With ``split`` > 0, a forked
    process sums the giant steps ``giants[split:]``."""
    schedule = lay.schedule
    babies = [x]
    for source, step in schedule.baby_steps:
        nxt = sealapi.Ciphertext()
        evaluator.rotate_vector(babies[source], step, galois, nxt)
        babies.append(nxt)
    giants = list(schedule.giants)
    if split:
        upper = _in_child(seal, lambda: _horner(evaluator, galois, lay, giants[split:],
                                                plain[split:], babies))
        try:
            acc = _horner(evaluator, galois, lay, giants[:split], plain[:split], babies)
        finally:
            joined = upper.result()  # always reap the child
        if joined is not None:
            acc = joined if acc is None else _added(evaluator, acc, joined)
    else:
        acc = _horner(evaluator, galois, lay, giants, plain, babies)
    if acc is None:
        return None
    for step in lay.fold_steps:
        rotated = sealapi.Ciphertext()
        evaluator.rotate_vector(acc, step, galois, rotated)
        evaluator.add_inplace(acc, rotated)
    return acc


def _horner(evaluator: sealapi.Evaluator, galois: sealapi.GaloisKeys, lay: layout.LayerLayout,
            giants: list[int], plain: list[list[sealapi.Plaintext | None]],
            babies: list[sealapi.Ciphertext]) -> sealapi.Ciphertext | None:
    """``sum_g rot(sum_i diag_gi * baby_i, giants[g])`` in Horner form (descending, each
    jump made of :meth:`~she.plan.layout.LayerLayout.jump`); None if every diagonal is zero."""
    acc: sealapi.Ciphertext | None = None
    at = 0  # the giant step acc is rotated to
    for giant, row in zip(reversed(giants), reversed(plain), strict=True):
        if acc is not None:
            _rotate(evaluator, acc, lay.jump(at - giant), galois)
        for i, diag in enumerate(row):
            if diag is None:
                continue
            term = sealapi.Ciphertext()
            evaluator.multiply_plain(babies[i], diag, term)
            acc = term if acc is None else _added(evaluator, acc, term)
        at = giant
    if acc is not None:
        _rotate(evaluator, acc, lay.jump(at), galois)
    return acc


def _rotate(evaluator: sealapi.Evaluator, ct: sealapi.Ciphertext, steps: list[int],
            galois: sealapi.GaloisKeys) -> None:
    for step in steps:
        evaluator.rotate_vector_inplace(ct, step, galois)


def _upper_cost(lay: layout.LayerLayout) -> int:
    """Cost of the split-off giant steps in products (0 if the layer cannot be split)."""
    if not lay.split:
        return 0
    schedule = lay.schedule
    products = int(np.count_nonzero(schedule.cells[lay.split:] >= 0))
    return products + layout.ROTATION_COST * layout.horner_rotations(
        list(schedule.giants[lay.split:]), schedule.unit, lay.keys)


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
