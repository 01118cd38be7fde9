"""Numpy semantics of the ONNX operators SHE supports.

These run on float64 batches. :mod:`she.lowering` uses them to trace a graph into affine
maps, so each must be exact ONNX semantics for the attributes it accepts and must raise
:class:`~she.errors.ModelError` (naming the node) for attributes it does not.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from .errors import ModelError

Attrs = dict[str, object]


def attributes(node: onnx.NodeProto) -> Attrs:
    """The node's attributes as plain Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(attrs: Attrs, spatial: int, node: str) -> list[int]:
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ModelError(f"node '{node}': auto_pad SAME_* is not supported; use explicit pads")
    return list(attrs.get("pads", [0] * (2 * spatial)))


def _windows(x: np.ndarray, kernel: list[int], strides: list[int], pads: list[int],
             dilations: list[int], pad_value: float = 0.0) -> np.ndarray:
    """Sliding windows of a (B, C, H, W) array: returns (B, C, Ho, Wo, kh, kw)."""
    spatial = len(kernel)
    pad_width = [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)]
    xp = np.pad(x, pad_width, constant_values=pad_value)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    win = sliding_window_view(xp, span, axis=tuple(range(2, 2 + spatial)))
    index = (slice(None), slice(None))
    index += tuple(slice(None, None, s) for s in strides)
    index += tuple(slice(None, None, d) for d in dilations)
    return win[index]


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, attrs: Attrs, node: str) -> np.ndarray:
    """ONNX Conv (2-D, any stride / padding / dilation / group)."""
    if x.ndim != 4:
        raise ModelError(f"node '{node}': only 2-D convolutions are supported")
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    group = int(attrs.get("group", 1))
    win = _windows(x, kernel, strides, _pads(attrs, 2, node), dilations)
    cin = x.shape[1] // group
    cout = w.shape[0] // group
    outs = []
    for g in range(group):
        wg = w[g * cout:(g + 1) * cout]
        xg = win[:, g * cin:(g + 1) * cin]
        outs.append(np.einsum("bchwij,ocij->bohw", xg, wg, optimize=True))
    y = np.concatenate(outs, axis=1)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return y


def average_pool(x: np.ndarray, attrs: Attrs, node: str) -> np.ndarray:
    """ONNX AveragePool (2-D), honouring ``count_include_pad``."""
    if attrs.get("ceil_mode", 0):
        raise ModelError(f"node '{node}': AveragePool with ceil_mode=1 is not supported")
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * len(kernel)))
    pads = _pads(attrs, len(kernel), node)
    dil = list(attrs.get("dilations", [1] * len(kernel)))
    sums = _windows(x, kernel, strides, pads, dil).sum(axis=(-2, -1))
    if attrs.get("count_include_pad", 0) or not any(pads):
        return sums / float(np.prod(kernel))
    ones = np.ones((1, 1, *x.shape[2:]))
    counts = _windows(ones, kernel, strides, pads, dil).sum(axis=(-2, -1))
    return sums / counts


def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray | None, attrs: Attrs) -> np.ndarray:
    """ONNX Gemm: ``alpha * A' @ B' + beta * C``."""
    if attrs.get("transA", 0):
        a = a.T
    if attrs.get("transB", 0):
        b = b.T
    y = float(attrs.get("alpha", 1.0)) * (a @ b)
    if c is not None:
        y = y + float(attrs.get("beta", 1.0)) * c
    return y


def reshape(x: np.ndarray, shape: np.ndarray, attrs: Attrs) -> np.ndarray:
    """ONNX Reshape (``0`` copies the input dimension unless ``allowzero``)."""
    target = [int(v) for v in shape]
    if not attrs.get("allowzero", 0):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def pad(x: np.ndarray, pads: np.ndarray, value: float, attrs: Attrs, node: str) -> np.ndarray:
    """ONNX Pad, constant mode."""
    mode = attrs.get("mode", b"constant")
    if mode not in (b"constant", "constant"):
        raise ModelError(f"node '{node}': Pad mode {mode!r} is not supported (only constant)")
    n = x.ndim
    width = [(int(pads[i]), int(pads[i + n])) for i in range(n)]
    if any(lo < 0 or hi < 0 for lo, hi in width):
        raise ModelError(f"node '{node}': negative pads are not supported")
    return np.pad(x, width, constant_values=value)


def slice_(x: np.ndarray, starts: np.ndarray, ends: np.ndarray, axes: np.ndarray | None,
           steps: np.ndarray | None) -> np.ndarray:
    """ONNX Slice (same clamping as Python slices)."""
    starts, ends = np.asarray(starts).ravel(), np.asarray(ends).ravel()
    axes = range(len(starts)) if axes is None else np.asarray(axes).ravel()
    steps = np.ones(len(starts), np.int64) if steps is None else np.asarray(steps).ravel()
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[int(axis) % x.ndim] = slice(int(start), int(end), int(step))
    return x[tuple(index)]


#: Operators whose numpy form needs no node-specific handling beyond their inputs.
ELEMENTWISE: dict[str, Callable[..., np.ndarray]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
}
