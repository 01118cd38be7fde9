"""Polynomials of depth 2 and more, written as ONNX the encrypted engine can run.

The engine evaluates chains ``affine map -> element-wise square -> affine map -> ...``
(:mod:`she.frontend.lowering`). A polynomial of degree above 2, or a maximum, is built from that
by squaring several affine combinations ("units") of the same values at once::

    units u_1 .. u_m (same shape) --Concat--> v --Mul(v, v)--> v*v --Slice--> u_1^2 .. u_m^2

and combining the squares linearly. A value needed after a square level (a linear term)
is carried across it exactly as ``z = ((z + K)^2 - (z - K)^2) / 4K``.

* :func:`write_polynomial`: activations of degree 3 or 4 (two square levels). With
  ``t = (x - m) / r`` normalised to about [-1, 1], level 1 squares ``A = t^2`` and
  ``B = (t + 1)^2``, so ``t = (B - A - 1) / 2``; level 2 squares ``(A + t)^2``,
  ``(A - t)^2``, ``(t + 1)^2``, ``(t - 1)^2``, whose combination
  ``l1 (A+t)^2 + l2 (A-t)^2 + l3 (t+1)^2 + l4 (t-1)^2 + c`` is any polynomial of degree
  <= 4 in ``t`` (``t^4: l1 + l2``, ``t^3: 2 (l1 - l2)``, ``t^2: l1 + l2 + l3 + l4``,
  ``t: 2 (l3 - l4)``).
* :func:`write_polynomial_max`: MaxPool as a tree of pairwise maxima, one square level per
  tree level, ``max(a, b) = (a + b)/2 + |a - b|/2`` with ``|z| ~ c0 + c2 z^2`` fitted per
  channel to the differences the calibration data produces (at deeper levels, to the
  differences of the approximate maxima, so that each level corrects the one before).

Structural constants (normalisations, carries, the ``1/2`` s) are named with
:data:`FIXED_PREFIX`; fine-tuning leaves them alone. The combination coefficients are
ordinary float initializers: fine-tuning trains them, and the compiler stores the layer
after them in fixed point (they are not powers of two).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converters import onnx_graph as g
from she.errors import ModelError

#: Name prefix of constants that fine-tuning must keep (``she_k_<n>``).
FIXED_PREFIX = "she_k_"


def _int64(model: onnx.ModelProto, values: list[int]) -> str:
    name = g.fresh("idx")
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


class _Writer:
    """Appends element-wise nodes on tensors of one shape ``(batch, channels, ...)``."""

    def __init__(self, model: onnx.ModelProto, rank: int, channels: int, tag: str) -> None:
        self.model, self.rank, self.channels, self.tag = model, rank, channels, tag
        self.nodes: list[onnx.NodeProto] = []

    def per_channel(self, values: np.ndarray, prefix: str) -> str:
        """A constant broadcasting one value per channel."""
        shape = (1, self.channels) + (1,) * (self.rank - 2)
        return g.add_constant(self.model, np.asarray(values, np.float64).reshape(shape), prefix)

    def fixed(self, value: float) -> str:
        return g.add_constant(self.model, np.float32(value), "k")

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or g.fresh("v")
        self.nodes.append(helper.make_node(op_type, list(inputs), [out],
                                           name=f"{self.tag}_{op_type}_{len(self.nodes)}",
                                           **attrs))
        return out

    def squares(self, units: list[str]) -> list[str]:
        """``[u^2 for u in units]`` with a single square: Concat, Mul(v, v), Slice."""
        joined = self.op("Concat", *units, axis=1)
        squared = self.op("Mul", joined, joined)
        axes = _int64(self.model, [1])
        return [self.op("Slice", squared, _int64(self.model, [i * self.channels]),
                        _int64(self.model, [(i + 1) * self.channels]), axes)
                for i in range(len(units))]

    def combine(self, terms: list[tuple[str, str]], bias: str, out: str | None = None) -> str:
        """``sum(coefficient * tensor) + bias``."""
        total = None
        for tensor, coefficient in terms:
            scaled = self.op("Mul", tensor, coefficient)
            total = scaled if total is None else self.op("Add", total, scaled)
        return self.op("Add", total, bias, out=out)


def _pow2_above(values: np.ndarray) -> np.ndarray:
    """The smallest power of two >= each value (and >= 2^-20)."""
    return 2.0 ** np.ceil(np.log2(np.maximum(values, 2.0 ** -20)))


def _channels_last(x: np.ndarray) -> np.ndarray:
    """(B, C, ...) -> (C, B * ...)."""
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1).astype(np.float64)


def fit_polynomial(x: np.ndarray, y: np.ndarray, degree: int) -> tuple[float, float, np.ndarray]:
    """Least-squares polynomial in the normalised variable ``t = (x - m) / r``.

    ``r`` is a power of two covering the data's half-range, so the normalisation is a
    shift in the encrypted computation. Returns ``(m, r, c)`` with ``c[k]`` the
    coefficient of ``t^k``.
    """
    lo, hi = float(np.min(x)), float(np.max(x))
    m = (lo + hi) / 2
    r = float(_pow2_above(np.asarray((hi - lo) / 2)))
    t = (x - m) / r
    design = np.stack([t ** k for k in range(degree + 1)], axis=1)
    c, *_ = np.linalg.lstsq(design, y, rcond=None)
    return m, r, c


def write_polynomial(model: onnx.ModelProto, x: str, out: str, values: np.ndarray, f,
                     degree: int, tag: str, rng: np.random.Generator,
                     samples: int) -> tuple[list[onnx.NodeProto], float]:
    """Nodes computing ``out`` = the per-channel degree-3/4 fit of ``f`` at ``x``.

    ``values`` are the calibration values of ``x``, shape (B, C, ...). Returns the nodes
    (in order) and the root-mean-square error of the fit.
    """
    if degree not in (3, 4):
        raise ValueError(f"degree {degree}: write_polynomial handles degrees 3 and 4")
    channels = values.shape[1] if values.ndim >= 2 else 1
    per_channel = _channels_last(values) if values.ndim >= 2 else values[None]
    ms, inv_rs = np.empty(channels), np.empty(channels)
    lambdas, bias, errors = np.empty((4, channels)), np.empty(channels), []
    for ch, v in enumerate(per_channel):
        if v.size > samples:
            v = rng.choice(v, samples, replace=False)
        m, r, c = fit_polynomial(v, f(v), degree)
        c = np.concatenate([c, np.zeros(5 - len(c))])
        errors.append(np.mean((np.polyval(c[::-1], (v - m) / r) - f(v)) ** 2))
        ms[ch], inv_rs[ch] = m, 1 / r
        lambdas[:, ch] = [(c[4] + c[3] / 2) / 2, (c[4] - c[3] / 2) / 2,
                          (c[2] - c[4] + c[1] / 2) / 2, (c[2] - c[4] - c[1] / 2) / 2]
        bias[ch] = c[0] - (c[2] - c[4])  # the constants of (t + 1)^2 and (t - 1)^2
    w = _Writer(model, max(values.ndim, 2), channels, tag)
    one, half = w.fixed(1.0), w.fixed(0.5)
    t = w.op("Mul", w.op("Sub", x, w.per_channel(ms, "m")), w.per_channel(inv_rs, "k"))
    a, b = w.squares([t, w.op("Add", t, one)])
    t1 = w.op("Mul", w.op("Sub", w.op("Sub", b, a), one), half)  # t carried: (B - A - 1) / 2
    units = [w.op("Add", a, t1), w.op("Sub", a, t1), w.op("Add", t1, one), w.op("Sub", t1, one)]
    w.combine([(s, w.per_channel(lam, "c")) for s, lam in zip(w.squares(units), lambdas,
                                                                 strict=True)],
              w.per_channel(bias, "c"), out=out)
    return w.nodes, float(np.sqrt(np.mean(errors)))


def _fit_even(z: np.ndarray, target: np.ndarray, rng: np.random.Generator,
              samples: int) -> tuple[float, float]:
    """``target ~ c0 + c2 z^2`` by least squares over the observed samples."""
    if z.size > samples:
        pick = rng.choice(z.size, samples, replace=False)
        z, target = z[pick], target[pick]
    design = np.stack([np.ones_like(z), z * z], axis=1)
    (c0, c2), *_ = np.linalg.lstsq(design, target, rcond=None)
    return float(c0), float(c2)


def write_polynomial_max(model: onnx.ModelProto, node: onnx.NodeProto, values: np.ndarray,
                         rng: np.random.Generator, samples: int) -> tuple[list[onnx.NodeProto], int]:
    """Nodes replacing a 2-D MaxPool ``node`` by a polynomial maximum over each window.

    ``values`` are the calibration values of its input (B, C, H, W). Returns the nodes and
    the number of square levels (``ceil(log2(window size))``).
    """
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attrs.get("kernel_shape", []))
    if len(kernel) != 2 or values.ndim != 4:
        raise ModelError(f"node '{node.name}': only 2-D MaxPool has a polynomial form")
    if any(attrs.get("pads", [0])) or attrs.get("ceil_mode", 0) or any(
            d != 1 for d in attrs.get("dilations", [1])):
        raise ModelError(f"node '{node.name}': MaxPool with padding, ceil_mode or dilations "
                         "has no polynomial form; convert with max_pool='average'")
    strides = list(attrs.get("strides", [1, 1]))
    out_h = (values.shape[2] - kernel[0]) // strides[0] + 1
    out_w = (values.shape[3] - kernel[1]) // strides[1] + 1
    w = _Writer(model, 4, values.shape[1], node.name)
    axes = _int64(model, [2, 3])
    steps = _int64(model, strides)
    # names: the ONNX tensors; exact: true maxima so far; approx: what the polynomial
    # gives for them on the calibration data, so that every level's fit corrects the
    # errors of the levels before it.
    names, exact = [], []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            names.append(w.op("Slice", node.input[0], _int64(model, [i, j]),
                              _int64(model, [i + strides[0] * (out_h - 1) + 1,
                                             j + strides[1] * (out_w - 1) + 1]), axes, steps))
            exact.append(values[:, :, i::strides[0], j::strides[1]][:, :, :out_h, :out_w]
                         .astype(np.float64))
    approx = list(exact)
    levels = 0
    while len(names) > 1:
        levels += 1
        pairs = [(k, k + 1) for k in range(0, len(names) - 1, 2)]
        odd = len(names) % 2 == 1
        # carries need K >= |carried value|: one power of two per channel for the level
        carried = [(approx[a] + approx[b]) / 2 for a, b in pairs] + ([approx[-1]] if odd else [])
        reach = np.max(np.abs(np.stack([_channels_last(c) for c in carried])), axis=(0, 2))
        k_values = _pow2_above(reach)
        k = w.per_channel(k_values, "k")
        inv4k = w.per_channel(1 / (4 * k_values), "k")
        neg4k = w.per_channel(-1 / (4 * k_values), "k")
        half = w.fixed(0.5)
        units, fits = [], []
        for a, b in pairs:
            s = w.op("Mul", w.op("Add", names[a], names[b]), half)
            units += [w.op("Sub", names[a], names[b]), w.op("Add", s, k), w.op("Sub", s, k)]
            # max(A, B) = (a + b)/2 + |A - B|/2: fit the second half on what a, b really are
            z = _channels_last(approx[a] - approx[b])
            target = _channels_last(2 * np.maximum(exact[a], exact[b]) - approx[a] - approx[b])
            c0, c2 = (np.asarray(c) for c in zip(*(_fit_even(zc, tc, rng, samples)
                                                   for zc, tc in zip(z, target, strict=True)),
                                                  strict=True))
            fits.append((c0, c2))
        if odd:
            units += [w.op("Add", names[-1], k), w.op("Sub", names[-1], k)]
        squared = w.squares(units)
        new_names, new_exact, new_approx = [], [], []
        for p, ((a, b), (c0, c2)) in enumerate(zip(pairs, fits, strict=True)):
            d2, plus, minus = squared[3 * p: 3 * p + 3]
            new_names.append(w.combine([(d2, w.per_channel(c2 / 2, "c")), (plus, inv4k),
                                        (minus, neg4k)], w.per_channel(c0 / 2, "c")))
            shape = (1, -1) + (1,) * (values.ndim - 2)
            d = approx[a] - approx[b]
            new_approx.append((approx[a] + approx[b]) / 2
                              + (c0.reshape(shape) + c2.reshape(shape) * d * d) / 2)
            new_exact.append(np.maximum(exact[a], exact[b]))
        if odd:
            plus, minus = squared[-2:]
            new_names.append(w.combine([(plus, inv4k), (minus, neg4k)], w.fixed(0.0)))
            new_exact.append(exact[-1])
            new_approx.append(approx[-1])
        names, exact, approx = new_names, new_exact, new_approx
    w.op("Identity", names[0], out=node.output[0])
    return w.nodes, levels
