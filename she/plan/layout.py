"""Single packing: where values sit in the slots, and the diagonals of each linear layer.

In single packing one input lives in one CKKS ciphertext. A vector of length ``n`` is kept
*replicated*: zero-padded to a period ``P = 2^ceil(log2 n)`` and tiled over all slots, so
that a slot rotation acts cyclically inside every period. A linear layer ``y = W x``
(``W`` is ``m x n``) is then a sum of rotations of ``x`` multiplied by plaintext diagonals
(Halevi-Shoup; the "hybrid" variant when ``m < n``):

* ``D = min(P_in, P_out)`` diagonals; ``diag_d[r] = W[r mod P_out, (r + d) mod P_in]``;
* ``z = sum_d diag_d * rot(x, d)`` over the diagonals that are not zero, evaluated
  baby-step giant-step: ``z = sum_j rot(sum_i rot(diag_{jb+i}, -jb) * rot(x, i), jb)``
  (baby rotations by one slot each; Horner over the non-empty giant steps ``j`` only, each
  jump made of power-of-two rotations; ``b`` is the power of two with fewest rotations);
* if ``P_out < P_in``: ``y = sum_t rot(z, t P_out)`` (``log2(P_in / P_out)`` rotations).

Hidden units need not sit in their natural order: :mod:`she.plan.placement` chooses their
positions so that few diagonals are non-zero (a convolution in natural order needs almost
all ``D``), and the next layer's columns follow them.

The first layer's input comes from the client, which can lay it out more cleverly: copy
``r`` of the input is rotated by ``r * D / R`` (``R`` copies), so one product covers ``R``
diagonals and the diagonal count drops ``R``-fold, for ``log2 R`` rotations that sum the
copies (see :class:`LayerLayout`).

The result is ``y`` replicated with period ``P_out``: the layout the next layer expects.
Every rotation step is a power of two, so the client generates a handful of Galois keys.
This module is pure numpy; :mod:`she.runtime.single` runs it in SEAL.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import ParameterError
from . import placement

#: A giant-step size that is not a power of two needs a Galois key of its own (one more key
#: the client makes and uploads once per session): it is chosen only if it saves more than
#: this many rotations per evaluation.
KEY_ROTATIONS = 1
#: A rotation (key switching) costs about this many plaintext products (measured ~20x at
#: N=16384): the unit of :func:`cost`.
ROTATION_COST = 16

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


@dataclass(frozen=True, eq=False)
class LayerLayout:
    """The diagonal schedule of one ``n_out x n_in`` layer.

    ``replicas``: the input's copies hold it rotated by ``r * n_diagonals``
    (:func:`replicate`), so that each copy serves its own share of the ``min(P_in, P_out)``
    diagonals: every product then covers ``replicas`` diagonals at once, and
    ``log2(replicas)`` extra rotations sum the copies. Only the client can lay out an input
    this way, so only the first layer uses it.

    ``in_pos`` / ``out_pos``: the slot position (inside the period) of every input / output
    unit; None keeps the natural order (the model's input and output, which the client sees).
    ``offsets``: the diagonals that are not zero (:func:`layouts` finds them); None means
    all. Only they are multiplied, and the baby-step count is chosen for them: babies
    ``0 .. n_babies - 1`` by rotations of one slot, and Horner steps over the non-empty
    giant steps only, each jump made of power-of-two rotations.
    """

    n_in: int
    n_out: int
    slots: int
    replicas: int = 1
    in_pos: np.ndarray | None = None
    out_pos: np.ndarray | None = None
    offsets: np.ndarray | None = None

    @property
    def p_in(self) -> int:
        return period(self.n_in)

    @property
    def p_out(self) -> int:
        return period(self.n_out)

    @property
    def n_diagonals(self) -> int:
        """Diagonals of the layout (``d`` ranges over ``0 .. n_diagonals - 1``)."""
        return min(self.p_in, self.p_out) // self.replicas

    @cached_property
    def used(self) -> np.ndarray:
        """The diagonals that are multiplied, sorted."""
        return np.arange(self.n_diagonals) if self.offsets is None else np.asarray(self.offsets)

    @cached_property
    def baby(self) -> int:
        """Giant-step size ``b``: the one with the fewest rotations. A power of two needs no
        Galois key beyond the powers of two; any other size needs one of its own, so it must
        save more than :data:`KEY_ROTATIONS` rotations (convolutions placed by
        :mod:`she.plan.placement` have diagonals in clusters a few slots wide at a regular
        stride, which a giant step of that stride covers)."""
        return min(range(1, self.n_diagonals + 1),
                   key=lambda b: (_schedule_rotations(self.used, b)
                                  + (KEY_ROTATIONS if b & (b - 1) else 0), b))

    @cached_property
    def n_babies(self) -> int:
        """Rotations of the input by ``0 .. n_babies - 1`` slots that the products use."""
        return _schedule(self.used, self.baby)[0]

    @cached_property
    def groups(self) -> list[int]:
        """The non-empty giant steps ``j`` (diagonals ``j*b .. j*b + b - 1``), ascending."""
        return _schedule(self.used, self.baby)[1]

    @property
    def fold_steps(self) -> list[int]:
        """Rotation steps that sum the ``P_in / P_out`` partial results (hybrid method) and
        the input's replicas."""
        steps, s = [], self.p_out
        while s < self.p_in * self.replicas:
            steps.append(s)
            s *= 2
        return steps

    @cached_property
    def split(self) -> int:
        """Where two processes may share the giant steps: ``groups[split:]`` (about half of
        the products) go to the second one, which then rotates its sum down by
        ``groups[split] * b`` itself; 0 when there are fewer than two groups."""
        if len(self.groups) < 2:
            return 0
        per_group = np.bincount(self.used // self.baby)[self.groups]
        upper = np.cumsum(per_group[::-1])
        return len(self.groups) - max(1, min(int(np.searchsorted(upper, upper[-1] / 2)) + 1,
                                             len(self.groups) - 1))

    @cached_property
    def keys(self) -> frozenset[int]:
        """Giant-step rotations that get a Galois key of their own (beyond the powers of
        two): the giant-step size when it is not a power of two, and every jump of the
        Horner sum that recurs often enough to save more than :data:`KEY_ROTATIONS`
        rotations with one key."""
        base = frozenset({self.baby} if self.baby & (self.baby - 1) else ())
        jumps = _jumps(self.groups) + ([self.groups[self.split]] if self.split else [])
        counts: dict[int, int] = {}
        for jump in jumps:
            counts[jump * self.baby] = counts.get(jump * self.baby, 0) + 1
        return base | {step for step, m in counts.items()
                       if m * (len(jump_steps(step, self.baby, base)) - 1) > KEY_ROTATIONS}

    def jump(self, step: int) -> list[int]:
        """The rotations that make a giant-step rotation by ``step``."""
        return jump_steps(step, self.baby, self.keys)

    @property
    def rotation_steps(self) -> set[int]:
        """Distinct rotation steps (each needs one Galois key): powers of two and
        :attr:`keys`."""
        steps = set(self.fold_steps)
        if self.n_babies > 1:
            steps.add(1)
        jumps = _jumps(self.groups) + ([self.groups[self.split]] if self.split else [])
        for jump in jumps:
            steps.update(self.jump(jump * self.baby))
        return steps

    @property
    def rotations(self) -> int:
        """Rotations one evaluation performs (without a split between processes)."""
        return (self.n_babies - 1 + horner_rotations(self.groups, self.baby, self.keys)
                + len(self.fold_steps))

    def diagonals(self, weights: np.ndarray) -> list[list[np.ndarray | None]]:
        """The baby-step-ready diagonals: entry ``[g][i]`` (``g`` indexes :attr:`groups`,
        ``i < n_babies``) is ``diag_{j*b+i}`` rotated by ``-j*b`` for ``j = groups[g]``, or
        None where that diagonal is zero. Slot ``s`` of ``diag_d`` holds the weight that
        joins the output at slot ``s`` to the input that a rotation by ``d`` brings to it.
        """
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.n_out, self.n_in):
            raise ParameterError(f"weights of shape {w.shape}, expected {(self.n_out, self.n_in)}")
        padded = np.zeros((self.p_out, self.p_in))
        padded[np.ix_(_positions(self.out_pos, self.n_out), _positions(self.in_pos, self.n_in))] = w
        rows = np.arange(self.slots) % max(self.p_in, self.p_out) % self.p_out
        columns = input_columns(self.n_in, self.slots, self.replicas, self.n_diagonals)
        used = set(self.used.tolist())
        out: list[list[np.ndarray | None]] = []
        for j in self.groups:
            cells: list[np.ndarray | None] = []
            for i in range(self.n_babies):
                d = j * self.baby + i
                diag = np.roll(padded[rows, np.roll(columns, -d)], j * self.baby) if d in used else None
                cells.append(diag if diag is not None and diag.any() else None)
            out.append(cells)
        return out

    def place_output(self, values: np.ndarray) -> np.ndarray:
        """Per-output ``values`` (e.g. the bias) at their slot positions, zero elsewhere."""
        out = np.zeros(self.p_out)
        out[_positions(self.out_pos, self.n_out)] = values
        return out


def _positions(pos: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) if pos is None else np.asarray(pos)


def power_of_two_steps(step: int) -> list[int]:
    """A rotation by ``step`` as rotations by powers of two (its binary digits)."""
    return [1 << k for k in range(step.bit_length()) if step >> k & 1]


@functools.lru_cache(maxsize=1 << 16)
def jump_steps(step: int, baby: int, keys: frozenset[int] = frozenset()) -> list[int]:
    """A giant-step rotation by ``step`` (a multiple of the giant-step size ``baby``) as the
    fewest rotations: one if ``keys`` (extra Galois keys) hold ``step``, else by ``baby``
    and by powers of two."""
    if step in keys:
        return [step]
    return min(([baby] * m + power_of_two_steps(step - m * baby)
                for m in range(min(step // baby, step.bit_count()) + 1)), key=len)


def _jumps(groups: list[int]) -> list[int]:
    """Giant-step counts rotated in Horner form over ``groups``: between consecutive
    non-empty groups (descending), then down to zero."""
    return [hi - lo for hi, lo in zip(groups[:0:-1], groups[-2::-1], strict=True)] + groups[:1]


def horner_rotations(groups: list[int], baby: int = 1, keys: frozenset[int] = frozenset()) -> int:
    """Rotations of a Horner sum over the giant steps ``groups`` (ascending, of size
    ``baby``), down to 0, with Galois keys for the powers of two and ``keys``."""
    return sum(len(jump_steps(j * baby, baby, keys)) for j in _jumps(groups))


def _schedule(used: np.ndarray, baby: int) -> tuple[int, list[int]]:
    """Baby count and non-empty giant steps (ascending) of diagonals ``used`` at size ``baby``."""
    return int((used % baby).max(initial=0)) + 1, sorted({int(d) for d in used // baby})


def _schedule_rotations(used: np.ndarray, baby: int) -> int:
    n_babies, groups = _schedule(used, baby)
    return n_babies - 1 + horner_rotations(groups, baby)


def layouts(weights: list[np.ndarray], slots: int,
            sources: list[tuple[int, ...]] | None = None) -> list[LayerLayout]:
    """Layouts of a graph of layers (their ``n_out x n_in`` weight matrices; ``sources``:
    what each layer reads, as in :class:`she.frontend.lowering.Chain`, default a chain); checks that
    they fit. Returns one layout per *block*, layer by layer and, inside a layer, in the
    order of its sources: a layer that reads several sources (a skip connection, branches)
    is the sum of one diagonal product per source, every block with the layer's output
    positions. A chain has one block per layer.

    The first layer spreads its diagonals over as many input replicas as the slots hold
    (when it does not widen its input, and no other layer reads the input). Hidden units are
    placed by :func:`she.plan.placement.place_rows` so that few diagonals are needed (in a layer
    of several blocks, for the block of most weights); only those are kept. A layer that
    adds a (scaled) permutation of a source, such as an identity skip, may instead put its
    units where that source's units are, so the skip costs one diagonal: whichever of the
    candidates needs fewer products and rotations (:func:`cost`) is kept.
    """
    sources = sources or [(k,) for k in range(len(weights))]
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights[:-1]]
    positions: list[np.ndarray | None] = [None]  # of every source's units (None: natural)
    input_readers = sum(0 in s for s in sources)
    out: list[LayerLayout] = []
    for k, (w, srcs) in enumerate(zip(weights, sources, strict=True)):
        n_out = w.shape[0]
        bounds = np.cumsum([0] + [sizes[s] for s in srcs])
        blocks = [w[:, a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        plain = [LayerLayout(sizes[s], n_out, slots) for s in srcs]
        for lay in plain:
            widest = max(lay.p_in, lay.p_out)
            if widest > slots:
                raise ParameterError(
                    f"layer {k} ({lay.n_in} -> {n_out} values) needs {widest} slots but a "
                    f"ciphertext has {slots}; use batch packing or a larger poly_modulus_degree")
        first = plain[0]
        replicas = (min(slots // first.p_in, first.p_out)
                    if k == 0 and first.p_out <= first.p_in and input_readers == 1 else 1)
        spread = [LayerLayout(sizes[s], n_out, slots, replicas if s == 0 else 1, positions[s])
                  for s in srcs]
        if k == len(weights) - 1:
            candidates: list[np.ndarray | None] = [None]
        else:
            main = int(np.argmax([np.count_nonzero(b) for b in blocks]))
            lay = spread[main]
            candidates = [placement.place_rows(blocks[main], _positions(lay.in_pos, lay.n_in),
                                               lay.n_diagonals, lay.p_out)]
            candidates += [_positions(positions[s], sizes[s])[perm]
                           for s, b in zip(srcs, blocks, strict=True)
                           if (perm := _permutation(b)) is not None]
        options = [[_with_offsets(lay, b, out_pos) for lay, b in zip(spread, blocks, strict=True)]
                   for out_pos in candidates]
        best = min(options, key=lambda lays: sum(cost(lay) for lay in lays))
        out.extend(best)
        positions.append(best[0].out_pos)
    return out


def cost(lay: LayerLayout) -> int:
    """What one evaluation of ``lay`` costs, in plaintext products (a rotation counts as
    :data:`ROTATION_COST`)."""
    return len(lay.used) + ROTATION_COST * lay.rotations


def _with_offsets(lay: LayerLayout, weights: np.ndarray, out_pos: np.ndarray | None) -> LayerLayout:
    """``lay`` with its outputs at ``out_pos`` and only the diagonals ``weights`` need."""
    r, c = np.nonzero(weights)
    offsets = np.unique((_positions(lay.in_pos, lay.n_in)[c] - _positions(out_pos, lay.n_out)[r])
                        % lay.n_diagonals)
    return LayerLayout(lay.n_in, lay.n_out, lay.slots, lay.replicas, lay.in_pos, out_pos, offsets)


def _permutation(weights: np.ndarray) -> np.ndarray | None:
    """For a square matrix with one non-zero in every row and column (a scaled
    permutation: an identity skip, a sign, per-channel factors), the column of every row's
    non-zero; else None."""
    nonzero = weights != 0
    if weights.shape[0] != weights.shape[1] or not (
            np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1)):
        return None
    return np.argmax(nonzero, axis=1)


def layer_blocks(layer_sources: list[tuple[int, ...]]) -> list[range]:
    """Which of :func:`layouts`' blocks belong to each layer (layers reading
    ``layer_sources``)."""
    bounds = np.cumsum([0] + [len(s) for s in layer_sources])
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def min_ring_for(shapes: list[tuple[int, int]]) -> int:
    """Smallest ring size whose slots hold every layer of ``shapes`` in single packing."""
    widest = max(max(period(a), period(b)) for a, b in shapes)
    return 2 * widest


def rotation_steps(layer_layouts: list[LayerLayout]) -> list[int]:
    """Sorted Galois steps (left rotations) a whole plan uses."""
    return sorted(set().union(*(lay.rotation_steps for lay in layer_layouts)))
