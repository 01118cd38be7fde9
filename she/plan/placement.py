"""Single packing: which slot each hidden unit gets, chosen so that layers have few diagonals.

A layer's diagonal ``d`` (see :mod:`she.plan.layout`) is needed when some output placed at
position ``p`` reads an input placed at ``q`` with ``q - p = d`` (modulo the diagonal count
``n``). With units in their natural order a convolution needs nearly all ``n`` diagonals:
its channels sit far apart. The server may put a hidden layer's units anywhere in the slots
(the next layer's columns follow them; only the model's input and output layout is fixed,
because the client sees it), and each diagonal costs a plaintext product, so this module
places units to need few diagonals:

* consecutive outputs that read translated copies of the same weights (the positions of one
  convolution channel) form a *family* placed as a block, keeping their relative offsets:
  then the whole family needs the diagonals of one output;
* each family goes to the free position that adds the fewest new diagonals (both counts are
  circular correlations, computed with FFTs), the one nearest the previous family among
  equals (neighbouring channels then differ by small offsets, which share diagonals).

Measured on the shipped two-convolution MNIST network (N=16384): 1024 -> 46 and
4096 -> 404 diagonals in its convolutions. Pure numpy, deterministic.
"""

from __future__ import annotations

import numpy as np

#: Shifts (the best correlations) tried when looking for a translation between two rows.
CANDIDATE_SHIFTS = 4


def place_rows(weights: np.ndarray, in_pos: np.ndarray, n: int, p_out: int) -> np.ndarray:
    """Positions in ``[0, p_out)`` for the rows of ``weights`` (``n_out x n_in``) whose
    inputs sit at ``in_pos``, with diagonals counted modulo ``n``; distinct positions."""
    rows = [np.flatnonzero(w) for w in weights]
    occupied = np.zeros(p_out, dtype=bool)
    diagonals = np.zeros(n, dtype=bool)
    out = np.empty(len(rows), dtype=np.int64)
    near = 0  # where the previous block went
    for family, offsets in _families(weights, rows, in_pos, n, p_out):
        pattern = np.zeros(n, dtype=bool)
        for r, o in zip(family, offsets, strict=True):
            pattern[(in_pos[rows[r]] - o) % n] = True
        base = _best_base(pattern, offsets % p_out, diagonals, occupied, near)
        if base is None:  # no room for the block: place its rows one at a time
            for r in family:
                single = np.zeros(n, dtype=bool)
                single[in_pos[rows[r]] % n] = True
                near = out[r] = _best_base(single, np.zeros(1, dtype=np.int64), diagonals,
                                           occupied, near)
                _take(out[r], near, single, diagonals, occupied)
            continue
        near = base
        out[family] = (base + offsets) % p_out
        _take(out[family], base, pattern, diagonals, occupied)
    # Rotate the layout so that the diagonals start at 0 after their largest circular gap:
    # the baby-step giant-step schedule then spans as few giant steps as possible.
    used = np.flatnonzero(diagonals)
    if not used.size:
        return out
    gaps = np.diff(np.append(used, used[0] + n))
    start = int(used[(np.argmax(gaps) + 1) % len(used)])
    return (out + start) % p_out


def _take(positions: np.ndarray | int, base: int, pattern: np.ndarray, diagonals: np.ndarray,
          occupied: np.ndarray) -> None:
    """Mark a placed block's ``positions`` taken and its diagonals (``pattern - base``) used."""
    occupied[positions] = True
    diagonals[np.roll(pattern, -base % len(pattern))] = True


def _families(weights: np.ndarray, rows: list[np.ndarray], in_pos: np.ndarray, n: int,
              p_out: int):
    """Yield ``(rows, offsets)``: runs of consecutive rows each of which is a translate of
    the previous one (the one with fewer weights is contained, values equal, in the other
    shifted), offsets relative to the first row and distinct modulo ``p_out``."""
    def dense(r: int) -> np.ndarray:
        v = np.zeros(n)
        np.add.at(v, in_pos[rows[r]] % n, weights[r, rows[r]])
        return v

    family, offsets, seen = [0], [0], {0}
    prev = dense(0)
    for r in range(1, len(rows)):
        cur = dense(r)
        shift = _translation(prev, cur)
        offset = None if shift is None else offsets[-1] + (shift if shift <= n // 2 else shift - n)
        if offset is not None and offset % p_out not in seen:
            family.append(r)
            offsets.append(offset)
            seen.add(offset % p_out)
        else:
            yield np.array(family), np.array(offsets, dtype=np.int64)
            family, offsets, seen = [r], [0], {0}
        prev = cur
    yield np.array(family), np.array(offsets, dtype=np.int64)


def _translation(a: np.ndarray, b: np.ndarray) -> int | None:
    """A cyclic shift ``t`` with ``b[i + t] = a[i]`` wherever the sparser of the two is
    non-zero (a convolution's border rows see part of the kernel), or None."""
    small, big, sign = (a, b, 1) if np.count_nonzero(a) <= np.count_nonzero(b) else (b, a, -1)
    support = np.flatnonzero(small)
    if not support.size:
        return None
    match = np.fft.irfft(np.fft.rfft(big) * np.conj(np.fft.rfft(small)), len(a))
    for t in np.argsort(match)[::-1][:CANDIDATE_SHIFTS]:
        if np.array_equal(big[(support + t) % len(a)], small[support]):
            return int(sign * t) % len(a)
    return None


def _best_base(pattern: np.ndarray, offsets: np.ndarray, diagonals: np.ndarray,
               occupied: np.ndarray, near: int) -> int | None:
    """The base position putting a block (rows at ``base + offsets``, needing diagonals
    ``pattern - base``) on free slots with the fewest new diagonals, the one circularly
    nearest ``near`` among equals; None if no position is free."""
    n, p_out = len(pattern), len(occupied)
    known = np.rint(np.fft.irfft(np.fft.rfft(pattern) * np.conj(np.fft.rfft(diagonals)), n))
    new = np.tile(pattern.sum() - known, p_out // n)
    block = np.zeros(p_out)
    block[offsets] = 1.0
    clash = np.rint(np.fft.irfft(np.fft.rfft(occupied) * np.conj(np.fft.rfft(block)), p_out))
    cost = np.where(clash == 0, new, np.inf)
    if not np.isfinite(cost.min()):
        return None
    best = np.flatnonzero(cost == cost.min())
    distance = np.abs((best - near + p_out // 2) % p_out - p_out // 2)
    return int(best[np.argmin(distance)])
