"""A model's plaintext tail: the argmax-preserving operators run after decryption.

``she convert`` moves a classifier's final Softmax / LogSoftmax and its label output
(ArgMax -> ArrayFeatureExtractor -> Reshape/Cast, ZipMap) out of the encrypted part: the
server returns the logits, and the client re-applies the tail, so it gets the outputs the
original model gives (probabilities and labels). The tail is a small ONNX model (input: the
logits, outputs: the original outputs) stored base64-encoded in the HE-friendly model's
``metadata_props`` under :data:`METADATA_KEY`, and published in the model spec as ``tail``.

A spec may come from a server, so :class:`Tail` accepts only a small graph of the
operators in :data:`TAIL_OPS` before running it with onnxruntime.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import onnx

from ..errors import ModelError

#: Metadata key of the tail in an HE-friendly model (and key in the model spec).
METADATA_KEY = "she.frontend.tail"
#: Operators a tail may contain.
TAIL_OPS = frozenset({"Softmax", "LogSoftmax", "ArgMax", "ZipMap", "ArrayFeatureExtractor",
                      "Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                      "Constant"})
#: Largest accepted encoded tail (characters).
MAX_TAIL_CHARS = 256 * 1024


def encode(tail: onnx.ModelProto) -> str:
    """The tail as metadata text (base64 of the serialised ONNX model)."""
    return base64.b64encode(tail.SerializeToString()).decode("ascii")


class Tail:
    """A validated tail, ready to run on decrypted logits."""

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or len(text) > MAX_TAIL_CHARS:
            raise ModelError(f"model tail must be a base64 string of at most {MAX_TAIL_CHARS} "
                             "characters")
        try:
            proto = onnx.load_from_string(base64.b64decode(text.encode("ascii"), validate=True))
            onnx.checker.check_model(proto)
        except (binascii.Error, ValueError, onnx.checker.ValidationError, Exception) as exc:
            raise ModelError(f"model tail is not a valid ONNX graph ({exc.__class__.__name__})") \
                from exc
        bad = [n.op_type for n in proto.graph.node if n.op_type not in TAIL_OPS]
        if bad or len(proto.graph.input) != 1:
            raise ModelError(f"model tail may only use {', '.join(sorted(TAIL_OPS))} on one "
                             f"input; found {bad or len(proto.graph.input)}")
        self.proto = proto
        self.output_names = [o.name for o in proto.graph.output]
        # ZipMap turns the probabilities into a list of dicts: its input is kept as well
        self._extra = [n.input[0] for n in proto.graph.node if n.op_type == "ZipMap"]
        self._session: Any = None

    def evaluate(self, logits: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """The original model's outputs, by name, from ``logits`` of shape (batch,
        classes), and its float output shaped like the logits (the probabilities; the
        logits themselves when the tail computes none)."""
        if self._session is None:
            import onnxruntime as ort

            probe = onnx.ModelProto()
            probe.CopyFrom(self.proto)
            for name in self._extra:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(
                    name, onnx.TensorProto.FLOAT, None))
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(probe.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        logits = np.asarray(logits, np.float32)
        values = self._session.run(None, {self.proto.graph.input[0].name: logits})
        outputs = dict(zip(self.output_names, values, strict=False))
        main = next((v for v in values if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                     and v.shape == logits.shape), logits)
        return outputs, np.asarray(main, np.float64)

    def run(self, logits: np.ndarray) -> dict[str, Any]:
        """The original model's outputs, by name (see :meth:`evaluate`)."""
        return self.evaluate(logits)[0]


def from_spec(spec: dict[str, Any]) -> Tail | None:
    """The tail a model spec publishes, validated (``None`` if it has none)."""
    text = spec.get("tail")
    return None if text is None else Tail(text)
