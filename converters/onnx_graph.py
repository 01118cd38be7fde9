"""Small helpers for rewriting ONNX graphs in place.

The passes in :mod:`converters.passes` work on an ``onnx.ModelProto``: they look nodes up
by the tensors they produce and consume, swap initializers, and splice in replacements.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from she.errors import DataError, ModelError

#: Operators the converter accepts as input (anything else is named in an error). ReduceMean
#: and ConstantOfShape are accepted for constant folding (GHN exports the mean of its
#: weights with ReduceMean; torch exports the pads of ZeroPad2d with ConstantOfShape).
IMPORTABLE_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv",
    "Div", "Dropout", "Flatten", "Gather", "Gemm", "GlobalAveragePool", "GlobalMaxPool",
    "Identity", "LeakyRelu", "MatMul", "MaxPool", "Mul", "Neg", "Pad", "ReduceMean", "Relu", "Reshape",
    "Shape", "Sigmoid", "Slice", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
})
MIN_OPSET, MAX_OPSET = 13, 21
_names = itertools.count()


def fresh(prefix: str) -> str:
    """A tensor/node name that no pass has used yet."""
    return f"she_{prefix}_{next(_names)}"


def opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelError("the model imports no default-domain opset")


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file for conversion, with clear errors for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"{path}: not a valid ONNX model ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return model


def check_opset(model: onnx.ModelProto) -> None:
    """Refuse opsets the converter does not handle."""
    version = opset(model)
    if not MIN_OPSET <= version <= MAX_OPSET:
        raise ModelError(f"opset {version} is not supported; export with an opset from "
                         f"{MIN_OPSET} to {MAX_OPSET}")


def check_importable(model: onnx.ModelProto) -> None:
    """Refuse opsets and operators the converter does not handle, naming the node."""
    check_opset(model)
    for i, node in enumerate(model.graph.node):
        if node.op_type not in IMPORTABLE_OPS or node.domain not in ("", "ai.onnx"):
            raise ModelError(
                f"node '{node.name or f'#{i}'}' uses operator {node.domain + '.' if node.domain else ''}"
                f"{node.op_type}, which `she convert` cannot convert; supported: "
                f"{', '.join(sorted(IMPORTABLE_OPS))}")


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def get_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """An initializer (or Constant node output) as numpy, or None if it is not constant."""
    init = initializers(model).get(name)
    if init is not None:
        return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def set_array(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace (or add) initializer ``name``."""
    graph = model.graph
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    graph.initializer.append(numpy_helper.from_array(value, name))


def add_constant(model: onnx.ModelProto, value: np.ndarray, prefix: str) -> str:
    name = fresh(prefix)
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return name


def consumers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if tensor in n.output), None)


def rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    """Make every consumer of ``old`` (and the graph outputs) read ``new`` instead."""
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in model.graph.output:
        if out.name == old:
            out.name = new


def replace_node(model: onnx.ModelProto, node: onnx.NodeProto,
                 new_nodes: list[onnx.NodeProto]) -> None:
    """Splice ``new_nodes`` in where ``node`` was (topological order is kept)."""
    nodes = model.graph.node
    index = list(nodes).index(node)
    nodes.remove(node)
    for offset, new in enumerate(new_nodes):
        nodes.insert(index + offset, new)


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def input_info(model: onnx.ModelProto) -> tuple[str, tuple[int, ...]]:
    """Name and per-sample shape of the single graph input."""
    inits = set(initializers(model))
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"expected one graph input, found {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = []
    for d in dims[1:]:
        if not d.HasField("dim_value"):
            raise ModelError(f"input dimension '{d.dim_param or '?'}' is dynamic; only the batch "
                             "axis may be (export with fixed image sizes)")
        shape.append(int(d.dim_value))
    return inputs[0].name, tuple(shape)


def run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str] | None = None,
        batch: int = 1000) -> list[np.ndarray]:
    """Run ``model`` with onnxruntime on ``x``; ``outputs`` may name intermediate tensors."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = outputs or [o.name for o in model.graph.output]
    existing = {o.name for o in probe.graph.output}
    extra = [name for name in names if name not in existing]
    if extra:  # intermediate tensors: float unless shape inference knows better (shapes)
        types = {info.name: info.type.tensor_type.elem_type for info in
                 onnx.shape_inference.infer_shapes(probe).graph.value_info}
        for name in extra:
            probe.graph.output.append(helper.make_tensor_value_info(
                name, types.get(name) or TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    input_name, shape = input_info(model)
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1:] != shape:
        raise DataError(f"calibration/evaluation data must have samples of shape {shape}, "
                        f"got an array of shape {x.shape}")
    parts = [session.run(names, {input_name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]
