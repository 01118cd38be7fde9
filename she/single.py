"""Server-side execution of a plan in single packing (one sample per ciphertext, CKKS).

The layout and the diagonal schedule come from :mod:`she.layout`; this module runs them
with SEAL's evaluator: rotations (Galois keys for the plan's power-of-two steps only),
plaintext-diagonal products, bias addition, and square / relinearise / rescale between
layers. Each linear layer multiplies by diagonals encoded at scale ``2^shift``; that scale
is removed by the rescale after the following square, exactly as the plan's scales say.
"""

from __future__ import annotations

import threading

import tenseal as ts
import tenseal.sealapi as sealapi

from . import layout
from .compiler import Plan
from .errors import ParameterError


class SingleEngine:
    """Runs one single-packing plan; encoded diagonals are shared by all sessions."""

    def __init__(self, plan: Plan) -> None:
        if plan.packing != "single":
            raise ParameterError("SingleEngine needs a single-packing plan")
        for k, layer in enumerate(plan.layers):
            if not layer.weights.any():
                raise ParameterError(f"layer {k} has only zero weights; single packing cannot run it")
        self.plan = plan
        self.layouts = plan.layouts()
        self.slots = plan.params.slots
        self._diagonals = [lay.diagonals(layer.weights * 2.0 ** -layer.shift)
                           for lay, layer in zip(self.layouts, plan.layers, strict=True)]
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
            ct = _diagonal_product(evaluator, galois, lay, plain[k], ct)
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
                      x: sealapi.Ciphertext) -> sealapi.Ciphertext:
    """``sum_d diag_d * rot(x, d)`` baby-step giant-step, then the hybrid fold."""
    babies = [x]
    for _ in range(1, lay.baby):
        nxt = sealapi.Ciphertext()
        evaluator.rotate_vector(babies[-1], 1, galois, nxt)
        babies.append(nxt)
    acc: sealapi.Ciphertext | None = None
    for j in reversed(range(lay.giant)):
        if acc is not None:
            evaluator.rotate_vector_inplace(acc, lay.baby, galois)
        for i, diag in enumerate(plain[j]):
            if diag is None:
                continue
            term = sealapi.Ciphertext()
            evaluator.multiply_plain(babies[i], diag, term)
            if acc is None:
                acc = term
            else:
                evaluator.add_inplace(acc, term)
    assert acc is not None  # SingleEngine refuses all-zero layers
    for step in lay.fold_steps:
        rotated = sealapi.Ciphertext()
        evaluator.rotate_vector(acc, step, galois, rotated)
        evaluator.add_inplace(acc, rotated)
    return acc


def _parms_ids(seal: sealapi.SEALContext) -> dict[int, list[int]]:
    """parms_id of every level, keyed by its number of ciphertext primes."""
    out = {}
    data = seal.first_context_data()
    while data is not None:
        out[len(data.parms().coeff_modulus())] = data.parms_id()
        data = data.next_context_data()
    return out
