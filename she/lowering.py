"""Lowering an HE-friendly ONNX graph to a chain of affine maps and squares.

Every encrypted tensor in an HE-friendly model is an affine function of its *source*:
the graph input, or the output of the latest square. The lowering traces the graph in
numpy with *probes*: a traced tensor holds its values at the points ``0, e_1, ..., e_n``
of its source, stacked on the batch axis. Every supported operator is affine in its
encrypted input, so applying it to the probes gives the probes of its output, and at a
square ``t * t`` the affine map ``t = A s + b`` is read off as ``b = t(0)`` and
``A[:, i] = t(e_i) - t(0)``. The result is a :class:`Chain`::

    x -> A_0 x + b_0 -> square -> A_1 (.) + b_1 -> square -> ... -> A_K (.) + b_K

Constant subgraphs (shape arithmetic, folded weights) are evaluated on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from . import numpy_ops as ops
from .errors import ModelError, UnsupportedOperatorError
from .model import Model

#: Above this many probe values per traced tensor the dense tracer refuses the model.
MAX_PROBE_VALUES = 200_000_000


@dataclass
class Affine:
    """``y = matrix @ x + bias`` on flattened tensors."""

    matrix: np.ndarray  # (n_out, n_in), float64
    bias: np.ndarray  # (n_out,), float64
    out_shape: tuple[int, ...]

    @property
    def n_in(self) -> int:
        return self.matrix.shape[1]

    @property
    def n_out(self) -> int:
        return self.matrix.shape[0]


@dataclass
class Chain:
    """Affine layers with an element-wise square between consecutive layers."""

    layers: list[Affine]
    input_shape: tuple[int, ...]

    @property
    def depth(self) -> int:
        """Multiplicative depth: the number of squares."""
        return len(self.layers) - 1

    def activations(self, x: np.ndarray) -> list[np.ndarray]:
        """Pre-square values of every layer for a batch ``x`` of shape (B, *input_shape)."""
        h = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        values = []
        for i, layer in enumerate(self.layers):
            if i:
                h = h * h
            h = h @ layer.matrix.T + layer.bias
            values.append(h)
        return values

    def run(self, x: np.ndarray) -> np.ndarray:
        """Plaintext evaluation (float64) of the chain."""
        return self.activations(x)[-1]


@dataclass
class _Traced:
    source: int
    probes: np.ndarray  # (n_source + 1, *shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.probes.shape[1:]


def _identity_probes(shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    if (n + 1) * n > MAX_PROBE_VALUES:
        raise ModelError(
            f"a layer with {n} encrypted inputs is too large for the dense tracer"
        )
    probes = np.zeros((n + 1, n))
    probes[1:] = np.eye(n)
    return probes.reshape((n + 1, *shape))


class _Tracer:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.values: dict[str, object] = dict(model.initializers())
        self.layers: list[Affine] = []
        self.source_count = 1
        self.values[model.input_name] = _Traced(0, _identity_probes(model.input_shape))

    # -- helpers ---------------------------------------------------------------------
    def _get(self, name: str) -> object:
        if name == "":
            return None
        if name not in self.values:
            raise ModelError(f"tensor '{name}' is used before it is defined")
        return self.values[name]

    def _close_layer(self, t: _Traced) -> None:
        """Record the affine map from the current source to ``t``."""
        if t.source != self.source_count - 1:
            raise ModelError(
                "the model uses an encrypted value across an activation (a skip connection); "
                "SHE supports chains of layers only"
            )
        flat = t.probes.reshape(t.probes.shape[0], -1)
        bias = flat[0].copy()
        matrix = (flat[1:] - bias).T.copy()
        self.layers.append(Affine(matrix, bias, t.shape))

    def _square(self, t: _Traced) -> _Traced:
        self._close_layer(t)
        self.source_count += 1
        return _Traced(self.source_count - 1, _identity_probes(t.shape))

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
        return Chain(self.layers, self.model.input_shape)

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
            return [_Traced(t.source, -t.probes)]
        if len(traced) > 1 and op != "Concat":
            raise UnsupportedOperatorError(name, op, "only one input may be encrypted")
        if op == "Conv":
            if inputs[0] is not t:
                raise UnsupportedOperatorError(name, op, "the weights must be constant")
            return [_Traced(t.source, ops.conv(t.probes, inputs[1], _opt(inputs, 2), attrs, name))]
        if op == "Gemm":
            if inputs[0] is not t or attrs.get("transA", 0) or t.probes.ndim != 2:
                raise UnsupportedOperatorError(name, op, "only Gemm(x_encrypted, W) is supported")
            return [_Traced(t.source, ops.gemm(t.probes, inputs[1], _opt(inputs, 2), attrs))]
        if op == "MatMul":
            if inputs[0] is not t:
                raise UnsupportedOperatorError(name, op, "only x_encrypted @ W is supported")
            return [_Traced(t.source, t.probes @ inputs[1])]
        if op == "AveragePool":
            return [_Traced(t.source, ops.average_pool(t.probes, attrs, name))]
        if op == "GlobalAveragePool":
            return [_Traced(t.source, t.probes.mean(axis=tuple(range(2, t.probes.ndim)),
                                                    keepdims=True))]
        if op == "Flatten":
            if int(attrs.get("axis", 1)) != 1:
                raise UnsupportedOperatorError(name, op, "only Flatten(axis=1) is supported")
            return [_Traced(t.source, t.probes.reshape(t.probes.shape[0], -1))]
        if op == "Reshape":
            target = np.asarray(inputs[1]).astype(np.int64)
            if target.size == 0 or target[0] not in (-1, 0, 1):
                raise UnsupportedOperatorError(name, op, "the reshape must keep the batch axis")
            target = np.concatenate([[t.probes.shape[0]], target[1:]])
            return [_Traced(t.source, ops.reshape(t.probes, target, attrs))]
        if op == "Shape":
            return [np.array([1, *t.shape], dtype=np.int64)]
        if op == "Transpose":
            perm = list(attrs.get("perm", range(t.probes.ndim)[::-1]))
            if perm[0] != 0:
                raise UnsupportedOperatorError(name, op, "the transpose must keep the batch axis")
            return [_Traced(t.source, t.probes.transpose(perm))]
        if op in ("Squeeze", "Unsqueeze"):
            axes = attrs.get("axes")
            if axes is None and len(inputs) > 1 and inputs[1] is not None:
                axes = list(np.asarray(inputs[1]).ravel())
            axes = [int(a) % (t.probes.ndim + (op == "Unsqueeze") * len(axes or [])) for a in
                    (axes or [])]
            if 0 in axes or not axes:
                raise UnsupportedOperatorError(name, op, "explicit non-batch axes are required")
            fn = np.squeeze if op == "Squeeze" else np.expand_dims
            return [_Traced(t.source, fn(t.probes, tuple(axes)))]
        if op == "Pad":
            value = float(np.asarray(_opt(inputs, 2) if _opt(inputs, 2) is not None else 0.0))
            pads = np.asarray(inputs[1]).ravel()
            if pads[0] or pads[len(pads) // 2]:
                raise UnsupportedOperatorError(name, op, "the batch axis cannot be padded")
            return [_Traced(t.source, ops.pad(t.probes, pads, value, attrs, name))]
        if op == "Slice":
            if any(isinstance(v, _Traced) for v in inputs[1:]):
                raise UnsupportedOperatorError(name, op, "the slice bounds must be constant")
            axes = _opt(inputs, 3)
            axes = range(len(np.ravel(inputs[1]))) if axes is None else np.ravel(axes)
            if any(int(a) % t.probes.ndim == 0 for a in axes):
                raise UnsupportedOperatorError(name, op, "cannot slice the batch axis")
            return [_Traced(t.source, ops.slice_(t.probes, inputs[1], inputs[2], axes,
                                                 _opt(inputs, 4)))]
        if op == "Concat":
            axis = int(attrs["axis"])
            if any(not isinstance(v, _Traced) or v.source != t.source for v in inputs):
                raise UnsupportedOperatorError(
                    name, op, "all inputs must be encrypted values of the same layer"
                )
            if axis % t.probes.ndim == 0:
                raise UnsupportedOperatorError(name, op, "cannot concatenate on the batch axis")
            return [_Traced(t.source, np.concatenate([v.probes for v in inputs], axis=axis))]
        raise UnsupportedOperatorError(name, op, "it cannot take an encrypted input")

    def _elementwise(self, op: str, name: str, inputs: list, node: onnx.NodeProto) -> _Traced:
        a, b = inputs
        if isinstance(a, _Traced) and isinstance(b, _Traced):
            if op == "Mul" and node.input[0] == node.input[1]:
                return self._square(a)
            if op in ("Add", "Sub") and a.source == b.source:
                # f(e_i) + g(e_i) is the probe of f + g: sums of affine maps stay affine.
                return _Traced(a.source, ops.ELEMENTWISE[op](a.probes, b.probes))
            if op in ("Add", "Sub"):
                raise ModelError(
                    f"node '{name}' ({op}) combines encrypted values from before and after an "
                    "activation (a skip connection); SHE supports chains of layers only"
                )
            raise UnsupportedOperatorError(
                name, op, "a product of two different encrypted values is not supported; "
                "write squares as Mul(x, x) or Pow(x, 2)"
            )
        if op == "Div" and isinstance(b, _Traced):
            raise UnsupportedOperatorError(name, op, "cannot divide by an encrypted value")
        t = a if isinstance(a, _Traced) else b
        const = np.asarray(b if t is a else a, dtype=np.float64)
        # Adding a constant shifts every probe (the matrix, a difference of probes, is
        # unchanged); scaling every probe scales offset and matrix alike.
        fn = ops.ELEMENTWISE[op]
        return _Traced(t.source, fn(t.probes, const) if t is a else fn(const, t.probes))

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


def lower(model: Model) -> Chain:
    """Trace ``model`` into a :class:`Chain` of affine maps and squares."""
    return _Tracer(model).run()
