"""The default conversion: settings chosen against an accuracy-drop target, in a budget.

``she convert MODEL -o OUT --data DIR`` (no flags) runs :func:`search`:

1. A validation split is carved from the labelled training data (never the test split,
   which is only reported). The original model's validation accuracy is the reference.
2. The exact clean-up (:func:`converters.convert.prepare`) is done once.
3. Candidate settings are tried from the cheapest encrypted model to the most accurate
   (:func:`candidates`): degree-2 activations with two power-of-two terms per weight (the
   integer kernel multiplies by any small integer at the same cost, and two terms round
   about six times less than one); a polynomial max pool (when the model has max pools);
   degree-4 activations when
   the depth stays within :data:`MAX_DEPTH`; float weights. Each is converted and then
   fine-tuned on all the remaining training data (distillation plus cross-entropy) with
   early stopping on the validation split (:func:`converters.finetune.finetune`). The
   first whose validation accuracy is within ``max_drop`` points of the original's is
   taken at once; when the budget runs out first, the most accurate setting tried is.
4. Every setting tried is reported (validation accuracy before and after fine-tuning,
   depth, epochs, time) with the choice and the reason.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from she.errors import DataError, ModelError

from . import onnx_graph as g
from .convert import (
    ConversionReport,
    Settings,
    _check_data,
    _Stages,
    finish,
    he_friendly,
    prepare,
    square_depth,
)

#: Default accuracy-drop target (percentage points, on the validation split).
MAX_DROP = 0.5
#: Default time budget (seconds) for the whole search.
BUDGET = 540.0
#: Most multiplicative depth a candidate may add over the degree-2 model's.
MAX_DEPTH = 6
#: Validation split: this fraction of the training data, within the bounds below.
VAL_FRACTION = 0.1
VAL_MIN, VAL_MAX = 200, 5000
#: Samples the activation polynomials are fitted on.
FIT_SAMPLES = 5000
#: Most epochs of one fine-tuning run, and its learning rate.
MAX_EPOCHS = 30
LEARNING_RATE = 1e-3
BATCH_SIZE = 256


@dataclass
class Trial:
    """One setting the search tried."""

    settings: dict[str, Any]
    description: str
    depth: int
    val_accuracy_converted: float  # before fine-tuning
    val_accuracy: float  # after fine-tuning
    drop_points: float  # original minus val_accuracy, in points
    epochs: int
    stopped: str
    seconds: float


def candidates(proto: onnx.ModelProto) -> list[Settings]:
    """The settings to try on the cleaned model ``proto``, cheapest first."""
    has_max_pool = any(n.op_type == "MaxPool" for n in proto.graph.node)
    out = [Settings(pow2_terms=2)]
    if has_max_pool:
        out.append(Settings(pow2_terms=2, max_pool="polynomial"))
    activations = sum(n.op_type in ("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh")
                      for n in proto.graph.node)
    if activations and activations <= MAX_DEPTH:  # degree 4 doubles the activations' depth
        out.append(Settings(degree=4, pow2_terms=2))
    out.append(Settings(pow2=False))
    return out


def split(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                             np.ndarray, np.ndarray]:
    """``(train_x, train_y, val_x, val_y)``: a seeded random validation split."""
    n_val = int(min(VAL_MAX, max(VAL_MIN, VAL_FRACTION * len(x))))
    if len(x) < 2 * n_val:
        raise DataError(f"{len(x)} labelled training samples are too few to carve a "
                        f"validation split of {n_val}; give more data or use --fast")
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def search(model: Any, x: np.ndarray, y: np.ndarray, *, test_x: np.ndarray | None = None,
           test_y: np.ndarray | None = None, max_drop: float = MAX_DROP,
           budget: float = BUDGET, seed: int = 0, input_shape: tuple[int, ...] | None = None,
           input_range: tuple[float, float] | None = None,
           settings: list[Settings] | None = None, max_epochs: int = MAX_EPOCHS,
           progress: bool = True) -> tuple[onnx.ModelProto, ConversionReport]:
    """Convert ``model`` choosing the settings (see the module docstring).

    Args:
        x, y: labelled training data (inputs in the model's layout and scale).
        test_x, test_y: reported only (accuracy after every stage of the chosen setting).
        max_drop: target accuracy drop, in percentage points, on the validation split.
        budget: seconds; no new fine-tuning epoch or setting starts after it.
        seed: makes the split and the fine-tuning reproducible.
        settings: the settings to try instead of :func:`candidates`.
        max_epochs: most fine-tuning epochs per setting.
    """
    started = time.monotonic()
    deadline = started + budget
    y = np.asarray(y, np.int64)
    if len(y) != len(x):
        raise DataError(f"{len(y)} labels for {len(x)} training samples")
    proto, tail, report = prepare(model, x[:FIT_SAMPLES], input_shape=input_shape,
                                  eval_x=test_x, eval_y=test_y, progress=progress)
    shape = g.input_info(proto)[1]
    x = _check_data("training data", x, shape)
    train_x, train_y, val_x, val_y = split(x, y, seed)
    calibration = train_x[:FIT_SAMPLES]
    teacher = g.run(proto, train_x)[0]
    original = float(np.mean(g.run(proto, val_x)[0].argmax(1) == val_y))
    target = original - max_drop / 100
    _log(progress, f"validation split: {len(val_x)} samples, original accuracy {original:.2%}; "
                   f"target >= {target:.2%} (drop <= {max_drop} points), budget {budget:.0f} s, "
                   f"fine-tuning on {len(train_x)} samples")
    trials: list[Trial] = []
    tried: list[tuple[float, onnx.ModelProto, Settings, ConversionReport]] = []
    for k, setting in enumerate(settings or candidates(proto)):
        if k and time.monotonic() > deadline:
            _log(progress, "budget exhausted: no further settings tried")
            break
        t0 = time.monotonic()
        trial_proto = onnx.ModelProto()
        trial_proto.CopyFrom(proto)
        trial_report = ConversionReport()
        he_friendly(trial_proto, calibration, setting, trial_report)
        converted = float(np.mean(g.run(trial_proto, val_x)[0].argmax(1) == val_y))
        _log(progress, f"[{k + 1}] {setting.describe()}: {converted:.2%} before fine-tuning")
        from .finetune import finetune

        result = finetune(trial_proto, train_x, teacher, epochs=max_epochs, lr=LEARNING_RATE,
                          pow2_bits=setting.exponent_bits if setting.pow2 else None,
                          pow2_terms=setting.pow2_terms, labels=train_y, batch_size=BATCH_SIZE,
                          validation=(val_x, val_y), target=target, deadline=deadline,
                          progress=progress, seed=seed)
        accuracy = max(result.val_accuracy)
        trial = Trial(asdict(setting), setting.describe(), square_depth(trial_proto), converted,
                      accuracy, round(100 * (original - accuracy), 3), len(result.losses),
                      result.stopped, round(time.monotonic() - t0, 1))
        trials.append(trial)
        trial_report.finetune_losses = result.losses
        trial_report.finetune_val_accuracy = result.val_accuracy
        _log(progress, f"    fine-tuned {trial.epochs} epochs ({trial.stopped}): {accuracy:.2%}, "
                       f"drop {trial.drop_points:.2f} points, depth {trial.depth}, "
                       f"{trial.seconds:.0f} s")
        tried.append((accuracy, trial_proto, setting, trial_report))
        if accuracy >= target:
            break
    # The most accurate setting that compiles for encryption (the one that met the target, if
    # any, is the most accurate: the search stops there).
    tried.sort(key=lambda t: -t[0])
    refused: list[str] = []
    for entry in tried:
        try:
            finish(entry[1], tail, calibration, entry[2], report, input_range)
            break
        except ModelError as exc:
            refused.append(f"{entry[2].describe()}: {exc}")
            _log(progress, f"not encryptable, next best: {entry[2].describe()}: {exc}")
    else:
        raise ModelError("no setting tried gives a model that compiles for encryption: "
                         + "; ".join(refused))
    accuracy, chosen, setting, chosen_report = entry
    met = accuracy >= target
    index = next(i for i, t in enumerate(trials) if t.settings == asdict(setting))
    reason = (f"the first (cheapest) setting within {max_drop} points of the original on the "
              "validation split" if met else
              f"no setting reached the target within the budget; the most accurate of "
              f"{len(trials)} tried (drop {trials[index].drop_points:.2f} points)")
    if refused:
        reason += f" that compiles for encryption ({len(refused)} more accurate did not)"
    _log(progress, f"chosen: [{index + 1}] {setting.describe()} — {reason}")
    reference = None if test_x is None else g.run(proto, test_x)[0].argmax(1)
    _finish_report(report, chosen_report, chosen, (test_x, test_y, reference), setting)
    report.search = {"original_val_accuracy": original, "target_val_accuracy": target,
                     "max_drop_points": max_drop, "budget_s": budget, "seed": seed,
                     "validation_samples": len(val_x), "training_samples": len(train_x),
                     "trials": [asdict(t) for t in trials], "chosen": index,
                     "target_met": met, "reason": reason, "not_encryptable": refused,
                     "seconds": round(time.monotonic() - started, 1)}
    return chosen, report


def _finish_report(report: ConversionReport, trial: ConversionReport, chosen: onnx.ModelProto,
                   test: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None],
                   setting: Settings) -> None:
    """Copy the chosen trial's details into ``report`` and measure it on the test data
    (``test``: inputs, labels, the original model's predictions)."""
    for name in ("activations", "moved_pools", "replaced_pools", "pow2_layers", "degree",
                 "max_pool", "finetune_losses", "finetune_val_accuracy"):
        setattr(report, name, getattr(trial, name))
    _Stages(report, *test, False)(chosen, f"converted and fine-tuned ({setting.describe()})")


def _log(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)
