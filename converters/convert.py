"""Turning a trained network into an HE-friendly SHE model, with a report.

Stages (each a pass of :mod:`converters.passes`, measured on the evaluation data)::

    original -> tail split off (Softmax, label outputs: re-applied by the client)
             -> cleaned (identity/dropout removal, shape, constant, batch-norm and layout
                folding)
             -> HE-friendly pooling -> polynomial activations -> power-of-two weights
             -> fine-tuned

:func:`prepare` does the exact first steps once; :func:`convert` does one conversion with
given settings; :mod:`converters.search` chooses the settings.

The result passes ``onnx.checker``, runs in onnxruntime, and ``she.compile`` accepts it.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import she
from converters import onnx_graph as g
from converters import passes
from converters.tail import split_tail
from she.errors import DataError, ModelError, ParameterError, SheError
from she.frontend.tail import METADATA_KEY, encode

#: Calibration inputs the activations and pools are fitted on (fine-tuning uses them all):
#: plenty for every channel's polynomial, where the activation values of a wide model on
#: 60 000 inputs would take tens of GiB.
FIT_SAMPLES = 5000


@dataclass
class Stage:
    name: str
    accuracy: float | None
    agreement: float | None  # argmax agreement with the original model


@dataclass
class ConversionReport:
    """What the conversion did and what it cost."""

    stages: list[Stage] = field(default_factory=list)
    activations: list[dict[str, Any]] = field(default_factory=list)
    removed_identities: int = 0
    folded_constants: int = 0
    folded_batchnorms: int = 0
    moved_pools: int = 0  # max pools moved ahead of their activation (exact)
    replaced_pools: int = 0
    pow2_layers: int = 0
    degree: int = 2
    max_pool: str = "average"
    #: what each activation degree would cost: depth, fit error, accuracy (before pow2)
    degree_options: list[dict[str, Any]] = field(default_factory=list)
    depth: int | None = None
    parameters: dict[str, Any] | None = None
    eval_samples: int = 0
    finetune_losses: list[float] = field(default_factory=list)
    #: fine-tuning's validation accuracy before the first epoch and after every epoch
    finetune_val_accuracy: list[float] = field(default_factory=list)
    folded_shapes: int = 0
    folded_layouts: int = 0
    #: names of the original outputs the client recomputes from the decrypted logits
    tail_outputs: list[str] = field(default_factory=list)
    #: the default command's search (see :mod:`converters.search`); None with fixed settings
    search: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def torch_to_onnx(module: Any, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Export a torch module to ONNX (opset 17, dynamic batch axis)."""
    import torch

    module = module.eval()
    buffer = io.BytesIO()
    dummy = torch.zeros((1, *input_shape))
    torch.onnx.export(module, (dummy,), buffer, input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def _import(model: Any, input_shape: tuple[int, ...] | None) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    elif isinstance(model, str | Path):
        proto = g.load_onnx(model)
    elif hasattr(model, "forward") and hasattr(model, "eval"):
        if input_shape is None:
            raise ModelError("converting a torch module needs input_shape (one sample's shape)")
        proto = torch_to_onnx(model, input_shape)
    else:
        raise ModelError(f"cannot convert an object of type {type(model).__name__}; give an "
                         "ONNX file, an onnx.ModelProto or a torch.nn.Module")
    g.check_opset(proto)
    g.input_info(proto)
    return proto


def _check_data(name: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise DataError(f"{name} must be numeric, got dtype {x.dtype}")
    if x.ndim != len(shape) + 1 or x.shape[1:] != shape:
        raise DataError(f"{name} must have shape (n, {', '.join(map(str, shape))}), "
                        f"got {x.shape}")
    if len(x) == 0:
        raise DataError(f"{name} is empty")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{name} contains NaN or infinity")
    return x.astype(np.float32)


@dataclass(frozen=True)
class Settings:
    """The choices a conversion makes (see :func:`convert` for their meaning)."""

    degree: int = 2
    max_pool: str = "average"
    pool_first: bool = False
    pow2: bool = True
    exponent_bits: int = 4
    pow2_terms: int = 1
    #: activations (node names) fitted with degree 4 whatever ``degree`` is
    degree4_at: tuple[str, ...] = ()

    def describe(self) -> str:
        weights = (f"pow2 {self.pow2_terms} term{'s' if self.pow2_terms > 1 else ''}, "
                   f"{self.exponent_bits} exponent bits" if self.pow2 else "float weights")
        degree = (f"degree {self.degree}" if not self.degree4_at else
                  f"degree {self.degree} (4 at {', '.join(self.degree4_at)})")
        return (f"{degree}, max pool as {self.max_pool}"
                f"{', pool first' if self.pool_first else ''}, {weights}")


class _Stages:
    """Accuracy (and agreement with the original) after every stage, on evaluation data."""

    def __init__(self, report: ConversionReport, eval_x: np.ndarray | None,
                 eval_y: np.ndarray | None, reference: np.ndarray | None, progress: bool) -> None:
        self.report, self.x, self.y, self.reference = report, eval_x, eval_y, reference
        self.progress = progress

    def __call__(self, proto: onnx.ModelProto, name: str) -> None:
        if self.x is None:
            self.report.stages.append(Stage(name, None, None))
            return
        pred = g.run(proto, self.x)[0].argmax(1)
        acc = None if self.y is None else float(np.mean(pred == self.y))
        agree = None if self.reference is None else float(np.mean(pred == self.reference))
        self.report.stages.append(Stage(name, acc, agree))
        if self.progress:
            print(f"  {name}: accuracy {acc if acc is None else f'{acc:.2%}'}", file=sys.stderr,
                  flush=True)


def prepare(model: Any, sample: np.ndarray, *, input_shape: tuple[int, ...] | None = None,
            eval_x: np.ndarray | None = None, eval_y: np.ndarray | None = None,
            progress: bool = False) -> tuple[onnx.ModelProto, onnx.ModelProto | None,
                                             ConversionReport]:
    """The exact first steps: import ``model``, split off its tail (:mod:`converters.tail`),
    remove identities and fold shapes, constants, batch norms and layout transposes.

    ``sample`` (inputs) checks the tail and gives shapes. Returns the cleaned model, the tail
    (or None) and a report with the "original" and "cleaned" stages measured on the
    evaluation data.
    """
    proto = _import(model, input_shape)
    _, shape = g.input_info(proto)
    sample = _check_data("calibration data", sample, shape)
    if eval_x is not None:
        eval_x = _check_data("evaluation data", eval_x, shape)
    tail = split_tail(proto, sample[:256])
    g.check_importable(proto)
    reference = None if eval_x is None else g.run(proto, eval_x)[0].argmax(1)
    report = ConversionReport(eval_samples=0 if eval_x is None else len(eval_x),
                              tail_outputs=[] if tail is None else
                              [o.name for o in tail.graph.output])
    stage = _Stages(report, eval_x, eval_y, reference, progress)
    stage(proto, "original")
    report.removed_identities = passes.remove_identities(proto)
    report.folded_shapes = passes.fold_shapes(proto)
    report.folded_constants = passes.fold_constants(proto)
    report.folded_batchnorms = passes.fold_batchnorm(proto)
    report.folded_layouts = passes.fold_layout(proto, sample)
    stage(proto, "cleaned (batch norm folded)")
    return proto, tail, report


def he_friendly(proto: onnx.ModelProto, calibration: np.ndarray, settings: Settings,
                report: ConversionReport, stage=None) -> None:
    """Pooling, activations and power-of-two weights (in place), recorded in ``report``."""
    stage = stage or (lambda proto, name: None)
    report.degree, report.max_pool = settings.degree, settings.max_pool
    if settings.pool_first:
        report.moved_pools = passes.pool_before_activation(proto)
    report.replaced_pools = passes.replace_pooling(proto, settings.max_pool, calibration)
    if report.replaced_pools:
        stage(proto, f"{settings.max_pool} pooling")
    fitted = passes.replace_activations(proto, calibration, settings.degree,
                                        degrees={name: 4 for name in settings.degree4_at})
    report.activations = [asdict(f) for f in fitted]
    stage(proto, f"degree-{settings.degree} polynomial activations")
    if settings.pow2:
        report.pow2_layers = passes.quantise_pow2(proto, settings.exponent_bits,
                                                  settings.pow2_terms)
        terms = "" if settings.pow2_terms == 1 else f", {settings.pow2_terms} terms"
        stage(proto, f"power-of-two weights ({settings.exponent_bits} exponent bits{terms})")


def finish(proto: onnx.ModelProto, tail: onnx.ModelProto | None, calibration: np.ndarray,
           settings: Settings, report: ConversionReport,
           input_range: tuple[float, float] | None = None) -> she.Plan:
    """Write the metadata (input range, tail), check the model and compile it once (batch
    packing) to record its depth and encryption parameters in ``report``; returns the plan."""
    lo, hi = input_range or (float(calibration.min()), float(calibration.max()))
    entries = {"she.input_range": f"{lo},{hi}", "she.converted": "1",
               "she.weights": "pow2" if settings.pow2 else "float"}
    if tail is not None:
        entries[METADATA_KEY] = encode(tail)
    _set_metadata(proto, entries)
    onnx.checker.check_model(proto)
    try:
        he_model = she.frontend.model.from_proto(proto, "converted")
        plan = she.compile(he_model, calibration=calibration[:2000])
    except SheError as exc:
        raise ModelError(f"the converted model does not compile for encryption: {exc}") from exc
    report.depth = plan.depth
    report.parameters = {"poly_modulus_degree": plan.params.poly_modulus_degree,
                         "modulus_bits": list(plan.params.modulus_bits),
                         "security_bits": plan.params.security,
                         "predicted_max_output_error": plan.predicted_error}
    return plan


def convert(model: Any, calibration: np.ndarray, *, eval_x: np.ndarray | None = None,
            eval_y: np.ndarray | None = None, degree: int = 2, pow2: bool = True,
            exponent_bits: int = 4, pow2_terms: int = 1, input_shape: tuple[int, ...] | None = None,
            input_range: tuple[float, float] | None = None, finetune_epochs: int = 0,
            calibration_labels: np.ndarray | None = None,
            finetune_lr: float = 1e-3, pool_first: bool = False, max_pool: str = "average",
            distillation: str = "kl", progress: bool = False) -> tuple[onnx.ModelProto, ConversionReport]:
    """Convert ``model`` (ONNX path/proto or torch module) into an HE-friendly model with
    fixed settings, in one pass (``she convert --fast``; :func:`converters.search.search`
    chooses the settings itself).

    Args:
        calibration: sample inputs; activation polynomials are fitted to the values the
            first :data:`FIT_SAMPLES` produce, and the compiled parameters derived from
            them; fine-tuning trains on all of them.
        eval_x, eval_y: optional evaluation data for the accuracy report.
        degree: activation polynomial degree: 2 (one multiplicative level per activation),
            3 or 4 (two levels, four times the squares). The report's ``degree_options``
            lists the depth, fit error and accuracy of every degree.
        pow2: quantise weights to powers of two.
        exponent_bits: exponent bits per power-of-two weight (``2^bits - 1`` exponents).
        pow2_terms: powers of two per weight (1: one shift; 2 or 3: a short sum of shifts,
            much less rounding).
        input_shape: one sample's shape, needed for torch modules.
        input_range: declared input range written to the model metadata (default: the
            calibration data's min and max).
        finetune_epochs: epochs of distillation fine-tuning (needs torch); 0 to skip. From
            2000 calibration samples up, a tenth is held out and the epoch that scores best
            on it (accuracy, or agreement with the original without labels) is kept.
        calibration_labels: true classes of the calibration samples; fine-tuning then adds
            a cross-entropy term to the distillation loss.
        finetune_lr: its learning rate.
        distillation: its loss, ``"kl"`` or ``"mse"``
            (:func:`converters.finetune.distillation_loss`).
        pool_first: move each MaxPool ahead of the activation before it (exact), so that
            the activations become squares of 4x smaller maps: far cheaper encrypted, but
            the later MaxPool -> AveragePool step then changes the activations' inputs more
            (measured on the two-conv MNIST CNN: 99.15 % instead of 99.45 % after
            fine-tuning), so it is off by default.
        max_pool: ``"average"`` (MaxPool -> AveragePool, no depth) or ``"polynomial"`` (a
            fitted polynomial maximum, two levels for a 2x2 window).
    """
    if degree not in passes.DEGREES:
        raise ParameterError(f"degree {degree} is not supported: choose one of {passes.DEGREES}")
    proto, tail, report = prepare(model, calibration[:FIT_SAMPLES], input_shape=input_shape,
                                  eval_x=eval_x, eval_y=eval_y, progress=progress)
    calibration = _check_data("calibration data", calibration, g.input_info(proto)[1])
    fit = calibration[:FIT_SAMPLES]
    if calibration_labels is not None and len(calibration_labels) != len(calibration):
        raise DataError(f"{len(calibration_labels)} calibration labels for "
                        f"{len(calibration)} calibration samples")
    if eval_x is not None:
        eval_x = _check_data("evaluation data", eval_x, g.input_info(proto)[1])
    settings = Settings(degree, max_pool, pool_first, pow2, exponent_bits, pow2_terms)
    reference = None if eval_x is None else g.run(proto, eval_x)[0].argmax(1)
    stage = _Stages(report, eval_x, eval_y, reference, progress)
    teacher = g.run(proto, calibration)[0] if finetune_epochs else None
    pooled = onnx.ModelProto()  # what every activation degree would give
    pooled.CopyFrom(proto)
    if pool_first:
        passes.pool_before_activation(pooled)
    passes.replace_pooling(pooled, max_pool, fit)
    report.degree_options = _degree_options(pooled, fit, eval_x, eval_y, progress)
    he_friendly(proto, fit, settings, report, stage)
    if finetune_epochs:
        from converters.finetune import finetune

        # a tenth held out (from 2000 samples up): the best epoch on it is kept, scored
        # against the labels, or the original's predictions without them
        held = len(calibration) // 10 if len(calibration) >= 2000 else 0
        validation = None if not held else (calibration[:held], teacher[:held].argmax(1)
                                            if calibration_labels is None
                                            else calibration_labels[:held])
        result = finetune(proto, calibration[held:], teacher[held:], epochs=finetune_epochs,
                          lr=finetune_lr, pow2_bits=exponent_bits if pow2 else None,
                          pow2_terms=pow2_terms, validation=validation, patience=None,
                          labels=None if calibration_labels is None else
                          calibration_labels[held:], distillation=distillation,
                          progress=progress)
        report.finetune_losses = result.losses
        report.finetune_val_accuracy = result.val_accuracy
        stage(proto, f"fine-tuned ({finetune_epochs} epochs)")
    finish(proto, tail, calibration, settings, report, input_range)
    return proto, report


def square_depth(proto: onnx.ModelProto) -> int:
    """Multiplicative depth of a polynomial graph: the most squares on any path."""
    depth = {name: 0 for name in g.initializers(proto)}
    for node in proto.graph.node:
        d = max((depth.get(name, 0) for name in node.input if name), default=0)
        squares = (node.op_type == "Mul" and node.input[0] == node.input[1]) or \
            node.op_type == "Pow"
        for name in node.output:
            depth[name] = d + squares
    return max((depth.get(o.name, 0) for o in proto.graph.output), default=0)


def _degree_options(proto: onnx.ModelProto, calibration: np.ndarray, eval_x: np.ndarray | None,
                    eval_y: np.ndarray | None, progress: bool) -> list[dict[str, Any]]:
    """Depth, fit error and accuracy of the model with activations of every degree."""
    options = []
    for degree in passes.DEGREES:
        trial = onnx.ModelProto()
        trial.CopyFrom(proto)
        fitted = passes.replace_activations(trial, calibration, degree)
        accuracy = None
        if eval_x is not None and eval_y is not None:
            accuracy = float(np.mean(g.run(trial, eval_x)[0].argmax(1) == eval_y))
        options.append({"degree": degree, "depth": square_depth(trial),
                        "fit_rmse": float(np.mean([f.rmse for f in fitted])) if fitted else 0.0,
                        "accuracy": accuracy})
        if progress:
            acc = "" if accuracy is None else f", accuracy {accuracy:.2%}"
            print(f"  degree {degree}: depth {options[-1]['depth']}, "
                  f"fit rmse {options[-1]['fit_rmse']:.4f}{acc}", file=sys.stderr, flush=True)
    return options


def _set_metadata(proto: onnx.ModelProto, entries: dict[str, str]) -> None:
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)


def save_atomically(proto: onnx.ModelProto, path: str | Path) -> None:
    """Write ``proto`` to ``path`` without ever leaving a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".she-", suffix=".onnx", dir=path.parent or ".")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a model is an ordinary file
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
