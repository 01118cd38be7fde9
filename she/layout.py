"""Single packing: where values sit in the slots, and the diagonals of each linear layer.

In single packing one input lives in one CKKS ciphertext. A vector of length ``n`` is kept
*replicated*: zero-padded to a period ``P = 2^ceil(log2 n)`` and tiled over all slots, so
that a slot rotation acts cyclically inside every period. A linear layer ``y = W x``
(``W`` is ``m x n``) is then a sum of rotations of ``x`` multiplied by plaintext diagonals
(Halevi-Shoup; the "hybrid" variant when ``m < n``):

* ``D = min(P_in, P_out)`` diagonals; ``diag_d[r] = W[r mod P_out, (r + d) mod P_in]``;
* ``z = sum_d diag_d * rot(x, d)``, evaluated baby-step giant-step with ``D = b * g``:
  ``z = sum_j rot(sum_i rot(diag_{jb+i}, -jb) * rot(x, i), jb)`` (``b - 1`` baby rotations
  by one slot each, ``g - 1`` giant rotations by ``b`` in Horner form);
* if ``P_out < P_in``: ``y = sum_t rot(z, t P_out)`` (``log2(P_in / P_out)`` rotations).

The result is ``y`` replicated with period ``P_out``: the layout the next layer expects.
Every rotation step is a power of two, so the client generates a handful of Galois keys.
This module is pure numpy; :mod:`she.single` runs it in SEAL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ParameterError


def period(n: int) -> int:
    """The replication period of a vector of length ``n``: the next power of two."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def tile(values: np.ndarray, slots: int) -> np.ndarray:
    """``values`` zero-padded to its period and repeated over ``slots`` slots."""
    p = period(len(values))
    block = np.zeros(p)
    block[: len(values)] = values
    return np.tile(block, slots // p)


@dataclass(frozen=True)
class LayerLayout:
    """The diagonal schedule of one ``n_out x n_in`` layer."""

    n_in: int
    n_out: int
    slots: int

    @property
    def p_in(self) -> int:
        return period(self.n_in)

    @property
    def p_out(self) -> int:
        return period(self.n_out)

    @property
    def n_diagonals(self) -> int:
        return min(self.p_in, self.p_out)

    @property
    def baby(self) -> int:
        """Baby-step count ``b`` (a power of two, ``b * giant = n_diagonals``)."""
        return 1 << math.ceil(math.log2(self.n_diagonals) / 2)

    @property
    def giant(self) -> int:
        return self.n_diagonals // self.baby

    @property
    def fold_steps(self) -> list[int]:
        """Rotation steps that sum the ``P_in / P_out`` partial results (hybrid method)."""
        steps, s = [], self.p_out
        while s < self.p_in:
            steps.append(s)
            s *= 2
        return steps

    @property
    def rotation_steps(self) -> set[int]:
        """Distinct rotation steps (each needs one Galois key)."""
        steps = set(self.fold_steps)
        if self.baby > 1:
            steps.add(1)
        if self.giant > 1:
            steps.add(self.baby)
        return steps

    @property
    def rotations(self) -> int:
        """Rotations one evaluation performs."""
        return self.baby - 1 + self.giant - 1 + len(self.fold_steps)

    def diagonals(self, weights: np.ndarray) -> np.ndarray:
        """The baby-step-ready diagonals, shape ``(giant, baby, slots)``.

        Entry ``[j, i]`` is ``diag_{j*b+i}`` rotated by ``-j*b``, tiled over the slots.
        """
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.n_out, self.n_in):
            raise ParameterError(f"weights of shape {w.shape}, expected {(self.n_out, self.n_in)}")
        block = max(self.p_in, self.p_out)
        padded = np.zeros((self.p_out, self.p_in))
        padded[: self.n_out, : self.n_in] = w
        rows = np.arange(block) % self.p_out
        out = np.empty((self.giant, self.baby, self.slots))
        for j in range(self.giant):
            for i in range(self.baby):
                d = j * self.baby + i
                diag = padded[rows, (np.arange(block) + d) % self.p_in]
                out[j, i] = np.roll(np.tile(diag, self.slots // block), j * self.baby)
        return out


def layouts(shapes: list[tuple[int, int]], slots: int) -> list[LayerLayout]:
    """Layouts of a chain of layers given as ``(n_out, n_in)`` shapes; checks they fit."""
    out = []
    for k, (n_out, n_in) in enumerate(shapes):
        layout = LayerLayout(n_in, n_out, slots)
        widest = max(layout.p_in, layout.p_out)
        if widest > slots:
            raise ParameterError(
                f"layer {k} ({n_in} -> {n_out} values) needs {widest} slots but a ciphertext "
                f"has {slots}; use batch packing or a larger poly_modulus_degree"
            )
        out.append(layout)
    return out


def min_ring_for(shapes: list[tuple[int, int]]) -> int:
    """Smallest ring size whose slots hold every layer of ``shapes`` in single packing."""
    widest = max(max(period(a), period(b)) for a, b in shapes)
    return 2 * widest


def rotation_steps(layer_layouts: list[LayerLayout]) -> list[int]:
    """Sorted Galois steps (left rotations) a whole plan uses."""
    return sorted(set().union(*(lay.rotation_steps for lay in layer_layouts)))
