"""The single-packing layout and diagonal schedule, simulated on plain slot vectors.

A rotation is ``np.roll(v, -k)``; the schedule must reproduce ``W @ x`` in the replicated
layout for every shape relation (fewer, as many, or more outputs than inputs).
"""

from __future__ import annotations

import numpy as np
import pytest

import she
from she import layout


def simulate(lay: layout.LayerLayout, weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Run the baby-step giant-step schedule of :mod:`she.layout` on a plain slot vector."""
    diags = lay.diagonals(weights)
    xs = layout.replicate(x, lay.slots, lay.replicas, lay.n_diagonals)
    babies = [np.roll(xs, -i) for i in range(lay.baby)]
    acc = np.zeros(lay.slots)
    for j in reversed(range(lay.giant)):
        acc = np.roll(acc, -lay.baby)
        acc += sum(diags[j, i] * babies[i] for i in range(lay.baby))
    for step in lay.fold_steps:
        acc = acc + np.roll(acc, -step)
    return acc


@pytest.mark.parametrize("n_out, n_in", [(10, 64), (64, 256), (256, 784), (845, 784), (16, 16),
                                          (100, 845), (3, 5), (1, 1), (7, 1)])
def test_schedule_computes_the_matrix_product_in_the_replicated_layout(n_out, n_in):
    rng = np.random.default_rng(n_out * 1000 + n_in)
    slots = 2048
    weights = rng.normal(size=(n_out, n_in))
    x = rng.normal(size=n_in)
    lay = layout.LayerLayout(n_in, n_out, slots)
    out = simulate(lay, weights, x)
    expected = layout.replicate(weights @ x, slots)
    np.testing.assert_allclose(out, expected, atol=1e-9)
    assert lay.n_diagonals == min(lay.p_in, lay.p_out)
    assert lay.rotations == lay.baby - 1 + lay.giant - 1 + len(lay.fold_steps)


@pytest.mark.parametrize("n_out, n_in, replicas", [(256, 784, 2), (10, 64, 16), (10, 64, 4),
                                                    (64, 256, 8), (100, 845, 2), (3, 5, 4)])
def test_replicated_input_spreads_the_diagonals(n_out, n_in, replicas):
    """Copies of the input rotated by r * D/R: each product covers R diagonals at once."""
    rng = np.random.default_rng(n_out + n_in + replicas)
    slots = 2048
    weights = rng.normal(size=(n_out, n_in))
    x = rng.normal(size=n_in)
    lay = layout.LayerLayout(n_in, n_out, slots, replicas)
    np.testing.assert_allclose(simulate(lay, weights, x), layout.replicate(weights @ x, slots),
                               atol=1e-9)
    plain = layout.LayerLayout(n_in, n_out, slots)
    assert lay.n_diagonals * replicas == plain.n_diagonals
    assert len(lay.fold_steps) == len(plain.fold_steps) + int(np.log2(replicas))


def test_only_the_first_layer_uses_replicas_and_it_saves_rotations():
    lays = layout.layouts([(256, 784), (64, 256), (10, 64)], 4096)
    assert [lay.replicas for lay in lays] == [4, 1, 1]
    plain = layout.LayerLayout(784, 256, 4096)
    assert lays[0].rotations < plain.rotations and lays[0].n_diagonals == plain.n_diagonals // 4
    # A layer that widens its input keeps the plain layout.
    assert layout.layouts([(1000, 100)], 4096)[0].replicas == 1


def test_rotation_steps_are_few_powers_of_two():
    lays = layout.layouts([(256, 784), (64, 256), (10, 64)], 4096)
    steps = layout.rotation_steps(lays)
    assert all(s & (s - 1) == 0 for s in steps)
    assert len(steps) <= 12
    # Baby steps rotate by 1 and giant steps by the baby count: far fewer keys than diagonals.
    assert sum(lay.n_diagonals for lay in lays) > 10 * len(steps)


def test_layer_wider_than_a_ciphertext_is_refused():
    with pytest.raises(she.ParameterError, match="needs 4096 slots but a ciphertext has 2048"):
        layout.layouts([(3000, 10)], 2048)


def test_diagonals_check_the_weight_shape():
    with pytest.raises(she.ParameterError, match="weights of shape"):
        layout.LayerLayout(4, 3, 64).diagonals(np.zeros((4, 3)))
