"""Splitting off a model's trailing argmax-preserving operators.

Classifiers usually end in operators that do not change which class wins: Softmax or
LogSoftmax over the logits, and, in scikit-learn exports, a ``label`` output computed by
ArgMax -> ArrayFeatureExtractor (the class names) -> Reshape/Cast, and a ZipMap of the
probabilities. None of them can run encrypted, and none is needed to: the server returns
the logits, and the client re-applies the tail after decryption.

:func:`split_tail` removes those operators from the model and returns them as a small
plaintext ONNX model (input: the logits; outputs: the original model's outputs), which
:func:`converters.convert.convert` stores in the HE-friendly model's metadata
(:data:`she.frontend.tail.METADATA_KEY`) and :class:`she.Client` runs after decrypting.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from converters import onnx_graph as g
from she.errors import ModelError
from she.frontend.tail import TAIL_OPS, encode

#: Operators that make a trailing block a classifier tail (the others only reshape or cast).
_DECISIVE = frozenset({"Softmax", "LogSoftmax", "ArgMax", "ZipMap", "ArrayFeatureExtractor"})


def split_tail(model: onnx.ModelProto, sample: np.ndarray) -> onnx.ModelProto | None:
    """Remove the trailing argmax-preserving operators from ``model`` (in place).

    ``sample`` (a few inputs) checks that the removed operators keep the argmax. Returns
    the tail as an ONNX model (``None`` if the model has none); ``model`` then has one
    output, the logits.
    """
    outputs = {o.name for o in model.graph.output}
    tail: list[onnx.NodeProto] = []
    changed = True
    while changed:
        changed = False
        for node in reversed(model.graph.node):
            if node in tail or node.op_type not in TAIL_OPS:
                continue
            users = [u for out in node.output for u in g.consumers(model, out)]
            feeds = any(out in outputs for out in node.output) or users
            if feeds and all(u in tail for u in users):
                tail.append(node)
                changed = True
    if not any(n.op_type in _DECISIVE for n in tail):
        return None
    produced = {out for n in tail for out in n.output}
    boundary = {name for n in tail for name in n.input
                if name and name not in produced and g.get_array(model, name) is None}
    if len(boundary) != 1:
        raise ModelError(f"the model's outputs are computed from {len(boundary)} tensors "
                         f"({', '.join(sorted(boundary))}) through its final operators; "
                         "expected the logits alone")
    logits = boundary.pop()
    ordered = [n for n in model.graph.node if n in tail]
    tail_model = _tail_model(model, ordered, logits)
    _check_argmax(model, tail_model, logits, sample)
    for node in ordered:
        model.graph.node.remove(node)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT,
                                                            ["batch", None]))
    g.remove_unused_initializers(model)
    used = {n.domain for n in model.graph.node}
    kept = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return tail_model


def _tail_model(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
                logits: str) -> onnx.ModelProto:
    names = {name for n in nodes for name in n.input}
    inits = [i for i in model.graph.initializer if i.name in names]
    constants = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] in names]
    graph = helper.make_graph(
        constants + nodes, "she_tail",
        [helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, ["batch", None])],
        list(model.graph.output), inits)
    tail = helper.make_model(graph, opset_imports=list(model.opset_import),
                             ir_version=model.ir_version)
    onnx.checker.check_model(tail)
    return tail


def _check_argmax(model: onnx.ModelProto, tail: onnx.ModelProto, logits: str,
                  sample: np.ndarray) -> None:
    """Every float output of the tail has the logits' argmax, and every label output is
    the class at that argmax (checked on ``sample``)."""
    from she.frontend.tail import Tail

    z = g.run(model, sample, [logits])[0]
    if z.ndim != 2:
        first = next(n for n in tail.graph.node if logits in n.input)
        raise ModelError(f"node '{first.name}' ({first.op_type}) cannot be converted: it can "
                         f"only be moved to the client at the end of a classifier, and its input "
                         f"'{logits}' has shape {z.shape}, not (samples, classes)")
    winners = z.argmax(1)
    for name, value in Tail(encode(tail)).run(z).items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and \
                value.shape == z.shape and np.mean(value.argmax(1) == winners) < 1.0:
            raise ModelError(f"output '{name}' does not keep the argmax of '{logits}': "
                                 "its final operators cannot be moved to the client")
