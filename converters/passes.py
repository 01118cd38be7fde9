"""Conversion passes: each rewrites an ONNX model in place and is usable on its own.

* :func:`remove_identities` drops Identity, Dropout and float-to-float Cast (inference is
  the identity).
* :func:`fold_shapes` replaces Reshape targets computed from the input's shape (tf2onnx's
  Shape -> Gather -> Concat) by constants.
* :func:`fold_layout` folds the NCHW -> NHWC Transpose before a flatten (Keras flattens
  channels-last) into the weights of the MatMul/Gemm after it.
* :func:`fold_constants` evaluates nodes whose inputs are all constant.
* :func:`fold_batchnorm` folds BatchNormalization into the Conv/Gemm before it, or writes
  it as ``Mul`` + ``Add`` by constants.
* :func:`pool_before_activation` moves MaxPool ahead of the monotone activation before it
  (``maxpool(relu(x)) = relu(maxpool(x))``, exactly): the activation, which becomes a
  square, then acts on the pooled map, four times fewer values for a 2x2 window.
* :func:`replace_pooling` turns MaxPool into AveragePool (same window) and GlobalMaxPool
  into GlobalAveragePool, or MaxPool into a polynomial maximum fitted on calibration data.
* :func:`replace_activations` replaces Relu, LeakyRelu, Clip, Sigmoid and Tanh by a
  polynomial (degree 2: ``a (x + beta)^2 + gamma``; 3 or 4: two square levels) fitted per
  channel to the values the calibration data actually produces at that node (least
  squares over the observed distribution).
  GHN's double threshold, exported as ``h - k * Clip(h)``, is fitted as one function.
* :func:`quantise_pow2` rounds Conv/Gemm/MatMul weights to ``±2^k`` per output channel (or
  to sums of two or three such terms), and the activation scales to one power of two,
  compensating each scale's rounding exactly in the layers that read the activation
  (through pooling, means, later activations and residual additions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from converters import onnx_graph as g
from converters import squares
from she.errors import ModelError, ParameterError

ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh")
#: Activation polynomial degrees the converter writes (see :mod:`converters.squares`).
DEGREES = (2, 3, 4)
#: How :func:`replace_pooling` replaces MaxPool.
POOLING_MODES = ("average", "polynomial")
#: Samples per channel used to fit an activation polynomial.
FIT_SAMPLES = 20000


def _is_identity(node: onnx.NodeProto) -> bool:
    if node.op_type == "Cast":  # skl2onnx casts its float input to float
        return any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)
    return node.op_type in ("Identity", "Dropout")


def remove_identities(model: onnx.ModelProto) -> int:
    """Remove Identity, Dropout and Cast-to-float nodes; returns how many were removed."""
    removed = 0
    for node in [n for n in model.graph.node if _is_identity(n)]:
        graph_outputs = {o.name for o in model.graph.output}
        if node.output[0] in graph_outputs:
            # Keep the graph output name: rename the producer's output instead.
            src = g.producer(model, node.input[0])
            if src is None:
                continue
            for i, name in enumerate(src.output):
                if name == node.input[0]:
                    src.output[i] = node.output[0]
            g.rename_input(model, node.input[0], node.output[0])
        else:
            g.rename_input(model, node.output[0], node.input[0])
        model.graph.node.remove(node)
        removed += 1
    return removed


def fold_constants(model: onnx.ModelProto) -> int:
    """Replace nodes whose inputs are all constant by initializers; returns the count."""
    folded = 0
    for node in list(model.graph.node):
        if node.op_type in ("Constant", "Shape"):
            continue
        values = [g.get_array(model, name) for name in node.input if name]
        if not values or any(v is None for v in values):
            continue
        inputs = [helper.make_tensor_value_info(f"i{k}", numpy_helper.from_array(v).data_type,
                                                v.shape) for k, v in enumerate(values)]
        single = helper.make_node(node.op_type, [f"i{k}" for k in range(len(values))],
                                  [f"o{k}" for k in range(len(node.output))],
                                  domain=node.domain)
        single.attribute.extend(node.attribute)
        outs = [helper.make_tensor_value_info(f"o{k}", 0, None) for k in range(len(node.output))]
        tiny = helper.make_model(helper.make_graph([single], "fold", inputs, outs),
                                 opset_imports=list(model.opset_import), ir_version=9)
        results = ReferenceEvaluator(tiny).run(None, {f"i{k}": v for k, v in enumerate(values)})
        for name, value in zip(node.output, results, strict=True):
            g.set_array(model, name, np.asarray(value))
        model.graph.node.remove(node)
        folded += 1
    g.remove_unused_initializers(model)
    return folded


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes none of whose outputs is used; returns the count."""
    removed = 0
    while True:
        used = {name for node in model.graph.node for name in node.input}
        used |= {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if not any(out in used for out in n.output)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
        removed += len(dead)
    g.remove_unused_initializers(model)
    return removed


def fold_shapes(model: onnx.ModelProto) -> int:
    """Make every Reshape target constant: a target computed from the input's shape is
    evaluated for two batch sizes; the entry that follows the batch becomes -1 (0 when
    the target has a -1 already). Returns
    the number of targets replaced."""
    targets = [n for n in model.graph.node
               if n.op_type == "Reshape" and g.get_array(model, n.input[1]) is None]
    if not targets:
        return 0
    _, shape = g.input_info(model)
    names = [n.input[1] for n in targets]
    one, two = (g.run(model, np.zeros((b, *shape), np.float32), names) for b in (1, 2))
    for node, a, b in zip(targets, one, two, strict=True):
        a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
        varying = np.flatnonzero(a != b)
        if len(varying) > 1 or any(a[i] != 1 or b[i] != 2 for i in varying):
            raise ModelError(f"node '{node.name}': its Reshape target depends on more than the "
                             "batch size")
        target = a.astype(np.int64)
        # the batch entry: -1, or 0 (copy the input's batch axis) when -1 is taken
        target[varying] = 0 if np.any(target == -1) and list(varying) == [0] else -1
        if np.sum(target == -1) > 1:
            raise ModelError(f"node '{node.name}': its Reshape target depends on more than the "
                             "batch size")
        node.input[1] = g.fresh("shape")
        g.set_array(model, node.input[1], target)
    remove_dead_nodes(model)
    return len(targets)


def _flatten_after(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Flatten(axis=1) or Reshape(-1 | 0, features) reading ``node``'s output alone."""
    users = g.consumers(model, node.output[0])
    if len(users) != 1 or node.output[0] in {o.name for o in model.graph.output}:
        return None
    user = users[0]
    if user.op_type == "Flatten":
        return user if next((a.i for a in user.attribute if a.name == "axis"), 1) == 1 else None
    if user.op_type == "Reshape":
        target = g.get_array(model, user.input[1])
        if target is not None and target.size == 2 and target[0] in (-1, 0) and target[1] > 0:
            return user
    return None


def fold_layout(model: onnx.ModelProto, sample: np.ndarray) -> int:
    """Fold ``Transpose(perm=[0, 2, 3, 1]) -> flatten -> MatMul/Gemm`` (Keras flattening
    channels-last) into ``Flatten -> MatMul/Gemm`` with the weight rows permuted (exact);
    returns the count. ``sample`` (one input) gives the transposed tensor's shape."""
    count = 0
    for node in [n for n in model.graph.node if n.op_type == "Transpose"]:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        flat = _flatten_after(model, node) if perm == [0, 2, 3, 1] else None
        users = [] if flat is None else g.consumers(model, flat.output[0])
        if len(users) != 1 or users[0].op_type not in ("MatMul", "Gemm"):
            continue
        dense = users[0]
        w = g.get_array(model, dense.input[1])
        attrs = {a.name: helper.get_attribute_value(a) for a in dense.attribute}
        if w is None or w.ndim != 2 or attrs.get("transA", 0):
            continue
        _, c, h, wd = g.run(model, sample[:1], [node.input[0]])[0].shape
        order = np.arange(h * wd * c).reshape(h, wd, c).transpose(2, 0, 1).reshape(-1)
        trans_b = attrs.get("transB", 0)
        g.set_array(model, dense.input[1], w[:, order] if trans_b else w[order])
        g.rename_input(model, node.output[0], node.input[0])
        model.graph.node.remove(node)
        new_flat = helper.make_node("Flatten", [flat.input[0]], [flat.output[0]], axis=1,
                                    name=f"{flat.name}_nchw")
        g.replace_node(model, flat, [new_flat])
        count += 1
    g.remove_unused_initializers(model)
    return count


def fold_batchnorm(model: onnx.ModelProto) -> int:
    """Fold every BatchNormalization; returns the count."""
    count = 0
    for node in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        scale, bias, mean, var = (g.get_array(model, n) for n in node.input[1:5])
        if any(v is None for v in (scale, bias, mean, var)):
            raise ModelError(f"node '{node.name}': batch-norm statistics must be constants")
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        a = scale / np.sqrt(var + eps)
        c = bias - a * mean
        src = g.producer(model, node.input[0])
        if src is not None and src.op_type == "Conv" and len(g.consumers(model, src.output[0])) == 1:
            w = g.get_array(model, src.input[1])
            b = g.get_array(model, src.input[2]) if len(src.input) > 2 else np.zeros(len(a))
            g.set_array(model, src.input[1], (w * a.reshape(-1, *([1] * (w.ndim - 1))))
                        .astype(np.float32))
            new_bias = g.fresh("bias")
            g.set_array(model, new_bias, (b * a + c).astype(np.float32))
            if len(src.input) > 2:
                src.input[2] = new_bias
            else:
                src.input.append(new_bias)
            g.rename_input(model, node.output[0], node.input[0])
            model.graph.node.remove(node)
        else:
            shape = (1, -1) + (1,) * (_rank(model, node.input[0]) - 2)
            scaled = g.fresh("bn_scaled")
            g.replace_node(model, node, [
                helper.make_node("Mul", [node.input[0],
                                         g.add_constant(model, a.reshape(shape), "bn_a")],
                                 [scaled], name=f"{node.name}_scale"),
                helper.make_node("Add", [scaled, g.add_constant(model, c.reshape(shape), "bn_c")],
                                 [node.output[0]], name=f"{node.name}_shift"),
            ])
        count += 1
    g.remove_unused_initializers(model)
    return count


def _rank(model: onnx.ModelProto, tensor: str) -> int:
    inferred = onnx.shape_inference.infer_shapes(model)
    for info in list(inferred.graph.value_info) + list(inferred.graph.input):
        if info.name == tensor and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    raise ModelError(f"cannot infer the rank of '{tensor}' for batch-norm folding")


def pool_before_activation(model: onnx.ModelProto) -> int:
    """Swap ``activation -> MaxPool`` into ``MaxPool -> activation`` where the activation is
    monotone non-decreasing and feeds only the pool (an exact rewrite); returns the count."""
    count = 0
    nodes = model.graph.node
    for pool in [n for n in nodes if n.op_type in ("MaxPool", "GlobalMaxPool")]:
        act = g.producer(model, pool.input[0])
        if (act is None or act.op_type not in ACTIVATIONS or len(pool.output) != 1
                or len(g.consumers(model, act.output[0])) != 1
                or act.output[0] in {o.name for o in model.graph.output}):
            continue
        pooled = g.fresh("pooled")
        pool.input[0], act.input[0] = act.input[0], pooled
        act.output[0], pool.output[0] = pool.output[0], pooled
        i, j = list(nodes).index(act), list(nodes).index(pool)
        moved = onnx.NodeProto()
        moved.CopyFrom(pool)
        del nodes[j]
        nodes.insert(i, moved)
        count += 1
    return count


def replace_pooling(model: onnx.ModelProto, mode: str = "average",
                    calibration: np.ndarray | None = None) -> int:
    """Replace max pooling by something the engine can run; returns the nodes replaced.

    ``mode="average"``: MaxPool -> AveragePool (same window), GlobalMaxPool ->
    GlobalAveragePool (no extra depth). ``mode="polynomial"``: each 2-D MaxPool becomes a
    polynomial maximum fitted on ``calibration`` (one multiplicative level per halving of
    the window, two for 2x2: :func:`converters.squares.write_polynomial_max`).
    """
    if mode not in POOLING_MODES:
        raise ParameterError(f"max pooling mode '{mode}': choose one of {POOLING_MODES}")
    targets = [n for n in model.graph.node if n.op_type in ("MaxPool", "GlobalMaxPool")]
    if mode == "polynomial" and targets:
        if calibration is None:
            raise ParameterError("a polynomial max pooling needs calibration data")
        values = g.run(model, calibration, [n.input[0] for n in targets])
        rng = np.random.default_rng(0)
        for node, x in zip(targets, values, strict=True):
            if node.op_type == "GlobalMaxPool":
                raise ModelError(f"node '{node.name}': GlobalMaxPool has no polynomial form "
                                 "here; convert with max_pool='average'")
            nodes, _ = squares.write_polynomial_max(model, node, x, rng, FIT_SAMPLES)
            g.replace_node(model, node, nodes)
        return len(targets)
    count = 0
    for node in targets:
        if node.op_type == "GlobalMaxPool":
            new = helper.make_node("GlobalAveragePool", [node.input[0]], [node.output[0]],
                                   name=node.name + "_avg")
        else:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", [1])):
                raise ModelError(f"node '{node.name}': MaxPool with ceil_mode or dilations "
                                 "cannot be replaced")
            keep = {k: v for k, v in attrs.items() if k in ("kernel_shape", "strides", "pads")}
            new = helper.make_node("AveragePool", [node.input[0]], [node.output[0]],
                                   name=node.name + "_avg", count_include_pad=1, **keep)
        g.replace_node(model, node, [new])
        count += 1
    return count


@dataclass
class FittedActivation:
    """What :func:`replace_activations` did to one node."""

    node: str
    op_type: str
    channels: int
    value_range: tuple[float, float]
    rmse: float  # root-mean-square error of the fit on the calibration values
    degree: int = 2


def _activation(node: onnx.NodeProto, model: onnx.ModelProto):
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op == "Relu":
        return lambda x: np.maximum(x, 0)
    if op == "LeakyRelu":
        alpha = float(attrs.get("alpha", 0.01))
        return lambda x: np.where(x > 0, x, alpha * x)
    if op == "Sigmoid":
        return lambda x: 1 / (1 + np.exp(-x))
    if op == "Tanh":
        return np.tanh
    lo = g.get_array(model, node.input[1]) if len(node.input) > 1 and node.input[1] else None
    hi = g.get_array(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    lo = -np.inf if lo is None else float(lo)
    hi = np.inf if hi is None else float(hi)
    return lambda x: np.clip(x, lo, hi)


def _with_residual(model: onnx.ModelProto, node: onnx.NodeProto, f):
    """GHN's double threshold ``h - k * clip(h, -t, t)`` (and ``h + k * act(h)``) exports as
    ``Sub(h, Mul(act(h), k))``. A polynomial for ``act`` alone would leave ``h`` beside its
    own square, which no chain of affine maps and squares can express, so the whole
    expression is fitted instead. Returns the extra nodes it spans, its output tensor and
    its function (no extra nodes: the activation alone)."""
    h, out = node.input[0], node.output[0]
    users = g.consumers(model, out)
    if len(users) != 1 or users[0].op_type != "Mul":
        return [], out, f
    mul = users[0]
    other = [name for name in mul.input if name != out]
    k = g.get_array(model, other[0]) if len(other) == 1 else None
    if k is None or k.size != 1:
        return [], out, f
    combine = g.consumers(model, mul.output[0])
    if len(combine) != 1 or sorted(combine[0].input) != sorted([h, mul.output[0]]):
        return [], out, f
    k = float(k.reshape(()))
    if combine[0].op_type == "Sub" and combine[0].input[0] == h:
        return [mul, combine[0]], combine[0].output[0], lambda x: x - k * f(x)
    if combine[0].op_type == "Add":
        return [mul, combine[0]], combine[0].output[0], lambda x: x + k * f(x)
    return [], out, f


def _kind(node: onnx.NodeProto, spanned: list) -> str:
    return f"{node.op_type} (double threshold)" if spanned else node.op_type


def fit_quadratic(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``a x^2 + b x + c`` through the samples; returns (a, b, c).

    The engine evaluates ``a (x + b/2a)^2 + c - b^2/4a``, which is ill-conditioned when the
    vertex ``-b/2a`` lies far outside the data (a nearly linear fit). The curvature is then
    raised until the vertex sits at twice the data's reach, and ``b, c`` are refitted.
    """
    design = np.stack([x * x, x, np.ones_like(x)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    reach = max(float(np.max(np.abs(x))), 1e-6)
    if abs(b) > 4 * reach * abs(a):
        a = np.copysign(abs(b) / (4 * reach), a if a != 0 else 1.0)
        (b, c), *_ = np.linalg.lstsq(design[:, 1:], y - a * x * x, rcond=None)
    return float(a), float(b), float(c)


def replace_activations(model: onnx.ModelProto, calibration: np.ndarray, degree: int = 2,
                        progress=None, degrees: dict[str, int] | None = None
                        ) -> list[FittedActivation]:
    """Replace non-polynomial activations by per-channel polynomials fitted on calibration data.

    Degree 2 (one multiplicative level) is written ``a (x + beta)^2 + gamma`` as Add,
    Mul(t, t), Mul, Add. Degrees 3 and 4 cost two levels and four times as many squares
    (:func:`converters.squares.write_polynomial`). ``degrees`` gives some activations (by
    node name) another degree than ``degree``.
    """
    degrees = degrees or {}
    for value in {degree, *degrees.values()}:
        if value not in DEGREES:
            raise ParameterError(f"degree {value} is not supported: choose one of {DEGREES} "
                                 "(degree 2 costs one multiplicative level, 3 and 4 cost two)")
    nodes = [n for n in model.graph.node if n.op_type in ACTIVATIONS]
    unknown = set(degrees) - {n.name for n in nodes}
    if unknown:
        raise ParameterError(f"no activation named {', '.join(sorted(unknown))}")
    if not nodes:
        return []
    values = g.run(model, calibration, [n.input[0] for n in nodes])
    fitted = []
    for node, x in zip(nodes, values, strict=True):
        spanned, output, f = _with_residual(model, node, _activation(node, model))
        for extra in spanned:
            model.graph.node.remove(extra)
        rng = np.random.default_rng(0)
        node_degree = degrees.get(node.name, degree)
        if node_degree > 2:
            written, rmse = squares.write_polynomial(model, node.input[0], output, x, f,
                                                     node_degree, node.name, rng, FIT_SAMPLES)
            g.replace_node(model, node, written)
            fitted.append(FittedActivation(node.name, _kind(node, spanned), x.shape[1],
                                           (float(x.min()), float(x.max())), rmse,
                                           node_degree))
            if progress is not None:
                progress(1)
            continue
        channels = x.shape[1] if x.ndim >= 2 else 1
        per_channel = np.moveaxis(x, 1, 0).reshape(channels, -1) if x.ndim >= 2 else x[None]
        coeffs = np.empty((channels, 3))
        errors = []
        for ch, v in enumerate(per_channel):
            v = v.astype(np.float64)
            if v.size > FIT_SAMPLES:
                v = rng.choice(v, FIT_SAMPLES, replace=False)
            coeffs[ch] = fit_quadratic(v, f(v))
            a, b, c = coeffs[ch]
            errors.append(np.mean((a * v * v + b * v + c - f(v)) ** 2))
        shape = (1, channels) + (1,) * (x.ndim - 2) if x.ndim >= 2 else (channels,)
        a, b, c = (coeffs[:, k].reshape(shape) for k in range(3))
        a = np.where(a == 0, 1e-6, a)  # a constant channel: any small curvature will do
        beta = b / (2 * a)
        gamma = c - b * b / (4 * a)
        t, sq, scaled = g.fresh("t"), g.fresh("sq"), g.fresh("scaled")
        g.replace_node(model, node, [
            helper.make_node("Add", [node.input[0], g.add_constant(model, beta, "beta")], [t],
                             name=f"{node.name}_shift"),
            helper.make_node("Mul", [t, t], [sq], name=f"{node.name}_square"),
            # named she_a_<n> (SCALE_PREFIX): quantise_pow2 and fine-tuning find it by name
            helper.make_node("Mul", [sq, g.add_constant(model, a, "a")], [scaled],
                             name=f"{node.name}_scale"),
            helper.make_node("Add", [scaled, g.add_constant(model, gamma, "gamma")],
                             [output], name=f"{node.name}_offset"),
        ])
        fitted.append(FittedActivation(node.name, _kind(node, spanned), channels,
                                       (float(x.min()), float(x.max())),
                                       float(np.sqrt(np.mean(errors)))))
        if progress is not None:
            progress(1)
    return fitted


def _weight_axis(model: onnx.ModelProto, node: onnx.NodeProto) -> int | None:
    """The output-channel axis of a linear node's weight (None if not a constant weight)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1
    return None


def _nearest_pow2(r: np.ndarray, e_min: np.ndarray, e_max: np.ndarray) -> np.ndarray:
    """``r`` rounded to ``±2^e`` with ``e_min <= e <= e_max`` (row-wise), or 0 below."""
    mag = np.abs(r)
    with np.errstate(divide="ignore"):
        e = np.clip(np.round(np.log2(np.where(mag > 0, mag, 1))), e_min, e_max)
    return np.where(mag < 2.0 ** (e_min - 1), 0.0, np.sign(r) * 2.0 ** e)


def pow2_round(w: np.ndarray, axis: int, exponent_bits: int, terms: int = 1) -> np.ndarray:
    """Round to sums of ``terms`` signed powers of two, ``±2^k (± 2^j ...)``.

    Each output channel has ``2^exponent_bits - 1`` exponents, the largest nearest to its
    largest weight; each term rounds what the terms before it left (a weight of two terms
    costs two shifts instead of one). Values below the smallest exponent become 0.
    """
    levels = 2 ** exponent_bits - 1
    moved = np.moveaxis(w.astype(np.float64), axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    top = np.max(np.abs(flat), axis=1, keepdims=True)
    e_max = np.round(np.log2(np.where(top > 0, top, 1.0)))
    e_min = e_max - (levels - 1)
    out = np.zeros_like(flat)
    for _ in range(terms):
        out += _nearest_pow2(flat - out, e_min, e_max)
    out[top[:, 0] == 0] = 0.0
    return np.moveaxis(out.reshape(moved.shape), 0, axis).astype(np.float32)


#: Prefix of the activation scale tensors written by :func:`replace_activations`.
SCALE_PREFIX = "she_a_"


def pow2_nearest(values: np.ndarray) -> np.ndarray:
    """Each value rounded to the nearest ``±2^k`` (in the log domain)."""
    mag = np.maximum(np.abs(values), 1e-30)
    return (np.sign(values) * 2.0 ** np.round(np.log2(mag))).astype(np.float32)


#: Operators that act on every channel alike and linearly (a per-channel factor commutes).
_CHANNEL_LINEAR = ("AveragePool", "GlobalAveragePool", "Flatten", "Pad", "Reshape", "ReduceMean",
                   "ReduceSum")


def _channel_shape(value: np.ndarray, channels: int) -> tuple[int, ...] | None:
    """The shape that broadcasts a per-channel vector against the constant ``value`` of a
    per-channel operation (``(1, C, 1, ...)`` or ``(C,)``), or None when it has none."""
    if value.ndim >= 2 and value.shape[1] == channels and value.shape[0] == 1:
        return (1, channels) + (1,) * (value.ndim - 2)
    if value.ndim == 1 and value.shape[0] == channels:
        return (channels,)
    return None


class _Compensation:
    """Keep a model's outputs unchanged when a tensor comes out divided by a positive
    per-channel ``ratio`` (an activation scale rounded to a power of two): every consumer
    takes the ratio in. A linear layer multiplies its input channels' weights by it; an
    activation ``a (x + beta)^2 + gamma`` becomes ``a r^2 (x + beta / r)^2 + gamma``
    (exact, before its own scale is rounded); channel-wise linear operators (pooling,
    padding, flattening, means, constant products) pass it on; an addition of two
    encrypted tensors (a residual connection) has the other operand divided by the ratio
    at its linear layer (the projection or the block's last convolution), and passes it
    on. Works on a model that is discarded when a step has no exact form."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.visited: set[str] = set()  # nodes, by their first output
        self.outputs = {o.name for o in model.graph.output}

    def absorb(self, tensor: str, ratio: np.ndarray, flat: bool = False) -> bool:
        if tensor in self.outputs:
            return False
        return all(self._node(node, tensor, ratio, flat)
                   for node in g.consumers(self.model, tensor))

    def _node(self, node: onnx.NodeProto, tensor: str, ratio: np.ndarray, flat: bool) -> bool:
        if node.output[0] in self.visited or node.input[0] != tensor and node.op_type != "Add":
            return False
        self.visited.add(node.output[0])
        model, op = self.model, node.op_type
        if op in ("Conv", "Gemm", "MatMul"):
            return self._scale_weights(node, ratio, flat, inputs=True)
        if op in _CHANNEL_LINEAR or op == "MaxPool":
            if op == "Pad" and len(node.input) > 2 and node.input[2] and \
                    np.any(g.get_array(model, node.input[2]) != 0):
                return False
            if op in ("ReduceMean", "ReduceSum"):
                axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
                if axes is None and len(node.input) > 1 and node.input[1]:
                    axes = g.get_array(model, node.input[1]).tolist()
                if not axes or any(int(v) in (0, 1) for v in axes):
                    return False
            return self.absorb(node.output[0], ratio, flat or op in ("Flatten", "Reshape"))
        if op == "Mul":
            k = g.get_array(model, node.input[1])
            return k is not None and self.absorb(node.output[0], ratio, flat)
        if op != "Add":
            return False
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        c = g.get_array(model, other)
        if c is None:  # a residual connection: divide the other operand alike
            return (other == tensor or self._divide(other, ratio)) and \
                self.absorb(node.output[0], ratio, flat)
        shape = None if flat else _channel_shape(c, len(ratio))
        if shape is None:
            return False
        r = ratio.reshape(shape)
        square = g.consumers(model, node.output[0])
        scale = g.consumers(model, square[0].output[0]) if len(square) == 1 else []
        if (len(square) == 1 and square[0].op_type == "Mul" and
                list(square[0].input) == [node.output[0]] * 2 and len(scale) == 1 and
                scale[0].input[1].startswith(SCALE_PREFIX)):
            a = g.get_array(model, scale[0].input[1])
            g.set_array(model, other, (c / r).astype(np.float32))
            g.set_array(model, scale[0].input[1], (a * r.reshape(a.shape) ** 2)
                        .astype(np.float32))
            return True
        g.set_array(model, other, (c / r).astype(np.float32))
        return self.absorb(node.output[0], ratio, flat)

    def _divide(self, tensor: str, ratio: np.ndarray) -> bool:
        """Make ``tensor`` (read by one addition only) come out divided by ``ratio``."""
        model = self.model
        src = g.producer(model, tensor)
        if src is None or len(g.consumers(model, tensor)) != 1 or tensor in self.outputs:
            return False
        if src.op_type in ("Conv", "Gemm", "MatMul"):
            return self._scale_weights(src, 1 / ratio, False, inputs=False)
        const = [g.get_array(model, name) for name in src.input]
        if src.op_type in ("Add", "Mul") and sum(c is not None for c in const) == 1:
            k = 1 if const[1] is not None else 0
            if src.op_type == "Add":
                shape = _channel_shape(const[k], len(ratio))
                if shape is None:
                    return False
                g.set_array(model, src.input[k], (const[k] / ratio.reshape(shape))
                            .astype(np.float32))
            return self._divide(src.input[1 - k], ratio)
        return False

    def _scale_weights(self, node: onnx.NodeProto, factor: np.ndarray, flat: bool,
                       inputs: bool) -> bool:
        """Multiply a linear layer's weights per input (or output) channel by ``factor``
        (repeated over the positions of a flattened map); outputs scale the bias too."""
        model = self.model
        axis = _weight_axis(model, node)
        w = g.get_array(model, node.input[1]) if len(node.input) > 1 else None
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if axis is None or w is None or w.ndim < 2 or group != 1 or \
                len(g.consumers(model, node.input[1])) != 1:
            return False
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            return False
        k = (1 if node.op_type == "Conv" else 1 - axis) if inputs else axis
        per = w.shape[k] // len(factor)
        if per * len(factor) != w.shape[k] or (per > 1 and not flat):
            return False
        shape = [1] * w.ndim
        shape[k] = -1
        g.set_array(model, node.input[1], (w * np.repeat(factor, per).reshape(shape))
                    .astype(np.float32))
        if not inputs and len(node.input) > 2 and node.input[2]:
            b = g.get_array(model, node.input[2])
            if b is None or b.size not in (1, len(factor)):
                return False
            g.set_array(model, node.input[2], (b * factor).astype(np.float32))
        return True


def _compensate(model: onnx.ModelProto, scale: str, ratio: np.ndarray) -> bool:
    """Rounding an activation's scale ``a`` to a power of two multiplies its output
    ``a t^2 + gamma`` by ``1/ratio`` per channel once ``gamma`` is divided by ``ratio`` too;
    the consumers then take ``ratio`` in (:class:`_Compensation`: linear layers before
    their own rounding, later activations, both operands of a residual addition), so the
    model is unchanged. Returns False (nothing changed) when some consumer cannot."""
    users = g.consumers(model, scale)
    add = g.consumers(model, users[0].output[0]) if len(users) == 1 else []
    if len(add) != 1 or add[0].op_type != "Add":
        return False
    gamma = g.get_array(model, add[0].input[1])
    if gamma is None or np.size(gamma) not in (1, len(ratio)):
        return False
    trial = onnx.ModelProto()
    trial.CopyFrom(model)
    g.set_array(trial, add[0].input[1],
                (gamma / ratio.reshape(np.shape(gamma)) if np.size(gamma) == len(ratio)
                 else gamma / ratio).astype(np.float32))
    if not _Compensation(trial).absorb(add[0].output[0], ratio):
        return False
    model.CopyFrom(trial)
    return True


def quantise_pow2(model: onnx.ModelProto, exponent_bits: int = 4, terms: int = 1) -> int:
    """Round Conv/Gemm/MatMul weights to powers of two (sums of ``terms`` of them), and the
    activation scales ``a`` to one power of two.

    With both rounded, every affine map the engine sees is a product of powers of two (or
    a short sum of them), so it runs as an exact integer shift-accumulate. Returns the
    number of tensors rounded.
    """
    if not 1 <= exponent_bits <= 6:
        raise ParameterError(f"exponent_bits={exponent_bits} is outside 1..6")
    if terms not in (1, 2, 3):
        raise ParameterError(f"pow2 terms={terms} is outside 1..3")
    count = 0
    # in graph order: compensating one rounding changes the scales of later activations
    scales = [name for node in model.graph.node for name in node.input
              if name.startswith(SCALE_PREFIX)]
    for name in dict.fromkeys(scales):
        a = g.get_array(model, name)
        rounded = pow2_nearest(a)
        _compensate(model, name, (a / rounded).reshape(-1))
        g.set_array(model, name, rounded)
        count += 1
    for node in model.graph.node:
        axis = _weight_axis(model, node)
        if axis is None:
            continue
        w = g.get_array(model, node.input[1])
        if w is None or w.ndim < 2:
            continue
        g.set_array(model, node.input[1], pow2_round(w, axis, exponent_bits, terms))
        count += 1
    return count
