"""Single packing: where values sit in the slots, and the diagonals of each linear layer.

In single packing one input lives in one CKKS ciphertext. A vector of length ``n`` is kept
*replicated*: zero-padded to a period ``P = 2^ceil(log2 n)`` and tiled over all slots, so
that a slot rotation acts cyclically inside every period. A linear layer ``y = W x``
(``W`` is ``m x n``) is then a sum of rotations of ``x`` multiplied by plaintext diagonals
(Halevi-Shoup; the "hybrid" variant when ``m < n``):

* ``D = min(P_in, P_out)`` diagonals; ``diag_d[r] = W[r mod P_out, (r + d) mod P_in]``;
* ``z = sum_d diag_d * rot(x, d)`` over the diagonals that are not zero, evaluated
  baby-step giant-step: ``z = sum_g rot(sum_b rot(diag_{g+b}, -g) * rot(x, b), g)``
  (Horner over the non-empty giant steps ``g`` only, each jump made of power-of-two
  rotations or one with a key of its own; see :class:`Schedule`): babies ``b = 0 .. n - 1``
  by one slot each and giant steps at multiples of one size (the *grid* schedule), or,
  for diagonals in clusters at a regular stride, babies in rows (by one slot and by the
  stride) and giant steps at any offsets (*row* schedules), whichever rotates least;
* if ``P_out < P_in``: ``y = sum_t rot(z, t P_out)`` (``log2(P_in / P_out)`` rotations).

Hidden units need not sit in their natural order: :mod:`she.plan.placement` chooses their
positions so that few diagonals are non-zero (a convolution in natural order needs almost
all ``D``), and the next layer's columns follow them.

The first layer's input comes from the client, which can lay it out more cleverly: copy
``r`` of the input is rotated by ``r * D / R`` (``R`` copies), so one product covers ``R``
diagonals and the diagonal count drops ``R``-fold, for ``log2 R`` rotations that sum the
copies (see :class:`LayerLayout`).

The result is ``y`` replicated with period ``P_out``: the layout the next layer expects.
Rotation steps are powers of two and the few steps that get a key of their own, so the
client generates a handful of Galois keys.
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
    all. Only they are multiplied, and the baby-step giant-step :attr:`schedule` is chosen
    for them.
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
    def schedule(self) -> Schedule:
        """The baby-step giant-step schedule with the fewest rotations (a Galois key beyond
        the powers of two counting :data:`KEY_ROTATIONS`): the grid one (babies ``0 ..
        n - 1``, giant steps at multiples of one size, :func:`grid_schedule`) or, for
        diagonals in clusters at a regular stride (a placed convolution: clusters of kernel
        columns every input row), rows of babies (:func:`row_schedules`)."""
        grid = min(range(1, self.n_diagonals + 1),
                   key=lambda b: (_grid_rotations(self.used, b)
                                  + (KEY_ROTATIONS if b & (b - 1) else 0), b))
        candidates = [grid_schedule(self.used, grid)] + row_schedules(self.used)
        return min(candidates, key=lambda s: s.rotations(self.fold_steps, self.split_of(s))
                   + KEY_ROTATIONS * len(s.keys(self.split_of(s))))

    @property
    def fold_steps(self) -> list[int]:
        """Rotation steps that sum the ``P_in / P_out`` partial results (hybrid method) and
        the input's replicas."""
        steps, s = [], self.p_out
        while s < self.p_in * self.replicas:
            steps.append(s)
            s *= 2
        return steps

    @staticmethod
    def split_of(schedule: Schedule) -> int:
        """Where two processes may share the giant steps of ``schedule``: ``giants[split:]``
        (about half of the products) go to the second one, which then rotates its sum down
        by ``giants[split]`` itself; 0 when there are fewer than two giant steps."""
        if len(schedule.giants) < 2:
            return 0
        upper = np.cumsum((schedule.cells >= 0).sum(axis=1)[::-1])
        return len(schedule.giants) - max(1, min(int(np.searchsorted(upper, upper[-1] / 2)) + 1,
                                                 len(schedule.giants) - 1))

    @property
    def split(self) -> int:
        """:meth:`split_of` this layout's schedule."""
        return self.split_of(self.schedule)

    @cached_property
    def keys(self) -> frozenset[int]:
        """Rotation steps that get a Galois key of their own (beyond the powers of two), see
        :meth:`Schedule.keys`."""
        return self.schedule.keys(self.split)

    def jump(self, step: int) -> list[int]:
        """The rotations that make a giant-step rotation by ``step``."""
        return jump_steps(step, self.schedule.unit, self.keys)

    @property
    def rotation_steps(self) -> set[int]:
        """Distinct rotation steps (each needs one Galois key): powers of two and
        :attr:`keys`."""
        steps = set(self.fold_steps) | {step for _, step in self.schedule.baby_steps}
        for jump in self.schedule.jumps(self.split):
            steps.update(self.jump(jump))
        return steps

    @property
    def rotations(self) -> int:
        """Rotations one evaluation performs (without a split between processes)."""
        return self.schedule.rotations(self.fold_steps, self.split)

    def diagonals(self, weights: np.ndarray) -> list[list[np.ndarray | None]]:
        """The baby-step-ready diagonals: entry ``[g][i]`` (``g`` indexes the schedule's
        giant steps, ``i`` its babies) is ``diag_d`` for ``d = giants[g] + babies[i]``
        rotated by ``-giants[g]``, or None where the schedule has no diagonal there or it is
        zero. Slot ``s`` of ``diag_d`` holds the weight that joins the output at slot ``s``
        to the input that a rotation by ``d`` brings to it.
        """
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.n_out, self.n_in):
            raise ParameterError(f"weights of shape {w.shape}, expected {(self.n_out, self.n_in)}")
        padded = np.zeros((self.p_out, self.p_in))
        padded[np.ix_(_positions(self.out_pos, self.n_out), _positions(self.in_pos, self.n_in))] = w
        rows = np.arange(self.slots) % max(self.p_in, self.p_out) % self.p_out
        columns = input_columns(self.n_in, self.slots, self.replicas, self.n_diagonals)
        out: list[list[np.ndarray | None]] = []
        for giant, cells in zip(self.schedule.giants, self.schedule.cells, strict=True):
            row: list[np.ndarray | None] = []
            for d in cells.tolist():
                diag = np.roll(padded[rows, np.roll(columns, -d)], giant) if d >= 0 else None
                row.append(diag if diag is not None and diag.any() else None)
            out.append(row)
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
def jump_steps(step: int, unit: int, keys: frozenset[int] = frozenset()) -> list[int]:
    """A giant-step rotation by ``step`` as the fewest rotations: one if ``keys`` (extra
    Galois keys) hold ``step``, else by ``unit`` (the schedule's stride) and by powers of
    two."""
    if step in keys:
        return [step]
    return min(([unit] * m + power_of_two_steps(step - m * unit)
                for m in range(min(step // unit, step.bit_count()) + 1)), key=len)


def _jumps(giants: list[int]) -> list[int]:
    """Rotations of a Horner sum over the giant steps ``giants`` (ascending offsets):
    between consecutive ones (descending), then down to zero."""
    return [hi - lo for hi, lo in zip(giants[:0:-1], giants[-2::-1], strict=True)] + giants[:1]


def horner_rotations(giants: list[int], unit: int = 1, keys: frozenset[int] = frozenset()) -> int:
    """Rotations of a Horner sum over the giant steps ``giants`` (ascending offsets), down
    to 0, with Galois keys for the powers of two, ``unit`` and ``keys``."""
    return sum(len(jump_steps(j, unit, keys)) for j in _jumps(giants))


@dataclass(frozen=True, eq=False)
class Schedule:
    """Which rotations of the input (*babies*) and which giant steps compute
    ``sum_d diag_d * rot(x, d)`` over the used diagonals: every used ``d`` is
    ``giants[g] + babies[i]`` for exactly one cell ``cells[g, i] == d`` (-1: no diagonal),
    and the sum is ``sum_g rot(sum_i rot(diag_{cells[g, i]}, -giants[g]) * baby_i,
    giants[g])`` in Horner form over the giant steps.

    ``baby_steps``: for ``babies[1:]``, the baby it is rotated from and the step (one
    rotation each). Giant-step jumps are made of rotations by ``unit`` and powers of two,
    or one rotation with a key of their own (:meth:`keys`).
    """

    babies: tuple[int, ...]
    baby_steps: tuple[tuple[int, int], ...]
    giants: tuple[int, ...]
    cells: np.ndarray
    unit: int

    def jumps(self, split: int = 0) -> list[int]:
        """The Horner sum's giant-step rotations (with ``split``: also the second process's
        rotation of its sum down by ``giants[split]``)."""
        return _jumps(list(self.giants)) + ([self.giants[split]] if split else [])

    def keys(self, split: int = 0) -> frozenset[int]:
        """Steps that get a Galois key of their own (beyond the powers of two): the baby
        steps and ``unit`` that are not powers of two, and every giant-step jump that recurs
        often enough to save more than :data:`KEY_ROTATIONS` rotations with one key."""
        base = frozenset(s for s in {self.unit, *(step for _, step in self.baby_steps)}
                         if s & (s - 1))
        counts: dict[int, int] = {}
        for jump in self.jumps(split):
            counts[jump] = counts.get(jump, 0) + 1
        return base | {step for step, m in counts.items()
                       if m * (len(jump_steps(step, self.unit, base)) - 1) > KEY_ROTATIONS}

    def rotations(self, fold_steps: list[int], split: int = 0) -> int:
        """Rotations of one evaluation (without a split between processes)."""
        return (len(self.babies) - 1
                + horner_rotations(list(self.giants), self.unit, self.keys(split))
                + len(fold_steps))


def grid_schedule(used: np.ndarray, baby: int) -> Schedule:
    """Babies ``0 .. n - 1`` (rotations by one slot each) and giant steps at the non-empty
    multiples of ``baby``: diagonal ``d`` is giant ``d // baby``, baby ``d % baby``."""
    n_babies, groups = _grid(used, baby)
    cells = np.full((len(groups), n_babies), -1, dtype=np.int64)
    index = {j: g for g, j in enumerate(groups)}
    for d in used.tolist():
        cells[index[d // baby], d % baby] = d
    return Schedule(tuple(range(n_babies)), tuple((i, 1) for i in range(n_babies - 1)),
                    tuple(j * baby for j in groups), cells, baby)


#: Row schedules tried: strides (the commonest gaps between clusters of diagonals) and rows
#: of babies at most.
ROW_STRIDES, MAX_ROWS = 3, 8


def row_schedules(used: np.ndarray) -> list[Schedule]:
    """Schedules whose babies are ``rows`` rows of ``width`` consecutive offsets, ``stride``
    apart (one rotation by one slot, or by the stride, each): for diagonals in clusters at
    a regular stride (a placed convolution has a cluster of kernel columns every input row)
    one giant step then covers several rows. The giant steps are chosen greedily (the offset
    that covers most diagonals not yet covered, until all are); tried for the
    :data:`ROW_STRIDES` commonest gaps between cluster starts, up to :data:`MAX_ROWS` rows."""
    used = np.asarray(used, dtype=np.int64)
    if len(used) < 4:
        return []
    starts = used[np.flatnonzero(np.diff(used, prepend=-2) != 1)]
    if len(starts) < 3:
        return []
    gaps, counts = np.unique(np.diff(starts), return_counts=True)
    widest = int(np.diff(np.append(np.flatnonzero(np.diff(used, prepend=-2) != 1), len(used))).max())
    most = max(4, int(2 * math.sqrt(len(used))))  # babies: about as many as giant steps
    out = []
    for stride in gaps[np.argsort(-counts, kind="stable")][:ROW_STRIDES].tolist():
        for width in range(1, min(stride, widest + 1) + 1):
            for rows in range(2, min(MAX_ROWS, most // width) + 1):
                out.append(_row_schedule(used, width, stride, rows))
    return out


def _row_schedule(used: np.ndarray, width: int, stride: int, rows: int) -> Schedule:
    babies = [i + k * stride for k in range(rows) for i in range(width)]
    # row 0 by one slot at a time; every later baby from the one a row above
    steps = [(i - 1, 1) for i in range(1, width)] + [(b - width, stride)
                                                     for b in range(width, len(babies))]
    offsets = np.asarray(babies)
    candidates = used[:, None] - offsets[None, :]  # the giant step each baby would need
    candidates = np.where(candidates >= 0, candidates, -1)
    left = np.ones(len(used), dtype=bool)
    giants = []
    while left.any():
        values, counts = np.unique(candidates[left][candidates[left] >= 0], return_counts=True)
        giant = int(values[np.argmax(counts)])
        giants.append(giant)
        left &= ~(candidates == giant).any(axis=1)
    giants.sort()
    index = {g: n for n, g in enumerate(giants)}
    cells = np.full((len(giants), len(babies)), -1, dtype=np.int64)
    for d, row in zip(used.tolist(), candidates.tolist(), strict=True):
        # the first giant step (of those chosen) that covers d, with its baby
        cells[min((index[g], b) for b, g in enumerate(row) if g in index)] = d
    kept = (cells >= 0).any(axis=1)  # a giant step whose diagonals all went to others: none
    return Schedule(tuple(babies), tuple(steps), tuple(np.asarray(giants)[kept].tolist()),
                    cells[kept], stride)


def _grid(used: np.ndarray, baby: int) -> tuple[int, list[int]]:
    """Baby count and non-empty giant steps (ascending) of diagonals ``used`` at size ``baby``."""
    return int((used % baby).max(initial=0)) + 1, sorted({int(d) for d in used // baby})


def _grid_rotations(used: np.ndarray, baby: int) -> int:
    n_babies, groups = _grid(used, baby)
    return n_babies - 1 + horner_rotations([j * baby for j in groups], baby)


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
