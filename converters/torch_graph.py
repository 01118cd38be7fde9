"""Run an ONNX graph as a trainable torch module (for distillation fine-tuning).

:class:`TorchGraph` executes the nodes of an (HE-friendly or converted) ONNX model with
torch operations. Floating-point initializers become parameters; with ``pow2_bits`` set,
the weights of Conv/Gemm/MatMul nodes are rounded to powers of two (``pow2_terms`` of them
per weight) in the forward pass
with a straight-through estimator (the gradient flows to the float weights). After
training, :meth:`TorchGraph.write_back` stores the (rounded) values in the ONNX model.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from converters import onnx_graph as g
from converters.passes import SCALE_PREFIX
from converters.squares import FIXED_PREFIX
from she.errors import ModelError

LINEAR_OPS = ("Conv", "Gemm", "MatMul")


def pow2_ste(w: torch.Tensor, axis: int, bits: int, terms: int = 1) -> torch.Tensor:
    """:func:`converters.passes.pow2_round` with a straight-through gradient."""
    levels = 2 ** bits - 1
    moved = w.movedim(axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    top = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    e_max = torch.round(torch.log2(top))
    e_min = e_max - (levels - 1)
    q = torch.zeros_like(flat)
    for _ in range(terms):
        r = flat - q
        mag = r.abs().clamp_min(1e-30)
        e = torch.minimum(torch.maximum(torch.round(torch.log2(mag)), e_min), e_max)
        q = q + torch.where(r.abs() < torch.pow(2.0, e_min - 1), torch.zeros_like(r),
                            torch.sign(r) * torch.pow(2.0, e))
    q = q.reshape(moved.shape).movedim(0, axis)
    return w + (q - w).detach()


class TorchGraph(nn.Module):
    """A torch module that evaluates an ONNX graph (supported operators only)."""

    def __init__(self, model: onnx.ModelProto, pow2_bits: int | None = None,
                 pow2_terms: int = 1) -> None:
        super().__init__()
        self.model = model
        self.pow2_bits = pow2_bits
        self.pow2_terms = pow2_terms
        self.nodes = list(model.graph.node)
        self.input_name, _ = g.input_info(model)
        self.output_name = model.graph.output[0].name
        self.params = nn.ParameterDict()
        self.consts: dict[str, torch.Tensor] = {}
        self._key: dict[str, str] = {}
        self.weight_axis: dict[str, int] = {}
        for node in self.nodes:
            if node.op_type in LINEAR_OPS and len(node.input) > 1:
                axis = _weight_axis(node)
                if axis is not None:
                    self.weight_axis[node.input[1]] = axis
        for i, init in enumerate(model.graph.initializer):
            arr = numpy_helper.to_array(init)
            if arr.dtype.kind == "f" and not init.name.startswith(FIXED_PREFIX):
                key = f"p{i}"
                self._key[init.name] = key
                self.params[key] = nn.Parameter(torch.from_numpy(arr.astype(np.float32)))
            else:  # integer tensors and structural constants (carries, normalisations)
                self.consts[init.name] = torch.from_numpy(arr.copy())

    def _value(self, name: str) -> torch.Tensor:
        if name in self._key:
            w = self.params[self._key[name]]
            if self.pow2_bits and name in self.weight_axis and w.ndim >= 2:
                return pow2_ste(w, self.weight_axis[name], self.pow2_bits, self.pow2_terms)
            if self.pow2_bits and name.startswith(SCALE_PREFIX):
                q = torch.sign(w) * torch.pow(2.0, torch.round(torch.log2(w.abs().clamp_min(1e-30))))
                return w + (q - w).detach()
            return w
        return self.consts[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for node in self.nodes:
            args = [env[n] if n in env else (self._value(n) if n else None) for n in node.input]
            outs = _run(node, args)
            for name, value in zip(node.output, outs, strict=False):
                env[name] = value
        return env[self.output_name]

    def write_back(self) -> None:
        """Store the trained values (power-of-two rounded where applicable) in the model."""
        with torch.no_grad():
            for name in self._key:
                g.set_array(self.model, name, self._value(name).detach().numpy().astype(np.float32))


def _weight_axis(node: onnx.NodeProto) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return 1 if node.op_type == "MatMul" else None


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _run(node: onnx.NodeProto, a: list) -> list[torch.Tensor]:
    op, at = node.op_type, _attrs(node)
    if op == "Add":
        return [a[0] + a[1]]
    if op == "Sub":
        return [a[0] - a[1]]
    if op == "Mul":
        return [a[0] * a[1]]
    if op == "Div":
        return [a[0] / a[1]]
    if op == "Neg":
        return [-a[0]]
    if op == "Pow":
        return [a[0] ** a[1]]
    if op in ("Identity", "Dropout", "Cast"):
        return [a[0]]
    if op == "Conv":
        pads = list(at.get("pads", [0, 0, 0, 0]))
        x = F.pad(a[0], (pads[1], pads[3], pads[0], pads[2]))
        return [F.conv2d(x, a[1], a[2] if len(a) > 2 else None, stride=at.get("strides", 1),
                         dilation=at.get("dilations", 1), groups=at.get("group", 1))]
    if op == "Gemm":
        x, w = a[0], a[1]
        if at.get("transA", 0):
            x = x.t()
        if at.get("transB", 0):
            w = w.t()
        y = at.get("alpha", 1.0) * (x @ w)
        return [y + at.get("beta", 1.0) * a[2] if len(a) > 2 and a[2] is not None else y]
    if op == "MatMul":
        return [a[0] @ a[1]]
    if op == "AveragePool":
        pads = list(at.get("pads", [0, 0, 0, 0]))
        x = F.pad(a[0], (pads[1], pads[3], pads[0], pads[2]))
        if any(pads) and not at.get("count_include_pad", 0):
            ones = F.pad(torch.ones_like(a[0][:1, :1]), (pads[1], pads[3], pads[0], pads[2]))
            k, s = at["kernel_shape"], at.get("strides", at["kernel_shape"])
            return [F.avg_pool2d(x, k, s) / F.avg_pool2d(ones, k, s)]
        return [F.avg_pool2d(x, at["kernel_shape"], at.get("strides", at["kernel_shape"]))]
    if op == "GlobalAveragePool":
        return [a[0].mean(dim=tuple(range(2, a[0].ndim)), keepdim=True)]
    if op in ("ReduceMean", "ReduceSum"):  # axes: an attribute (opset < 18) or an input
        axes = at.get("axes") or (a[1].tolist() if len(a) > 1 and a[1] is not None else None)
        dims = tuple(range(a[0].ndim)) if not axes else tuple(int(v) for v in axes)
        reduce = torch.mean if op == "ReduceMean" else torch.sum
        return [reduce(a[0], dim=dims, keepdim=bool(at.get("keepdims", 1)))]
    if op == "Flatten":
        return [torch.flatten(a[0], int(at.get("axis", 1)))]
    if op == "Reshape":
        shape = [int(v) for v in a[1]]
        shape = [a[0].shape[i] if v == 0 else v for i, v in enumerate(shape)]
        return [a[0].reshape(shape)]
    if op == "Shape":
        return [torch.tensor(a[0].shape, dtype=torch.int64)]
    if op == "Gather":
        return [torch.index_select(a[0], int(at.get("axis", 0)), a[1].reshape(-1))
                .reshape(a[1].shape if a[1].ndim else ())]
    if op == "Unsqueeze":
        out = a[0]
        for axis in sorted(int(v) for v in (at.get("axes") or a[1].tolist())):
            out = out.unsqueeze(axis)
        return [out]
    if op == "Squeeze":
        axes = at.get("axes") or (a[1].tolist() if len(a) > 1 and a[1] is not None else None)
        return [a[0].squeeze() if axes is None else a[0].squeeze(tuple(int(v) for v in axes))]
    if op == "Concat":
        return [torch.cat([t.reshape(-1) if t.ndim == 0 else t for t in a], dim=int(at["axis"]))]
    if op == "Slice":
        axes = range(len(a[1])) if len(a) < 4 or a[3] is None else a[3].tolist()
        steps = [1] * len(a[1]) if len(a) < 5 or a[4] is None else a[4].tolist()
        index = [slice(None)] * a[0].ndim
        for start, end, axis, step in zip(a[1].tolist(), a[2].tolist(), axes, steps,
                                          strict=True):
            index[int(axis) % a[0].ndim] = slice(int(start), int(end), int(step))
        return [a[0][tuple(index)]]
    if op == "Transpose":
        return [a[0].permute(*at["perm"])]
    if op == "Constant":
        return [torch.from_numpy(numpy_helper.to_array(at["value"]).copy())]
    if op == "Pad":
        pads = [int(v) for v in a[1]]
        n = len(pads) // 2
        torch_pads = []
        for i in reversed(range(n)):
            torch_pads += [pads[i], pads[i + n]]
        value = float(a[2]) if len(a) > 2 and a[2] is not None else 0.0
        return [F.pad(a[0], torch_pads, value=value)]
    raise ModelError(f"node '{node.name}' ({op}) cannot be fine-tuned")
