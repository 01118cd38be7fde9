"""The ONNX operators SHE supports, as sparse linear maps and numpy functions.

:mod:`she.frontend.lowering` composes these into the affine maps of a model. Each structural operator
(Conv, AveragePool, Pad, Transpose, Slice, ReduceMean, ...) acts on one sample's flattened
tensor (C-order, batch axis left out) as a ``scipy.sparse`` matrix built straight from its
semantics, so the cost is the number of weights times output positions, never the square of
the tensor size. Reshapes keep the flat order and cost nothing. Index maps (which input
element each output element copies, ``-1`` for a padded zero) are computed by running the
operator's numpy form on an array of indices.

Each function is exact ONNX semantics for the attributes it accepts and raises
:class:`~she.errors.ModelError` (naming the node) for attributes it does not.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import scipy.sparse as sp
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ModelError

Attrs = dict[str, object]
Shape = tuple[int, ...]


def attributes(node: onnx.NodeProto) -> Attrs:
    """The node's attributes as plain Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(attrs: Attrs, spatial: int, node: str) -> list[int]:
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise ModelError(f"node '{node}': auto_pad SAME_* is not supported; use explicit pads")
    return list(attrs.get("pads", [0] * (2 * spatial)))


def _windows(x: np.ndarray, kernel: list[int], strides: list[int], pads: list[int],
             dilations: list[int], pad_value: float = 0.0) -> np.ndarray:
    """Sliding windows of a (C, H, W) array: returns (C, Ho, Wo, kh, kw)."""
    spatial = len(kernel)
    pad_width = [(0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)]
    xp = np.pad(x, pad_width, constant_values=pad_value)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    win = sliding_window_view(xp, span, axis=tuple(range(1, 1 + spatial)))
    index = (slice(None),)
    index += tuple(slice(None, None, s) for s in strides)
    index += tuple(slice(None, None, d) for d in dilations)
    return win[index]


def selection(index: np.ndarray, n_in: int, values: np.ndarray | float = 1.0) -> sp.csr_matrix:
    """The matrix whose row ``i`` picks input ``index[i]`` (times ``values[i]``); rows with a
    negative index are zero."""
    index = np.asarray(index).ravel()
    rows = np.flatnonzero(index >= 0)
    vals = np.broadcast_to(np.asarray(values, dtype=np.float64), index.shape)[rows]
    return sp.csr_matrix((vals, (rows, index[rows])), shape=(len(index), n_in))


def indices(shape: Shape) -> np.ndarray:
    """``arange`` in ``shape``: the flat index of every element."""
    return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)


def conv_matrix(shape: Shape, w: np.ndarray, attrs: Attrs, node: str) -> tuple[sp.csr_matrix, Shape]:
    """ONNX Conv (2-D, any stride / padding / dilation / group) on a (C, H, W) sample, without
    its bias: the sparse matrix and the output shape."""
    if len(shape) != 3 or w.ndim != 4:
        raise ModelError(f"node '{node}': only 2-D convolutions are supported")
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    group = int(attrs.get("group", 1))
    if shape[0] % group or w.shape[0] % group or w.shape[1] != shape[0] // group:
        raise ModelError(f"node '{node}': weights {w.shape} do not fit input {shape} "
                         f"with group={group}")
    win = _windows(indices(shape), kernel, strides, _pads(attrs, 2, node), dilations, -1)
    _, ho, wo = win.shape[:3]
    cin, cout = shape[0] // group, w.shape[0] // group
    positions = np.arange(ho * wo).reshape(ho, wo)[:, :, None, None]
    rows, cols, vals = [], [], []
    for o in range(w.shape[0]):  # one output channel at a time: memory ~ weights x positions
        g = o // cout
        cells = win[g * cin:(g + 1) * cin]  # (cin, Ho, Wo, kh, kw)
        weight = np.broadcast_to(w[o][:, None, None], cells.shape)
        keep = (cells >= 0) & (weight != 0)
        rows.append(np.broadcast_to(o * ho * wo + positions, cells.shape)[keep])
        cols.append(cells[keep])
        vals.append(weight[keep])
    n_out = w.shape[0] * ho * wo
    matrix = sp.csr_matrix((np.concatenate(vals).astype(np.float64),
                            (np.concatenate(rows), np.concatenate(cols))),
                           shape=(n_out, int(np.prod(shape))))
    return matrix, (w.shape[0], ho, wo)


def average_pool_matrix(shape: Shape, attrs: Attrs, node: str) -> tuple[sp.csr_matrix, Shape]:
    """ONNX AveragePool (2-D) on a (C, H, W) sample, honouring ``count_include_pad``."""
    if len(shape) != 3:
        raise ModelError(f"node '{node}': only 2-D average pooling is supported")
    if attrs.get("ceil_mode", 0):
        raise ModelError(f"node '{node}': AveragePool with ceil_mode=1 is not supported")
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * len(kernel)))
    pads = _pads(attrs, len(kernel), node)
    dil = list(attrs.get("dilations", [1] * len(kernel)))
    win = _windows(indices(shape), kernel, strides, pads, dil, -1)  # (C, Ho, Wo, kh, kw)
    c, ho, wo = win.shape[:3]
    cells = win.reshape(c * ho * wo, -1)
    valid = cells >= 0
    if attrs.get("count_include_pad", 0):
        counts = np.full(len(cells), float(np.prod(kernel)))
    else:
        counts = valid.sum(axis=1).astype(np.float64)
    rows = np.broadcast_to(np.arange(len(cells))[:, None], cells.shape)
    matrix = sp.csr_matrix((np.broadcast_to(1.0 / counts[:, None], cells.shape)[valid],
                            (rows[valid], cells[valid])), shape=(len(cells), int(np.prod(shape))))
    return matrix, (c, ho, wo)


def mean_matrix(shape: Shape, axes: list[int], keepdims: bool, mean: bool = True
                ) -> tuple[sp.csr_matrix, Shape]:
    """ReduceMean / ReduceSum / GlobalAveragePool over sample ``axes`` (0-based, batch axis
    left out) of a sample of ``shape``."""
    axes = sorted({a % len(shape) for a in axes})
    kept = [a for a in range(len(shape)) if a not in axes]
    grid = np.transpose(indices(shape), kept + axes)
    n_red = int(np.prod([shape[a] for a in axes]))
    cells = grid.reshape(-1, n_red)
    rows = np.repeat(np.arange(len(cells)), n_red)
    matrix = sp.csr_matrix((np.full(cells.size, 1.0 / n_red if mean else 1.0),
                            (rows, cells.ravel())), shape=(len(cells), int(np.prod(shape))))
    out = tuple(1 if a in axes else d for a, d in enumerate(shape)) if keepdims else \
        tuple(shape[a] for a in kept)
    return matrix, out


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
