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

The first layer's input comes from the client, which can lay it out more cleverly: copy
``r`` of the input is rotated by ``r * D / R`` (``R`` copies), so one product covers ``R``
diagonals and the diagonal count drops ``R``-fold, for ``log2 R`` rotations that sum the
copies (see :class:`LayerLayout`).

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


def replicate(values: np.ndarray, slots: int, replicas: int = 1, shift: int = 0) -> np.ndarray:
    """``values`` in the input layout of a layer: zero-padded to its period ``P`` and tiled
    over ``slots``, replica ``r`` (slots ``[rP, (r+1)P)``, counted modulo ``replicas``)
    rotated left by ``r * shift`` inside its period."""
    columns = input_columns(len(values), slots, replicas, shift)
    padded = np.append(np.asarray(values, dtype=np.float64), 0.0)
    return padded[np.where(columns < len(values), columns, len(values))]


def input_columns(n: int, slots: int, replicas: int = 1, shift: int = 0) -> np.ndarray:
    """Which input index every slot holds in :func:`replicate`'s layout (``>= n``: zero)."""
    p = period(n)
    s = np.arange(slots)
    return (s % p + (s // p % replicas) * shift) % p


@dataclass(frozen=True)
class LayerLayout:
    """The diagonal schedule of one ``n_out x n_in`` layer.

    ``replicas``: the input's copies hold it rotated by ``r * n_diagonals``
    (:func:`replicate`), so that each copy serves its own share of the ``min(P_in, P_out)``
    diagonals: every product then covers ``replicas`` diagonals at once, and
    ``log2(replicas)`` extra rotations sum the copies. Only the client can lay out an input
    this way, so only the first layer uses it.
    """

    n_in: int
    n_out: int
    slots: int
    replicas: int = 1

    @property
    def p_in(self) -> int:
        return period(self.n_in)

    @property
    def p_out(self) -> int:
        return period(self.n_out)

    @property
    def n_diagonals(self) -> int:
        """Diagonal products per evaluation."""
        return min(self.p_in, self.p_out) // self.replicas

    @property
    def baby(self) -> int:
        """Baby-step count ``b`` (a power of two, ``b * giant = n_diagonals``)."""
        return 1 << math.ceil(math.log2(self.n_diagonals) / 2)

    @property
    def giant(self) -> int:
        return self.n_diagonals // self.baby

    @property
    def fold_steps(self) -> list[int]:
        """Rotation steps that sum the ``P_in / P_out`` partial results (hybrid method) and
        the input's replicas."""
        steps, s = [], self.p_out
        while s < self.p_in * self.replicas:
            steps.append(s)
            s *= 2
        return steps

    @property
    def split_step(self) -> int:
        """Rotation that joins the two halves of the giant steps when two processes share
        them (``giant // 2`` giant steps); 0 when there is one giant step."""
        return (self.giant // 2) * self.baby if self.giant > 1 else 0

    @property
    def rotation_steps(self) -> set[int]:
        """Distinct rotation steps (each needs one Galois key)."""
        steps = set(self.fold_steps)
        if self.baby > 1:
            steps.add(1)
        if self.giant > 1:
            steps.update((self.baby, self.split_step))
        return steps

    @property
    def rotations(self) -> int:
        """Rotations one evaluation performs."""
        return self.baby - 1 + self.giant - 1 + len(self.fold_steps)

    def diagonals(self, weights: np.ndarray) -> np.ndarray:
        """The baby-step-ready diagonals, shape ``(giant, baby, slots)``.

        Entry ``[j, i]`` is ``diag_{j*b+i}`` rotated by ``-j*b``: slot ``s`` of ``diag_d``
        holds the weight that joins the output row of slot ``s`` to the input that a rotation
        by ``d`` brings to it.
        """
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.n_out, self.n_in):
            raise ParameterError(f"weights of shape {w.shape}, expected {(self.n_out, self.n_in)}")
        padded = np.zeros((self.p_out, self.p_in))
        padded[: self.n_out, : self.n_in] = w
        rows = np.arange(self.slots) % max(self.p_in, self.p_out) % self.p_out
        columns = input_columns(self.n_in, self.slots, self.replicas, self.n_diagonals)
        out = np.empty((self.giant, self.baby, self.slots))
        for j in range(self.giant):
            for i in range(self.baby):
                d = j * self.baby + i
                out[j, i] = np.roll(padded[rows, np.roll(columns, -d)], j * self.baby)
        return out


def layouts(shapes: list[tuple[int, int]], slots: int) -> list[LayerLayout]:
    """Layouts of a chain of layers given as ``(n_out, n_in)`` shapes; checks they fit.

    The first layer spreads its diagonals over as many input replicas as the slots hold
    (when it does not widen its input: ``P_out <= P_in``).
    """
    out = []
    for k, (n_out, n_in) in enumerate(shapes):
        lay = LayerLayout(n_in, n_out, slots)
        widest = max(lay.p_in, lay.p_out)
        if widest > slots:
            raise ParameterError(
                f"layer {k} ({n_in} -> {n_out} values) needs {widest} slots but a ciphertext "
                f"has {slots}; use batch packing or a larger poly_modulus_degree"
            )
        if k == 0 and lay.p_out <= lay.p_in:
            lay = LayerLayout(n_in, n_out, slots, min(slots // lay.p_in, lay.p_out))
        out.append(lay)
    return out


def min_ring_for(shapes: list[tuple[int, int]]) -> int:
    """Smallest ring size whose slots hold every layer of ``shapes`` in single packing."""
    widest = max(max(period(a), period(b)) for a, b in shapes)
    return 2 * widest


def rotation_steps(layer_layouts: list[LayerLayout]) -> list[int]:
    """Sorted Galois steps (left rotations) a whole plan uses."""
    return sorted(set().union(*(lay.rotation_steps for lay in layer_layouts)))
