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
    xs = layout.tile(x, lay.slots)
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
    expected = layout.tile(weights @ x, slots)
    np.testing.assert_allclose(out, expected, atol=1e-9)
    assert lay.n_diagonals == min(lay.p_in, lay.p_out)
    assert lay.rotations == lay.baby - 1 + lay.giant - 1 + len(lay.fold_steps)


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
