"""Model privacy of results (she.runtime.privacy): noise flooding budgeted by the compiler."""

from __future__ import annotations

import numpy as np
import pytest

import she
from she.pipeline import encrypted_predict
from she.runtime.privacy import _uniform_noise, flooding_error


def test_flooding_noise_is_uniform_in_its_range():
    q = (1152921504606830593, 1099511480321)
    noise = _uniform_noise(20, q, 1 << 15)
    lifted = np.where(noise[0] > q[0] // 2, noise[0].astype(object) - q[0], noise[0])
    values = lifted.astype(np.int64)
    assert values.min() >= -(1 << 20) and values.max() < 1 << 20
    assert values.min() < -(1 << 19) and values.max() > 1 << 19  # the whole range is used
    assert abs(values.std() / (2 ** 20 / np.sqrt(3)) - 1) < 0.05
    assert np.array_equal(np.remainder(values, q[1]).astype(np.uint64), noise[1])


def test_flooded_results_are_noisier_within_the_budget(small_model):
    path, x, _ = small_model
    model = she.load(path)
    plain = model.run_plain(x[:1])
    base = she.compile(model, packing="single")
    flooded = she.compile(model, packing="single", circuit_privacy=8)
    assert base.flood_bits is None and flooded.circuit_privacy == 8
    # the compiler gave the output level room for the noise, and counts its error
    out_bits = lambda p: sum(p.params.modulus_bits[:p.output_limbs])  # noqa: E731
    assert out_bits(flooded) > out_bits(base)
    assert flooded.predicted_error >= flooding_error(flooded, flooded.flood_bits)
    errors = []
    for plan in (base, flooded):
        out, _ = encrypted_predict(plan, x[:1], server=she.Server(plan, workers=1))
        errors.append(np.abs(out - plain).max())
        assert errors[-1] < plan.predicted_error
    # the flooding is there: a 6-sigma bound over 10 outputs is reached to within ~10x
    assert errors[1] > 10 * errors[0] and errors[1] > flooding_error(flooded,
                                                                    flooded.flood_bits) / 20


def test_flooding_is_refused_where_it_cannot_work(small_model):
    model = she.load(small_model[0])
    with pytest.raises(she.ParameterError, match="BFV"):
        she.compile(model, scheme="bfv", circuit_privacy=8)
    with pytest.raises(she.ParameterError, match="supported"):
        she.compile(model, circuit_privacy=80)
