"""Loading and validating HE-friendly ONNX models.

An HE-friendly model is an ordinary ONNX file that uses only operators the encrypted
engine can run (see :data:`SUPPORTED_OPS`): linear layers, average pooling and means,
reshapes, concatenations, element-wise arithmetic with constants, additions of encrypted
tensors (skip connections), and polynomial activations written with ``Mul`` or ``Pow``.
SHE-specific hints live in ``metadata_props`` (``she.input_range``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelError, UnsupportedOperatorError

#: Operators the encrypted engine runs.
SUPPORTED_OPS = frozenset({
    "Add", "AveragePool", "Cast", "Concat", "Constant", "Conv", "Div", "Dropout", "Flatten",
    "Gather", "Gemm", "GlobalAveragePool", "Identity", "MatMul", "Mul", "Neg", "Pad", "Pow",
    "ReduceMean", "ReduceSum", "Reshape", "Shape", "Slice", "Squeeze", "Sub", "Transpose",
    "Unsqueeze",
})

#: Operators that have an HE-friendly replacement in ``she convert``.
CONVERTIBLE_OPS = frozenset({
    "BatchNormalization", "Clip", "HardSigmoid", "LeakyRelu", "MaxPool", "Relu", "Sigmoid",
    "Tanh", "GlobalMaxPool",
})

#: Refuse model files larger than this (bytes): protects ``she.load`` from huge inputs.
MAX_MODEL_BYTES = 512 * 1024 * 1024


@dataclass
class Model:
    """A validated HE-friendly ONNX model.

    Attributes:
        proto: the ONNX model.
        input_name: name of the single (encrypted) graph input.
        input_shape: shape of one sample (without the batch axis).
        output_name: name of the graph output.
        metadata: the model's ``metadata_props`` as a dict.
        name: a short name (file stem, or the graph name).
    """

    proto: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = "model"

    @property
    def input_size(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def input_range(self) -> tuple[float, float]:
        """Declared range of the input values (metadata ``she.input_range``, default 0..1)."""
        text = self.metadata.get("she.input_range", "0,1")
        try:
            lo, hi = (float(v) for v in text.split(","))
        except ValueError as exc:
            raise ModelError(f"metadata she.input_range={text!r} is not 'low,high'") from exc
        return lo, hi

    def initializers(self) -> dict[str, np.ndarray]:
        """All initializers as numpy arrays (float64 for floating point)."""
        out = {}
        for init in self.proto.graph.initializer:
            arr = numpy_helper.to_array(init)
            out[init.name] = arr.astype(np.float64) if arr.dtype.kind == "f" else arr
        return out

    def run_plain(self, x: np.ndarray) -> np.ndarray:
        """Run the model in plaintext with onnxruntime (the reference for encrypted results)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            self.proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        x = np.asarray(x, dtype=np.float32).reshape((-1, *self.input_shape))
        return session.run([self.output_name], {self.input_name: x})[0]


def _check_ops(graph: onnx.GraphProto) -> None:
    for i, node in enumerate(graph.node):
        name = node.name or f"#{i}"
        if node.op_type in SUPPORTED_OPS and node.domain in ("", "ai.onnx"):
            continue
        if node.op_type in CONVERTIBLE_OPS:
            hint = "it is not HE-friendly; run `she convert` to replace it with a polynomial"
            if node.op_type in ("MaxPool", "GlobalMaxPool"):
                hint = "it is not HE-friendly; run `she convert` to replace it with average pooling"
            elif node.op_type == "BatchNormalization":
                hint = "run `she convert` to fold batch normalisation into the previous layer"
        else:
            hint = "this operator is not supported by SHE; rewrite the model without it"
        raise UnsupportedOperatorError(name, node.op_type, hint)


def from_proto(proto: onnx.ModelProto, name: str = "model") -> Model:
    """Validate an in-memory ONNX model and wrap it as a :class:`Model`."""
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{name}: not a valid ONNX model: {str(exc).splitlines()[0]}") from exc
    graph = proto.graph
    init_names = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ModelError(f"{name}: expected exactly one graph input, found {len(inputs)}")
    if len(graph.output) != 1:
        raise ModelError(f"{name}: expected exactly one graph output, found {len(graph.output)}")
    _check_ops(graph)
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) < 2:
        raise ModelError(f"{name}: input must have a batch axis and at least one feature axis")
    shape = []
    for d in dims[1:]:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            raise ModelError(
                f"{name}: input feature dimensions must be fixed, got {d.dim_param or '?'}; "
                "only the batch axis may be dynamic"
            )
        shape.append(int(d.dim_value))
    metadata = {p.key: p.value for p in proto.metadata_props}
    return Model(proto, inputs[0].name, tuple(shape), graph.output[0].name, metadata, name)


def load(path: str | Path) -> Model:
    """Read and validate an HE-friendly ONNX model from ``path``.

    Raises:
        ModelError: the file is missing, too large, corrupt, or not a valid model.
        UnsupportedOperatorError: a node cannot run encrypted (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise ModelError(f"{path}: larger than {MAX_MODEL_BYTES} bytes")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError, ...
        raise ModelError(f"{path}: not a readable ONNX file ({exc.__class__.__name__})") from exc
    return from_proto(proto, path.name.removesuffix(".onnx"))
