"""Lowering an HE-friendly ONNX graph to affine maps and squares.

Every encrypted tensor of an HE-friendly model is an affine function of its *sources*: the
graph input (source 0) and the outputs of earlier squares (source ``k + 1`` is the square
of layer ``k``). The lowering walks the graph once and keeps each encrypted tensor as that
function: one ``scipy.sparse`` matrix per source it depends on, plus a bias. Every
supported operator is affine in its encrypted inputs and is applied as a sparse matrix
built from its ONNX semantics (:mod:`she.frontend.numpy_ops`): a convolution has one entry per
weight and output position, a reshape none at all. So time and memory grow with weights
times positions, never with the square of a layer's size.

At a square (``Mul(t, t)`` or ``Pow(t, 2)``) the function of ``t`` becomes a *layer*: the
affine map from the concatenation of its sources to ``t``; the square is a new source.
The model output closes the last layer. The result is a :class:`Chain`, in general a
directed acyclic graph::

    layer k:  t_k = A_k [s_i ; s_j ; ...] + b_k        (s_0 = x, s_(k+1) = t_k ** 2)
    output:   y   = A_K [s_i ; ...] + b_K

A skip connection (``Add`` of two encrypted tensors) or a ``Concat`` of branches is a layer
that reads several sources; a plain network is a chain, each layer reading the square
before it. Squares that do not reach the output are dropped. Constant subgraphs (shape
arithmetic, folded weights) are evaluated on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx
import scipy.sparse as sp
from onnx import numpy_helper

from ..errors import ModelError, UnsupportedOperatorError
from . import numpy_ops as ops
from .model import Model

Matrix = np.ndarray | sp.spmatrix


@dataclass
class Affine:
    """``y = matrix @ concat(sources) + bias`` on flattened tensors.

    ``sources``: which sources the columns read, in order (0: the model input, ``k + 1``:
    the square of layer ``k``); empty means the layer's predecessor in a chain (``(k,)``
    for layer ``k``), which :class:`Chain` fills in.
    """

    matrix: Matrix  # (n_out, n_in), float64, dense or scipy.sparse
    bias: np.ndarray  # (n_out,), float64
    out_shape: tuple[int, ...]
    sources: tuple[int, ...] = ()

    @property
    def n_in(self) -> int:
        return self.matrix.shape[1]

    @property
    def n_out(self) -> int:
        return self.matrix.shape[0]


@dataclass
class Chain:
    """Affine layers with an element-wise square after every layer but the last.

    Layer ``k`` reads the sources in ``layers[k].sources`` (concatenated); the square of
    layer ``k`` is source ``k + 1``. In a plain chain layer ``k`` reads source ``k`` only.
    """

    layers: list[Affine]
    input_shape: tuple[int, ...]
    source_sizes: list[int] = field(init=False)

    def __post_init__(self) -> None:
        for k, layer in enumerate(self.layers):
            if not layer.sources:
                layer.sources = (k,)
            if any(not 0 <= s <= k for s in layer.sources) or \
                    list(layer.sources) != sorted(set(layer.sources)):
                raise ModelError(f"layer {k} reads sources {layer.sources}: not earlier sources")
        self.source_sizes = [int(np.prod(self.input_shape))] + [
            layer.n_out for layer in self.layers[:-1]]
        for k, layer in enumerate(self.layers):
            if sum(self.source_sizes[s] for s in layer.sources) != layer.n_in:
                raise ModelError(f"layer {k} has {layer.n_in} inputs, its sources "
                                 f"{layer.sources} hold {[self.source_sizes[s] for s in layer.sources]}")

    @property
    def squares(self) -> int:
        """Number of squared layers (every layer but the output)."""
        return len(self.layers) - 1

    @cached_property
    def source_depths(self) -> list[int]:
        """Squares on the longest path from the input to every source."""
        depths = [0]
        for layer in self.layers[:-1]:
            depths.append(1 + max(depths[s] for s in layer.sources))
        return depths

    @property
    def depth(self) -> int:
        """Multiplicative depth: the squares on the longest path to the output."""
        return max(self.source_depths[s] for s in self.layers[-1].sources)

    @property
    def is_chain(self) -> bool:
        """True when every layer reads exactly the square before it."""
        return all(layer.sources == (k,) for k, layer in enumerate(self.layers))

    def layer_input(self, sources: list[np.ndarray], k: int) -> np.ndarray:
        """Layer ``k``'s input: its sources' values (each (B, size)) side by side."""
        parts = [sources[s] for s in self.layers[k].sources]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def evaluate(self, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(inputs, pre)``: every layer's input and pre-square values for a batch ``x``
        of shape (B, *input_shape)."""
        sources = [np.asarray(x, dtype=np.float64).reshape(len(x), -1)]
        inputs, pre = [], []
        for k, layer in enumerate(self.layers):
            h = self.layer_input(sources, k)
            y = np.asarray(layer.matrix @ h.T).T + layer.bias
            inputs.append(h)
            pre.append(y)
            sources.append(y * y)
        return inputs, pre

    def activations(self, x: np.ndarray) -> list[np.ndarray]:
        """Pre-square values of every layer for a batch ``x`` of shape (B, *input_shape)."""
        return self.evaluate(x)[1]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Plaintext evaluation (float64) of the graph: the output only, every source
        released after the last layer that reads it (:meth:`evaluate` keeps them all)."""
        last_read = {s: k for k, layer in enumerate(self.layers) for s in layer.sources}
        sources: dict[int, np.ndarray] = {0: np.asarray(x, dtype=np.float64).reshape(len(x), -1)}
        y = sources[0]
        for k, layer in enumerate(self.layers):
            parts = [sources[s] for s in layer.sources]
            h = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
            y = np.asarray(layer.matrix @ h.T).T + layer.bias
            del parts, h
            for s in layer.sources:
                if last_read[s] == k:
                    del sources[s]
            if k + 1 in last_read:
                sources[k + 1] = y * y
        return y

    def dense(self, max_values: int = 1 << 26) -> Chain:
        """The same chain with dense matrices (single packing's layouts and BFV use them);
        refuses a layer of more than ``max_values`` weights with a clear error."""
        layers = []
        for k, layer in enumerate(self.layers):
            if layer.n_out * layer.n_in > max_values:
                raise ModelError(f"layer {k} ({layer.n_in} -> {layer.n_out} values) is too large "
                                 f"for a dense weight matrix ({max_values} entries at most)")
            matrix = layer.matrix.toarray() if sp.issparse(layer.matrix) else layer.matrix
            layers.append(Affine(matrix, layer.bias, layer.out_shape, layer.sources))
        return Chain(layers, self.input_shape)


@dataclass
class _Traced:
    """An encrypted tensor: ``terms[s] @ source_s + bias`` for each source ``s`` it reads."""

    terms: dict[int, sp.csr_matrix]  # (size, source size)
    bias: np.ndarray  # (size,)
    shape: tuple[int, ...]  # of one sample

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def mapped(self, matrix: sp.spmatrix, shape: tuple[int, ...],
               offset: np.ndarray | float = 0.0) -> _Traced:
        """``matrix @ self + offset``, of ``shape``."""
        matrix = sp.csr_matrix(matrix)
        return _Traced({s: sp.csr_matrix(matrix @ m) for s, m in self.terms.items()},
                       matrix @ self.bias + np.broadcast_to(offset, matrix.shape[0]), tuple(shape))

    def reshaped(self, shape: tuple[int, ...]) -> _Traced:
        if int(np.prod(shape)) != self.size:
            raise ModelError(f"cannot reshape {self.shape} to {shape}")
        return _Traced(self.terms, self.bias, tuple(int(d) for d in shape))

    def indexed(self, index: np.ndarray, fill: float = 0.0) -> _Traced:
        """Element ``i`` of the result copies element ``index[i]`` (``-1``: ``fill``)."""
        return self.mapped(ops.selection(index, self.size), index.shape,
                           np.where(index.ravel() < 0, fill, 0.0))

    def scaled(self, factors: np.ndarray) -> _Traced:
        """Element-wise product with ``factors`` (one per element)."""
        return self.mapped(sp.diags(np.ravel(factors)), self.shape)

    def plus(self, other: _Traced, sign: float = 1.0) -> _Traced:
        terms = dict(self.terms)
        for s, m in other.terms.items():
            terms[s] = sp.csr_matrix(terms[s] + sign * m) if s in terms else sp.csr_matrix(sign * m)
        return _Traced(terms, self.bias + sign * other.bias, self.shape)


def _constant_traced(value: np.ndarray) -> _Traced:
    """A constant as an encrypted tensor of no source (for Concat with constants)."""
    return _Traced({}, np.asarray(value, dtype=np.float64).ravel(), tuple(np.shape(value)))


class _Tracer:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.values: dict[str, object] = dict(model.initializers())
        self.layers: list[Affine] = []
        n = model.input_size
        self.values[model.input_name] = _Traced({0: sp.identity(n, format="csr")},
                                                np.zeros(n), model.input_shape)

    # -- helpers ---------------------------------------------------------------------
    def _get(self, name: str) -> object:
        if name == "":
            return None
        if name not in self.values:
            raise ModelError(f"tensor '{name}' is used before it is defined")
        return self.values[name]

    def _close_layer(self, t: _Traced) -> None:
        """Record the affine map from ``t``'s sources to ``t``."""
        sources = tuple(sorted(t.terms))
        if not sources:
            raise ModelError("an activation or the output does not depend on the input")
        matrix = sp.hstack([t.terms[s] for s in sources], format="csr")
        matrix.eliminate_zeros()
        matrix.sum_duplicates()
        self.layers.append(Affine(matrix, t.bias.copy(), t.shape, sources))

    def _square(self, t: _Traced) -> _Traced:
        self._close_layer(t)
        return _Traced({len(self.layers): sp.identity(t.size, format="csr")}, np.zeros(t.size),
                       t.shape)

    # -- the walk --------------------------------------------------------------------
    def run(self) -> Chain:
        for i, node in enumerate(self.model.proto.graph.node):
            name = node.name or f"#{i}"
            inputs = [self._get(n) for n in node.input]
            outs = self._apply(node, name, inputs)
            for out_name, value in zip(node.output, outs, strict=False):
                self.values[out_name] = value
        out = self._get(self.model.output_name)
        if not isinstance(out, _Traced):
            raise ModelError("the model output does not depend on its input")
        self._close_layer(out)
        return _pruned(self.layers, self.model.input_shape)

    def _apply(self, node: onnx.NodeProto, name: str, inputs: list) -> list:
        op = node.op_type
        attrs = ops.attributes(node)
        traced = [v for v in inputs if isinstance(v, _Traced)]
        if not traced:
            return [self._constant(node, name, inputs, attrs)]
        t = traced[0]
        if op in ("Identity", "Dropout"):
            return [t]
        if op == "Pow":
            exponent = np.asarray(inputs[1]).ravel()
            if not isinstance(inputs[0], _Traced) or exponent.size != 1 or exponent[0] not in (1, 2):
                raise UnsupportedOperatorError(
                    name, op, "only x**1 and x**2 of an encrypted x can run encrypted"
                )
            return [self._square(t) if exponent[0] == 2 else t]
        if op in ops.ELEMENTWISE:
            return [self._elementwise(op, name, inputs, node)]
        if op == "Neg":
            return [t.scaled(np.full(t.size, -1.0))]
        if op == "Concat":
            return [self._concat(name, inputs, int(attrs["axis"]))]
        if len(traced) > 1:
            raise UnsupportedOperatorError(name, op, "only one input may be encrypted")
        if inputs[0] is not t:
            raise UnsupportedOperatorError(name, op, "only the first input may be encrypted")
        if op == "Conv":
            matrix, shape = ops.conv_matrix(t.shape, np.asarray(inputs[1], dtype=np.float64),
                                            attrs, name)
            bias = _opt(inputs, 2)
            offset = 0.0 if bias is None else np.repeat(np.asarray(bias, dtype=np.float64),
                                                        shape[1] * shape[2])
            return [t.mapped(matrix, shape, offset)]
        if op == "Gemm":
            if attrs.get("transA", 0) or len(t.shape) != 1:
                raise UnsupportedOperatorError(name, op, "only Gemm(x_encrypted, W) is supported")
            b = np.asarray(inputs[1], dtype=np.float64)
            b = b.T if attrs.get("transB", 0) else b
            alpha = float(attrs.get("alpha", 1.0))
            c = _opt(inputs, 2)
            offset = 0.0 if c is None else float(attrs.get("beta", 1.0)) * np.broadcast_to(
                np.asarray(c, dtype=np.float64).reshape(-1), b.shape[1])
            return [t.mapped(sp.csr_matrix(alpha * b.T), (b.shape[1],), offset)]
        if op == "MatMul":
            w = np.asarray(inputs[1], dtype=np.float64)
            if w.ndim != 2 or t.shape[-1] != w.shape[0]:
                raise UnsupportedOperatorError(name, op, "only x_encrypted @ W with a 2-D W is "
                                               "supported")
            prefix = int(np.prod(t.shape[:-1]))
            matrix = sp.kron(sp.identity(prefix), sp.csr_matrix(w.T))
            return [t.mapped(matrix, (*t.shape[:-1], w.shape[1]))]
        if op == "AveragePool":
            return [t.mapped(*ops.average_pool_matrix(t.shape, attrs, name))]
        if op == "GlobalAveragePool":
            return [t.mapped(*ops.mean_matrix(t.shape, list(range(1, len(t.shape))), True))]
        if op in ("ReduceMean", "ReduceSum"):
            return [self._reduce(op, name, t, inputs, attrs)]
        if op == "Flatten":
            if int(attrs.get("axis", 1)) != 1:
                raise UnsupportedOperatorError(name, op, "only Flatten(axis=1) is supported")
            return [t.reshaped((t.size,))]
        if op == "Reshape":
            target = np.asarray(inputs[1]).astype(np.int64)
            if target.size == 0 or target[0] not in (-1, 0, 1):
                raise UnsupportedOperatorError(name, op, "the reshape must keep the batch axis")
            probe = ops.reshape(np.empty((1, *t.shape), dtype=np.int8),
                                np.concatenate([[1], target[1:]]), attrs)
            return [t.reshaped(probe.shape[1:])]
        if op == "Shape":
            return [np.array([1, *t.shape], dtype=np.int64)]
        if op == "Transpose":
            perm = list(attrs.get("perm", range(len(t.shape) + 1)[::-1]))
            if perm[0] != 0:
                raise UnsupportedOperatorError(name, op, "the transpose must keep the batch axis")
            return [t.indexed(ops.indices(t.shape).transpose([p - 1 for p in perm[1:]]))]
        if op in ("Squeeze", "Unsqueeze"):
            axes = attrs.get("axes")
            if axes is None and len(inputs) > 1 and inputs[1] is not None:
                axes = list(np.asarray(inputs[1]).ravel())
            ndim = len(t.shape) + 1
            axes = [int(a) % (ndim + (op == "Unsqueeze") * len(axes or [])) for a in (axes or [])]
            if 0 in axes or not axes:
                raise UnsupportedOperatorError(name, op, "explicit non-batch axes are required")
            fn = np.squeeze if op == "Squeeze" else np.expand_dims
            return [t.reshaped(fn(np.empty((1, *t.shape), dtype=np.int8), tuple(axes)).shape[1:])]
        if op == "Pad":
            value = float(np.asarray(_opt(inputs, 2) if _opt(inputs, 2) is not None else 0.0))
            pads = np.asarray(inputs[1]).ravel()
            if len(inputs) > 3 and inputs[3] is not None:
                raise UnsupportedOperatorError(name, op, "Pad with an axes input is not supported")
            if pads[0] or pads[len(pads) // 2]:
                raise UnsupportedOperatorError(name, op, "the batch axis cannot be padded")
            half = len(pads) // 2
            sample_pads = np.concatenate([pads[1:half], pads[half + 1:]])
            return [t.indexed(ops.pad(ops.indices(t.shape), sample_pads, -1, attrs, name), value)]
        if op == "Slice":
            if any(isinstance(v, _Traced) for v in inputs[1:]):
                raise UnsupportedOperatorError(name, op, "the slice bounds must be constant")
            axes = _opt(inputs, 3)
            axes = range(len(np.ravel(inputs[1]))) if axes is None else np.ravel(axes)
            ndim = len(t.shape) + 1
            if any(int(a) % ndim == 0 for a in axes):
                raise UnsupportedOperatorError(name, op, "cannot slice the batch axis")
            grid = ops.indices(t.shape)[None]
            picked = ops.slice_(grid, inputs[1], inputs[2], [int(a) % ndim for a in axes],
                                _opt(inputs, 4))
            return [t.indexed(picked[0])]
        raise UnsupportedOperatorError(name, op, "it cannot take an encrypted input")

    def _reduce(self, op: str, name: str, t: _Traced, inputs: list, attrs: dict) -> _Traced:
        """ReduceMean / ReduceSum: axes as an attribute (opset < 18) or an input (>= 18)."""
        axes = attrs.get("axes")
        if axes is None and len(inputs) > 1 and inputs[1] is not None:
            axes = list(np.asarray(inputs[1]).ravel())
        ndim = len(t.shape) + 1
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return t
            raise UnsupportedOperatorError(name, op, "reducing over the batch axis (no axes "
                                           "given) is not supported")
        axes = [int(a) % ndim for a in axes]
        if 0 in axes:
            raise UnsupportedOperatorError(name, op, "cannot reduce over the batch axis")
        keepdims = bool(attrs.get("keepdims", 1))
        return t.mapped(*ops.mean_matrix(t.shape, [a - 1 for a in axes], keepdims,
                                         mean=op == "ReduceMean"))

    def _concat(self, name: str, inputs: list, axis: int) -> _Traced:
        parts = [v if isinstance(v, _Traced) else _constant_traced(np.asarray(v)[0])
                 for v in inputs]
        ndim = len(parts[0].shape) + 1
        if axis % ndim == 0:
            raise UnsupportedOperatorError(name, "Concat", "cannot concatenate on the batch axis")
        offsets = np.cumsum([0] + [p.size for p in parts])
        grids = [ops.indices(p.shape) + off for p, off in zip(parts, offsets, strict=False)]
        try:
            index = np.concatenate(grids, axis=axis % ndim - 1)
        except ValueError as exc:
            raise ModelError(f"node '{name}' (Concat): {exc}") from exc
        sources = sorted({s for p in parts for s in p.terms})
        terms = {s: sp.vstack([p.terms.get(s, sp.csr_matrix((p.size, self._source_size(s))))
                               for p in parts], format="csr") for s in sources}
        stacked = _Traced(terms, np.concatenate([p.bias for p in parts]), (int(offsets[-1]),))
        return stacked.indexed(index)

    def _source_size(self, s: int) -> int:
        return self.model.input_size if s == 0 else self.layers[s - 1].n_out

    def _elementwise(self, op: str, name: str, inputs: list, node: onnx.NodeProto) -> _Traced:
        a, b = inputs
        if isinstance(a, _Traced) and isinstance(b, _Traced):
            if op == "Mul" and node.input[0] == node.input[1]:
                return self._square(a)
            if op in ("Add", "Sub"):
                try:
                    if len(a.shape) != len(b.shape):
                        raise ValueError(f"shapes {a.shape} and {b.shape} differ in rank")
                    shape = np.broadcast_shapes(a.shape, b.shape)
                except ValueError as exc:
                    raise ModelError(f"node '{name}' ({op}): {exc}") from exc
                # Sums of affine maps of the sources are affine (a skip connection); an
                # operand that broadcasts is copied to the common shape first.
                a, b = (v if v.shape == shape else
                        v.indexed(np.broadcast_to(ops.indices(v.shape), shape).copy())
                        for v in (a, b))
                return a.plus(b, 1.0 if op == "Add" else -1.0)
            raise UnsupportedOperatorError(
                name, op, "a product of two different encrypted values is not supported; "
                "write squares as Mul(x, x) or Pow(x, 2)"
            )
        if op == "Div" and isinstance(b, _Traced):
            raise UnsupportedOperatorError(name, op, "cannot divide by an encrypted value")
        t = a if isinstance(a, _Traced) else b
        const = np.asarray(b if t is a else a, dtype=np.float64)
        try:
            shape = np.broadcast_shapes((1, *t.shape), const.shape)
        except ValueError as exc:
            raise ModelError(f"node '{name}' ({op}): {exc}") from exc
        if len(shape) != len(t.shape) + 1 or shape[0] != 1:
            raise UnsupportedOperatorError(name, op, "the constant must not broadcast over "
                                           "the batch axis")
        if shape[1:] != t.shape:  # the constant widens the tensor: copy its elements
            t = t.indexed(np.broadcast_to(ops.indices(t.shape), shape[1:]).copy())
        c = np.broadcast_to(const, shape).ravel()
        if op == "Add":
            return _Traced(t.terms, t.bias + c, t.shape)
        if op == "Sub":
            return _Traced(t.terms, t.bias - c, t.shape) if t is a else \
                t.scaled(np.full(t.size, -1.0)).plus(_Traced({}, c, t.shape))
        if op == "Mul":
            return t.scaled(c)
        return t.scaled(1.0 / c)  # Div by a constant

    def _constant(self, node: onnx.NodeProto, name: str, inputs: list, attrs: dict) -> object:
        op = node.op_type
        if op == "Constant":
            if "value" not in attrs:
                raise UnsupportedOperatorError(name, op, "only Constant(value=tensor) is supported")
            arr = numpy_helper.to_array(attrs["value"])
            return arr.astype(np.float64) if arr.dtype.kind == "f" else arr
        if op in ops.ELEMENTWISE:
            return ops.ELEMENTWISE[op](inputs[0], inputs[1])
        if op in ("Identity", "Dropout", "Cast"):
            return inputs[0]
        if op == "Neg":
            return -inputs[0]
        if op == "Gather":
            return np.take(inputs[0], inputs[1], axis=int(attrs.get("axis", 0)))
        if op == "Unsqueeze":
            axes = attrs.get("axes")
            axes = list(np.asarray(inputs[1]).ravel()) if axes is None else axes
            return np.expand_dims(inputs[0], tuple(int(a) for a in axes))
        if op == "Squeeze":
            axes = attrs.get("axes")
            if axes is None and len(inputs) > 1:
                axes = list(np.asarray(inputs[1]).ravel())
            return np.squeeze(inputs[0], None if axes is None else tuple(int(a) for a in axes))
        if op == "Concat":
            return np.concatenate([np.atleast_1d(v) for v in inputs], axis=int(attrs["axis"]))
        if op == "Shape":
            return np.array(np.shape(inputs[0]), dtype=np.int64)
        if op == "Reshape":
            return ops.reshape(np.asarray(inputs[0]), np.asarray(inputs[1]), attrs)
        if op == "Transpose":
            return np.transpose(inputs[0], attrs.get("perm"))
        if op == "Pow":
            return np.power(inputs[0], inputs[1])
        if op == "Slice":
            return ops.slice_(np.asarray(inputs[0]), inputs[1], inputs[2], _opt(inputs, 3),
                              _opt(inputs, 4))
        raise UnsupportedOperatorError(name, op, "constant folding of this operator is not supported")


def _opt(inputs: list, i: int) -> object:
    return inputs[i] if len(inputs) > i else None


def _pruned(layers: list[Affine], input_shape: tuple[int, ...]) -> Chain:
    """The layers that reach the output (the last one), sources renumbered."""
    needed = {len(layers) - 1}
    for k in reversed(range(len(layers))):
        if k in needed:
            needed.update(s - 1 for s in layers[k].sources if s)
    keep = sorted(needed)
    number = {0: 0, **{k + 1: i + 1 for i, k in enumerate(keep)}}
    return Chain([Affine(layers[k].matrix, layers[k].bias, layers[k].out_shape,
                         tuple(number[s] for s in layers[k].sources)) for k in keep],
                 input_shape)


def lower(model: Model) -> Chain:
    """Trace ``model`` into a :class:`Chain` (a graph) of affine maps and squares."""
    return _Tracer(model).run()
