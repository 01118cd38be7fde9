"""The single-packing layout, unit placement and diagonal schedule, simulated on plain
slot vectors.

A rotation is ``np.roll(v, -k)``; the schedule must reproduce ``W @ x`` in the replicated
layout for every shape relation (fewer, as many, or more outputs than inputs), and a chain
of placed layers must give the model's outputs in their natural order.
"""

from __future__ import annotations

import numpy as np
import pytest

import she
from she.plan import layout


def simulate(lay: layout.LayerLayout, weights: np.ndarray, xs: np.ndarray,
             groups: slice = slice(None)) -> np.ndarray:
    """Run the baby-step giant-step schedule of :mod:`she.plan.layout` (only ``groups`` of the
    giant steps, the fold included) on a plain slot vector ``xs``."""
    diags = lay.diagonals(weights)[groups]
    keys = lay.rotation_steps
    babies = [xs]
    for source, step in lay.schedule.baby_steps:  # one rotation each, with the plan's keys
        assert step in keys
        babies.append(np.roll(babies[source], -step))
    assert all(np.array_equal(b, np.roll(xs, -o)) for b, o in zip(babies, lay.schedule.babies,
                                                                  strict=True))

    def rotate(v: np.ndarray, step: int) -> np.ndarray:
        for piece in lay.jump(step):  # the rotations the engine makes, with the plan's keys
            assert piece in keys
            v = np.roll(v, -piece)
        return v

    acc, at = np.zeros(lay.slots), None
    for giant, row in zip(reversed(lay.schedule.giants[groups]), reversed(diags), strict=True):
        if at is not None:
            acc = rotate(acc, at - giant)
        acc += sum(d * babies[i] for i, d in enumerate(row) if d is not None)
        at = giant
    acc = rotate(acc, at)
    for step in lay.fold_steps:
        acc = acc + np.roll(acc, -step)
    return acc


def first_input(lay: layout.LayerLayout, x: np.ndarray) -> np.ndarray:
    return layout.replicate(x, lay.slots, lay.replicas, lay.n_diagonals)


def conv_matrix(rng: np.random.Generator, c_in: int, c_out: int, size: int,
                stride: int) -> np.ndarray:
    """A 3x3 convolution (padding 1) as a dense matrix over C-order (channel, row, column)."""
    kernel = rng.normal(size=(c_out, c_in, 3, 3))
    out_size = (size - 1) // stride + 1
    w = np.zeros((c_out, out_size, out_size, c_in, size, size))
    for oy in range(out_size):
        for ox in range(out_size):
            for dy in range(3):
                for dx in range(3):
                    y, x = oy * stride + dy - 1, ox * stride + dx - 1
                    if 0 <= y < size and 0 <= x < size:
                        w[:, oy, ox, :, y, x] = kernel[:, :, dy, dx]
    return w.reshape(c_out * out_size * out_size, c_in * size * size)


@pytest.mark.parametrize("n_out, n_in", [(10, 64), (64, 256), (256, 784), (845, 784), (16, 16),
                                          (100, 845), (3, 5), (1, 1), (7, 1)])
def test_schedule_computes_the_matrix_product_in_the_replicated_layout(n_out, n_in):
    rng = np.random.default_rng(n_out * 1000 + n_in)
    slots = 2048
    weights = rng.normal(size=(n_out, n_in))
    x = rng.normal(size=n_in)
    lay = layout.LayerLayout(n_in, n_out, slots)
    out = simulate(lay, weights, first_input(lay, x))
    expected = layout.replicate(weights @ x, slots)
    np.testing.assert_allclose(out, expected, atol=1e-9)
    assert lay.n_diagonals == min(lay.p_in, lay.p_out)
    # Dense: every diagonal, b - 1 baby rotations and one giant rotation per further group.
    schedule = lay.schedule
    assert len(schedule.giants) * schedule.unit == lay.n_diagonals
    assert schedule.babies == tuple(range(schedule.unit))
    assert lay.rotations == len(schedule.babies) - 1 + len(schedule.giants) - 1 + len(lay.fold_steps)
    if lay.split:  # two processes: the halves add up to the whole
        halves = (simulate(lay, weights, first_input(lay, x), slice(None, lay.split))
                  + simulate(lay, weights, first_input(lay, x), slice(lay.split, None)))
        np.testing.assert_allclose(halves, out, atol=1e-9)


@pytest.mark.parametrize("n_out, n_in, replicas", [(256, 784, 2), (10, 64, 16), (10, 64, 4),
                                                    (64, 256, 8), (100, 845, 2), (3, 5, 4)])
def test_replicated_input_spreads_the_diagonals(n_out, n_in, replicas):
    """Copies of the input rotated by r * D/R: each product covers R diagonals at once."""
    rng = np.random.default_rng(n_out + n_in + replicas)
    slots = 2048
    weights = rng.normal(size=(n_out, n_in))
    x = rng.normal(size=n_in)
    lay = layout.LayerLayout(n_in, n_out, slots, replicas)
    np.testing.assert_allclose(simulate(lay, weights, first_input(lay, x)),
                               layout.replicate(weights @ x, slots), atol=1e-9)
    plain = layout.LayerLayout(n_in, n_out, slots)
    assert lay.n_diagonals * replicas == plain.n_diagonals
    assert len(lay.fold_steps) == len(plain.fold_steps) + int(np.log2(replicas))


def dense_chain(shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    rng = np.random.default_rng(len(shapes))
    return [rng.normal(size=shape) for shape in shapes]


def test_only_the_first_layer_uses_replicas_and_it_saves_rotations():
    lays = layout.layouts(dense_chain([(256, 784), (64, 256), (10, 64)]), 4096)
    assert [lay.replicas for lay in lays] == [4, 1, 1]
    plain = layout.LayerLayout(784, 256, 4096)
    assert lays[0].rotations < plain.rotations and lays[0].n_diagonals == plain.n_diagonals // 4
    # A layer that widens its input keeps the plain layout.
    assert layout.layouts(dense_chain([(1000, 100)]), 4096)[0].replicas == 1


def test_rotation_steps_are_few_powers_of_two():
    lays = layout.layouts(dense_chain([(256, 784), (64, 256), (10, 64)]), 4096)
    steps = layout.rotation_steps(lays)
    assert all(s & (s - 1) == 0 for s in steps)
    assert len(steps) <= 12
    # Baby steps rotate by 1 and giant steps by the baby count: far fewer keys than diagonals.
    assert sum(lay.n_diagonals for lay in lays) > 10 * len(steps)


def test_clustered_diagonals_get_a_giant_step_of_their_stride():
    """Diagonals in clusters of 5 every 28 slots (as placed strided convolutions leave
    them): a giant step of 28 (one extra Galois key) needs half the rotations of the best
    power of two, and the schedule, with the rotations the engine makes, is exact."""
    n, slots = 256, 1024
    offsets = np.array([28 * a + t for a in range(8) for t in range(5)])
    rng = np.random.default_rng(28)
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    weights = np.where(np.isin((cols - rows) % n, offsets), rng.normal(size=(n, n)), 0.0)
    lay = layout.LayerLayout(n, n, slots, offsets=offsets)
    assert lay.schedule.unit == 28 and 28 in lay.rotation_steps
    best_power_of_two = min(int((offsets % b).max()) + layout.horner_rotations(
        sorted({int(d) // b * b for d in offsets}), b) for b in (1 << k for k in range(9)))
    assert 2 * lay.rotations <= best_power_of_two
    x = rng.normal(size=n)
    np.testing.assert_allclose(simulate(lay, weights, first_input(lay, x)),
                               layout.replicate(weights @ x, slots), atol=1e-9)


def test_layer_wider_than_a_ciphertext_is_refused():
    with pytest.raises(she.ParameterError, match="needs 4096 slots but a ciphertext has 2048"):
        layout.layouts(dense_chain([(3000, 10)]), 2048)


def test_diagonals_check_the_weight_shape():
    with pytest.raises(she.ParameterError, match="weights of shape"):
        layout.LayerLayout(4, 3, 64).diagonals(np.zeros((4, 3)))


@pytest.mark.parametrize("stride", [1, 2])
def test_placed_convolutions_need_few_diagonals_and_compute_the_chain(stride):
    """Two convolutions and a dense layer: hidden units placed by :mod:`she.plan.placement`
    need a fraction of the diagonals, and the chain (squares between layers) evaluated in
    the placed layout gives the outputs in their natural order."""
    rng = np.random.default_rng(stride)
    size = 16 * stride
    weights = [conv_matrix(rng, 1, 4, size, stride), conv_matrix(rng, 4, 8, size // stride, stride)]
    weights.append(rng.normal(size=(10, weights[-1].shape[0])))
    slots = 4096
    lays = layout.layouts(weights, slots)
    assert lays[-1].out_pos is None  # the client reads the outputs in their natural order
    for lay in lays[:2]:
        assert len(np.unique(lay.out_pos)) == lay.n_out and lay.out_pos.max() < lay.p_out
        assert len(lay.used) <= lay.n_diagonals // 3
        assert lay.rotations < layout.LayerLayout(lay.n_in, lay.n_out, slots, lay.replicas).rotations

    x = rng.normal(size=weights[0].shape[1])
    xs, h = first_input(lays[0], x), x
    for k, (lay, w) in enumerate(zip(lays, weights, strict=True)):
        if k:
            xs, h = xs * xs, h * h
        xs, h = simulate(lay, w, xs), w @ h
        np.testing.assert_allclose(xs, layout.replicate(lay.place_output(h), slots), atol=1e-8)
    np.testing.assert_allclose(xs[:10], h, atol=1e-8)


def test_placement_keeps_dense_layers_correct_and_positions_distinct():
    rng = np.random.default_rng(5)
    weights = [rng.normal(size=(50, 30)) * (rng.random((50, 30)) < 0.2), rng.normal(size=(7, 50))]
    lays = layout.layouts(weights, 256)
    x = rng.normal(size=30)
    hidden = simulate(lays[0], weights[0], first_input(lays[0], x))
    np.testing.assert_allclose(hidden, layout.replicate(lays[0].place_output(weights[0] @ x), 256),
                               atol=1e-9)
    out = simulate(lays[1], weights[1], hidden)
    np.testing.assert_allclose(out[:7], weights[1] @ (weights[0] @ x), atol=1e-9)


def test_a_residual_graph_sums_one_block_per_source_in_the_placed_layout():
    """conv -> x^2 -> conv -> x^2 -> (identity skip of the first square + conv) -> x^2 ->
    dense: one block per source, each a diagonal product in its source's placed layout,
    summed; the identity skip costs at most what placing for the conv would make it cost."""
    rng = np.random.default_rng(7)
    slots = 2048
    w0, w1, w2 = (conv_matrix(rng, 1, 4, 8, 1), conv_matrix(rng, 4, 4, 8, 1),
                  conv_matrix(rng, 4, 4, 8, 1))
    weights = [w0, w1, np.hstack([np.eye(256), w2]), rng.normal(size=(10, 256))]
    sources = [(0,), (1,), (1, 2), (3,)]
    lays = layout.layouts(weights, slots, sources)
    assert [len(b) for b in layout.layer_blocks(sources)] == [1, 1, 2, 1] and len(lays) == 5
    skip, conv = lays[2], lays[3]
    assert np.array_equal(skip.out_pos, conv.out_pos)
    assert layout.cost(skip) + layout.cost(conv) <= layout.cost(layout.LayerLayout(
        256, 256, slots, 1, skip.in_pos, conv.out_pos, None))  # all diagonals: far worse
    x = rng.normal(size=64)
    s1 = simulate(lays[0], w0, first_input(lays[0], x)) ** 2
    s2 = simulate(lays[1], w1, s1) ** 2
    s3 = (simulate(skip, np.eye(256), s1) + simulate(conv, w2, s2)) ** 2
    out = simulate(lays[4], weights[3], s3)
    h1 = (w0 @ x) ** 2
    h3 = (h1 + w2 @ (w1 @ h1) ** 2) ** 2
    np.testing.assert_allclose(out[:10], weights[3] @ h3, rtol=1e-9, atol=1e-6)


def test_clusters_in_rows_get_rows_of_babies():
    """Diagonals in clusters of 3 every 12 slots, four rows of them in each of four blocks
    (as a placed convolution over several input rows and channels leaves them): babies in
    rows (by one slot, and by the row stride) let one giant step cover several rows, with
    fewer rotations than any grid schedule; the schedule, with the rotations the engine
    makes, is exact, and so are its halves for two processes."""
    n, slots = 512, 1024
    offsets = np.array([100 * s + 12 * r + c for s in range(4) for r in range(4) for c in range(3)])
    rng = np.random.default_rng(12)
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    weights = np.where(np.isin((cols - rows) % n, offsets), rng.normal(size=(n, n)), 0.0)
    lay = layout.LayerLayout(n, n, slots, offsets=offsets)
    schedule = lay.schedule
    assert schedule.unit == 12 and any(step == 12 for _, step in schedule.baby_steps)
    grid = min(layout.grid_schedule(offsets, b).rotations(lay.fold_steps) for b in range(1, n + 1))
    assert lay.rotations < grid
    x = rng.normal(size=n)
    out = simulate(lay, weights, first_input(lay, x))
    np.testing.assert_allclose(out, layout.replicate(weights @ x, slots), atol=1e-9)
    assert lay.split
    halves = (simulate(lay, weights, first_input(lay, x), slice(None, lay.split))
              + simulate(lay, weights, first_input(lay, x), slice(lay.split, None)))
    np.testing.assert_allclose(halves, out, atol=1e-9)
