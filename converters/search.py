"""The default conversion: settings chosen against an accuracy-drop target, in a budget.

``she convert MODEL -o OUT --data DIR`` (no flags) runs :func:`search`:

1. A validation split is carved from the labelled training data (never the test split,
   which is only reported). The original model's validation accuracy is the reference.
2. The exact clean-up (:func:`converters.convert.prepare`) is done once.
3. Candidate settings (:func:`candidates`): degree-2 activations; a polynomial max pool
   (when the model has max pools); degree 4 only at the activations whose degree-2 fit is
   worst (residual networks: the one after the last addition); degree-4 activations when
   the depth stays within :data:`MAX_DEPTH` — each with two power-of-two terms per weight
   (the shift-accumulate model), and each also with float weights, a fallback fine-tuned
   only after every power-of-two setting (its fixed-point plan can be the cheaper one,
   and a model that no power-of-two setting converts within the target still converts).
4. Every setting is converted and its default plan (CKKS, batch packing: what ``she serve``
   and ``she predict`` run) compiled *before* any fine-tuning: its accuracy before
   fine-tuning, depth and predicted cost (:mod:`she.plan.estimate`: server memory, and an
   encrypted latency that is a model, not a measurement) are known up front. A plan the
   server would refuse on this machine (:func:`she.plan.estimate.batch_memory_problem`) is
   *not runnable* (yet: the ring, hence the memory, depends on the value ranges, which
   fine-tuning changes), and the same setting with every max pool moved ahead of its
   activation (:func:`pooled_first`; the activations then act on 4x fewer values) is
   added. :func:`order` then ranks them, power-of-two weights first and float weights
   after, within each: the settings no other beats on predicted latency,
   memory and accuracy before fine-tuning, cheapest first; then the beaten ones; then those
   the compiler refuses or that do not fit before fine-tuning (either may change after
   it); last the too big ones that have a pooled-first variant (with explicit
   ``settings``: no setting that does not fit is fine-tuned).
5. Settings are fine-tuned in that order on all the remaining training data (distillation
   plus cross-entropy) with early stopping on the validation split
   (:func:`converters.finetune.finetune`). The first runnable one whose validation accuracy
   is within ``max_drop`` points of the original's is taken (and fine-tuned on while its
   validation accuracy improves and the budget lasts, :func:`_polish`); when the budget runs
   out first, the most accurate runnable setting (fine-tuned or not) is (falling back to
   the next when the compiler refuses one).
6. Every setting tried is reported (validation accuracy before and after fine-tuning,
   depth, epochs, predicted latency and memory, whether it runs, time) with the choice and
   the reason; the chosen setting's single-packing plan is compiled too and its predicted
   latency reported.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import onnx
import scipy.sparse as sp

import she
from converters import onnx_graph as g
from converters import passes
from converters.convert import (
    FIT_SAMPLES,
    ConversionReport,
    Settings,
    _check_data,
    _Stages,
    finish,
    he_friendly,
    prepare,
    square_depth,
)
from she.errors import DataError, ModelError, SheError
from she.frontend.lowering import Chain, lower
from she.plan.estimate import LATENCY_MODEL, Estimate, estimate, physical_memory

#: Default accuracy-drop target (percentage points, on the validation split).
MAX_DROP = 0.5
#: Default time budget (seconds) for the whole search.
BUDGET = 540.0
#: Settings are converted and compiled (previewed) until this share of the budget is spent;
#: the rest are not tried (they come last in :func:`candidates`' order: the costliest).
PREVIEW_SHARE = 0.5
#: Peak memory of lowering and compiling a batch plan per weight of its lowered model
#: (measured: 6.5 GiB for a wide degree-4 model of 70.5 M weights; 22 GiB before the
#: compiler kept only the quantisations its ladder still reads).
COMPILE_BYTES_PER_WEIGHT = 100
#: Most multiplicative depth a candidate may add over the degree-2 model's.
MAX_DEPTH = 6
#: Degree 4 goes to the activations whose degree-2 fit error is within this factor of the
#: worst one's (:func:`worst_fitted`).
WORST_FIT_RATIO = 2.0
#: Validation split: this fraction of the training data, within the bounds below.
VAL_FRACTION = 0.1
VAL_MIN, VAL_MAX = 200, 5000
#: Most epochs of one fine-tuning run, and its learning rate.
MAX_EPOCHS = 30
LEARNING_RATE = 1e-3
BATCH_SIZE = 256
#: Calibration samples the plans are compiled with to predict their cost.
COST_SAMPLES = 500


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
    #: predicted cost of the default (batch-packing) plan, :meth:`she.plan.estimate.Estimate.as_dict`
    #: (latency a model, not a measurement); None when the setting did not compile
    batch: dict[str, Any] | None = None
    #: the same for single packing (compiled for the chosen setting only: it is slow)
    single: dict[str, Any] | None = None
    #: the server accepts the batch plan on this machine (None: it did not compile)
    runs: bool | None = None
    #: why the setting cannot be used, when it cannot
    problem: str | None = None


def candidates(proto: onnx.ModelProto, calibration: np.ndarray | None = None) -> list[Settings]:
    """The settings to try on the cleaned model ``proto``, cheapest first as far as is known
    before compiling them (:func:`search` reorders them by their compiled cost).

    Every shape of polynomial model is tried with power-of-two weights (two terms) and with
    float weights (the compiler stores them in fixed point: on a deep model its plan can be
    the cheaper one), the latter a fallback fine-tuned after every power-of-two setting
    (:func:`order`). The shapes: degree-2 activations; a polynomial max
    pool (when the model has max pools); degree 4 only at the activations whose degree-2
    fit is worst (:func:`worst_fitted`, with ``calibration``, when they are not all of
    them: one level more per such activation, where degree 4 everywhere doubles the depth);
    degree-4 activations when the depth stays within :data:`MAX_DEPTH`.
    """
    has_max_pool = any(n.op_type == "MaxPool" for n in proto.graph.node)
    activations = sum(n.op_type in passes.ACTIVATIONS for n in proto.graph.node)
    shapes: list[dict[str, Any]] = [{}]
    if has_max_pool:
        shapes.append({"max_pool": "polynomial"})
    worst = worst_fitted(proto, calibration) if calibration is not None and activations > 1 \
        else ()
    if 0 < len(worst) < activations:  # all of them: the degree-4 setting below
        shapes.append({"degree4_at": worst})
    if activations and activations <= MAX_DEPTH:  # degree 4 doubles the activations' depth
        shapes.append({"degree": 4})
    return [Settings(**shape, **weights) for shape in shapes
            for weights in ({"pow2_terms": 2}, {"pow2": False})]


def search_settings(**fixed: Any) -> Settings:
    """The one setting ``she convert --degree 4`` (and the like) searches: the choices
    ``fixed``, the others as :func:`candidates` makes them (two power-of-two terms per
    weight, unless ``pow2=False``)."""
    return Settings(**{**({} if fixed.get("pow2") is False else {"pow2_terms": 2}), **fixed})


def worst_fitted(proto: onnx.ModelProto, calibration: np.ndarray) -> tuple[str, ...]:
    """The activations (node names, in graph order) whose degree-2 fit errs most: those
    within a factor :data:`WORST_FIT_RATIO` of the largest root-mean-square error (on a
    residual network, typically the last, after an addition, whose inputs span the widest
    range)."""
    trial = onnx.ModelProto()
    trial.CopyFrom(proto)
    passes.replace_pooling(trial, "average")
    fitted = passes.replace_activations(trial, calibration[:FIT_SAMPLES], 2)
    worst = max(f.rmse for f in fitted)
    return tuple(f.node for f in fitted if f.rmse >= worst / WORST_FIT_RATIO)


def order(previews: list[Trial], superseded: Collection[int] = ()) -> list[int]:
    """The order in which to fine-tune settings, from what is known before fine-tuning
    (indices into ``previews``).

    Power-of-two weights first (the shift-accumulate model SHE converts to), float weights
    only after every power-of-two setting (a fallback when none reaches the target). Within
    each: first the settings whose plan runs and that no other runnable setting beats on
    predicted latency, memory and accuracy before fine-tuning (the Pareto front), cheapest
    first; then the beaten runnable ones; then, in the order given, the uncertain ones:
    those the compiler refuses before fine-tuning (fine-tuning widens the output margins
    its argmax check compares with the predicted error) and those whose plan does not fit
    memory (a plan's ring, hence its memory, depends on the value ranges, which fine-tuning
    changes: measured on a Fashion-MNIST ResNet, N=32768 before and N=16384 after); last
    the ``superseded`` ones: plans that do not fit memory and have a variant that acts on
    fewer values (:func:`pooled_first`) among the others.
    """
    def key(t: Trial) -> tuple[float, float, float]:  # smaller is better in each
        return (t.batch["seconds_per_image"], t.batch["memory_bytes"],
                -t.val_accuracy_converted)

    def rank(group: list[int]) -> list[int]:
        runnable = [i for i in group if previews[i].runs]
        keys = {i: key(previews[i]) for i in runnable}
        dominated = {i for i in runnable for j in runnable if keys[j] != keys[i]
                     and all(a <= b for a, b in zip(keys[j], keys[i], strict=True))}
        front = sorted((i for i in runnable if i not in dominated), key=lambda i: (keys[i], i))
        uncertain = [i for i in group if not previews[i].runs and i not in superseded]
        return (front + [i for i in runnable if i in dominated] + uncertain
                + sorted(i for i in group if i in superseded))

    pow2 = [i for i, t in enumerate(previews) if t.settings.get("pow2", True)]
    return rank(pow2) + rank([i for i in range(len(previews)) if i not in pow2])


def pooled_first(proto: onnx.ModelProto, setting: Settings) -> Settings | None:
    """``setting`` with every max pool moved ahead of the activation before it, when that
    moves any (None otherwise): the activations then act on 4x fewer values (a 2x2 pool),
    which is what makes a setting whose plan does not fit memory fit."""
    if setting.pool_first:
        return None
    trial = onnx.ModelProto()
    trial.CopyFrom(proto)
    return replace(setting, pool_first=True) if passes.pool_before_activation(trial) else None


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


def predicted_cost(proto: onnx.ModelProto, calibration: np.ndarray,
                   packing: str = "batch", chain: Chain | None = None) -> Estimate:
    """Compile ``proto`` (or its lowered ``chain``) as the server would (CKKS, ``packing``)
    and predict its cost (:func:`she.plan.estimate.estimate`); :class:`~she.errors.SheError`
    when it does not compile."""
    model = chain if chain is not None else she.frontend.model.from_proto(proto, "converted")
    return estimate(she.compile(model, calibration=calibration[:COST_SAMPLES], packing=packing))


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
    # every setting converted and compiled first: what is known before fine-tuning orders
    # them (:func:`order`); one whose plan does not fit memory is also tried with its max
    # pools moved ahead of their activations
    tried: list[tuple[Trial, onnx.ModelProto, Settings, ConversionReport]] = []
    queue = list(settings or candidates(proto, calibration))
    superseded: set[int] = set()
    skipped: list[str] = []
    k = 0
    clock = _PreviewClock(started + PREVIEW_SHARE * budget)
    while k < len(queue):
        setting = queue[k]
        k += 1
        entry = _preview(proto, setting, calibration, (val_x, val_y), original, len(tried),
                         clock if tried else None, progress)
        if entry is None:
            skipped.append(setting.describe())
            continue
        tried.append(entry)
        if tried[-1][0].runs is False:
            fallback = pooled_first(proto, setting)
            if fallback is not None:
                superseded.add(len(tried) - 1)
                if fallback not in queue:
                    _log(progress, "    next: the same with every max pool moved ahead of "
                                   "its activation (4x fewer values to activate)")
                    queue.insert(k, fallback)
    trials = [entry[0] for entry in tried]
    sequence = (order(trials, superseded) if settings is None else
                [i for i, t in enumerate(trials) if t.runs is not False])
    _log(progress, "fine-tuning order: " + " ".join(f"[{i + 1}]" for i in sequence))
    from converters.finetune import finetune

    for n, i in enumerate(sequence):
        if n and time.monotonic() > deadline:
            _log(progress, "budget exhausted: no further settings fine-tuned")
            break
        trial, trial_proto, setting, trial_report = tried[i]
        t0 = time.monotonic()
        result = finetune(trial_proto, train_x, teacher, epochs=max_epochs, lr=LEARNING_RATE,
                          pow2_bits=setting.exponent_bits if setting.pow2 else None,
                          pow2_terms=setting.pow2_terms, labels=train_y,
                          batch_size=BATCH_SIZE, validation=(val_x, val_y), target=target,
                          deadline=deadline, min_epochs=1 if n == 0 else 0,
                          progress=progress, seed=seed)
        trial.val_accuracy = max(result.val_accuracy)
        trial.drop_points = round(100 * (original - trial.val_accuracy), 3)
        trial.epochs, trial.stopped = len(result.losses), result.stopped
        trial_report.finetune_losses = result.losses
        trial_report.finetune_val_accuracy = result.val_accuracy
        _log(progress, f"[{i + 1}] fine-tuned {trial.epochs} epochs ({trial.stopped}): "
                       f"{trial.val_accuracy:.2%}, drop {trial.drop_points:.2f} points, "
                       f"depth {trial.depth}")
        if not trial.runs:  # refused or too big before fine-tuning: may not be now
            _cost(trial, trial_proto, calibration, progress)
        trial.seconds = round(trial.seconds + time.monotonic() - t0, 1)
        if trial.runs and trial.val_accuracy >= target:
            _polish(i, trial, trial_proto, setting, trial_report, train_x, train_y, teacher,
                    (val_x, val_y), max_epochs, deadline, seed, progress)
            break
    chosen, plan, setting, refused = _choose(tried, tail, calibration, report, input_range,
                                             progress)
    index = trials.index(chosen)
    met = chosen.val_accuracy >= target
    reason = (f"the first setting fine-tuned to within {max_drop} points of the original on "
              "the validation split" if met else
              f"no setting reached the target within the budget; the most accurate of "
              f"{len(trials)} tried (drop {chosen.drop_points:.2f} points)")
    if refused:
        reason += f" that compiles for encryption ({len(refused)} more accurate did not)"
    too_big = [i for i, t in enumerate(trials) if t.stopped == "not runnable"]
    if too_big:
        reason += ("; not runnable on this machine, so not fine-tuned nor chosen: "
                   + ", ".join(f"[{i + 1}]" for i in too_big) + f" ({trials[too_big[0]].problem})")
    chosen.batch = estimate(plan).as_dict()
    if time.monotonic() < deadline:
        try:  # the other packing the user may serve: its predicted latency
            chosen.single = predicted_cost(tried[index][1], calibration, "single").as_dict()
        except SheError as exc:
            chosen.single = {"packing": "single", "problem": str(exc)}
    else:
        chosen.single = {"packing": "single", "problem": "not compiled: budget exhausted"}
    _log(progress, f"chosen: [{index + 1}] {setting.describe()} — {reason}")
    for i, t in enumerate(trials):
        _log(progress, f"  [{i + 1}] {trial_line(asdict(t))}{' (chosen)' if i == index else ''}")
    reference = None if test_x is None else g.run(proto, test_x)[0].argmax(1)
    _finish_report(report, tried[index][3], tried[index][1], (test_x, test_y, reference),
                   setting)
    report.search = {"original_val_accuracy": original, "target_val_accuracy": target,
                     "max_drop_points": max_drop, "budget_s": budget, "seed": seed,
                     "validation_samples": len(val_x), "training_samples": len(train_x),
                     "trials": [asdict(t) for t in trials], "chosen": index,
                     "order": sequence,
                     "target_met": met, "reason": reason, "not_encryptable": refused,
                     "not_previewed": skipped,
                     "not_runnable": [f"{t.description}: {t.problem}" for t in trials
                                      if t.runs is False],
                     "latency_model": LATENCY_MODEL,
                     "seconds": round(time.monotonic() - started, 1)}
    return tried[index][1], report


def _polish(index: int, trial: Trial, proto: onnx.ModelProto, setting: Settings, report: ConversionReport,
            x: np.ndarray, y: np.ndarray, teacher: np.ndarray,
            validation: tuple[np.ndarray, np.ndarray], max_epochs: int, deadline: float,
            seed: int, progress: bool) -> None:
    """The setting that reached the target keeps fine-tuning while its validation accuracy
    improves (early stopping, best epoch kept) and the budget lasts: the target decides
    which setting, not how accurate its model ends up."""
    from converters.finetune import finetune

    epochs = max_epochs - trial.epochs
    if epochs <= 0 or time.monotonic() > deadline:
        return
    t0 = time.monotonic()
    _log(progress, f"[{index + 1}] within the target: fine-tuning on while the "
                   "validation accuracy improves and the budget lasts")
    result = finetune(proto, x, teacher, epochs=epochs, lr=LEARNING_RATE / 2,
                      pow2_bits=setting.exponent_bits if setting.pow2 else None,
                      pow2_terms=setting.pow2_terms, labels=y, batch_size=BATCH_SIZE,
                      validation=validation, deadline=deadline, progress=progress,
                      seed=seed + 1)
    before = trial.val_accuracy
    trial.val_accuracy = max(result.val_accuracy)
    trial.drop_points = round(trial.drop_points - 100 * (trial.val_accuracy - before), 3)
    trial.epochs += len(result.losses)
    trial.stopped = f"target, then {result.stopped}"
    report.finetune_losses += result.losses
    report.finetune_val_accuracy += result.val_accuracy[1:]
    trial.seconds = round(trial.seconds + time.monotonic() - t0, 1)
    _log(progress, f"[{index + 1}] {len(result.losses)} more epochs "
                   f"({result.stopped}): {before:.2%} -> {trial.val_accuracy:.2%}")


@dataclass
class _PreviewClock:
    """When previews stop: at ``end`` (:data:`PREVIEW_SHARE` of the budget), and before a
    setting whose compile would run past it — its time predicted from the weights of its
    lowered model at the slowest rate (seconds per weight) the previews so far showed."""

    end: float
    seconds_per_weight: float = 0.0

    def refuses(self, weights: int) -> str | None:
        """Why a setting of ``weights`` lowered weights is not previewed (None: it is)."""
        memory = COMPILE_BYTES_PER_WEIGHT * weights
        have = physical_memory()
        if have and memory > 0.6 * have:
            return (f"compiling its {weights:,} weights would take about "
                    f"{memory / 2**30:.0f} GiB, more than this machine allows")
        now, need = time.monotonic(), self.seconds_per_weight * weights
        if now + need <= self.end:
            return None
        return (f"{PREVIEW_SHARE:.0%} of the budget spent" if now > self.end else
                f"compiling its {weights:,} weights would take about {need:.0f} s, past "
                f"{PREVIEW_SHARE:.0%} of the budget")

    def record(self, weights: int, seconds: float) -> None:
        self.seconds_per_weight = max(self.seconds_per_weight, seconds / max(weights, 1))


def _preview(proto: onnx.ModelProto, setting: Settings, calibration: np.ndarray,
             validation: tuple[np.ndarray, np.ndarray], original: float, index: int,
             clock: _PreviewClock | None, progress: bool
             ) -> tuple[Trial, onnx.ModelProto, Settings, ConversionReport] | None:
    """``setting`` applied to a copy of ``proto``: its accuracy before fine-tuning, depth and
    the predicted cost of its batch plan (or why it does not compile); None when ``clock``
    refuses the time its compile would take (the first preview has no clock)."""
    t0 = time.monotonic()
    trial_proto = onnx.ModelProto()
    trial_proto.CopyFrom(proto)
    trial_report = ConversionReport()
    he_friendly(trial_proto, calibration, setting, trial_report)
    try:
        chain = lower(she.frontend.model.from_proto(trial_proto, "converted"))
    except SheError:
        chain = None  # _cost reports why
    weights = 0 if chain is None else sum(
        layer.matrix.nnz if sp.issparse(layer.matrix) else np.count_nonzero(layer.matrix)
        for layer in chain.layers)
    if clock is not None and (reason := clock.refuses(weights)):
        _log(progress, f"    not previewed: {setting.describe()} ({reason})")
        return None
    val_x, val_y = validation
    converted = float(np.mean(g.run(trial_proto, val_x)[0].argmax(1) == val_y))
    trial = Trial(asdict(setting), setting.describe(), square_depth(trial_proto), converted,
                  converted, round(100 * (original - converted), 3), 0, "not fine-tuned", 0.0)
    _log(progress, f"[{index + 1}] {setting.describe()}: {converted:.2%} before fine-tuning")
    t1 = time.monotonic()
    _cost(trial, trial_proto, calibration, progress, chain)
    if clock is not None:
        clock.record(weights, time.monotonic() - t1)
    if trial.runs is False:
        trial.stopped = "not runnable"
    trial.seconds = round(time.monotonic() - t0, 1)
    return trial, trial_proto, setting, trial_report


def _cost(trial: Trial, proto: onnx.ModelProto, calibration: np.ndarray,
          progress: bool, chain: Chain | None = None) -> None:
    """Compile the trial's batch plan (from its lowered ``chain`` when given) and record its
    predicted cost, or why it is missing."""
    try:
        cost = predicted_cost(proto, calibration, chain=chain)
    except SheError as exc:
        trial.runs, trial.problem = None, f"does not compile for encryption: {exc}"
        _log(progress, f"    {trial.problem}")
        return
    trial.batch, trial.runs, trial.problem = cost.as_dict(), cost.runs, cost.problem
    _log(progress, f"    predicted {cost.describe()}, depth {cost.depth}"
                   f"{'' if cost.runs else ': NOT RUNNABLE: ' + str(cost.problem)}")


def _choose(tried: list[tuple[Trial, onnx.ModelProto, Settings, ConversionReport]],
            tail: onnx.ModelProto | None, calibration: np.ndarray, report: ConversionReport,
            input_range: tuple[float, float] | None, progress: bool
            ) -> tuple[Trial, she.Plan, Settings, list[str]]:
    """The most accurate setting tried whose plan compiles and fits memory (the one that met
    the target, if any, is the most accurate runnable one: the search stops there), written
    into ``report`` by :func:`finish`; and the more accurate ones the compiler refused."""
    refused: list[str] = []
    ranked = sorted((entry for entry in tried if entry[0].runs is not False),
                    key=lambda entry: -entry[0].val_accuracy)
    for trial, proto, setting, _ in ranked:
        try:
            plan = finish(proto, tail, calibration, setting, report, input_range)
        except ModelError as exc:
            refused.append(f"{setting.describe()}: {exc}")
            trial.runs, trial.problem = None, str(exc)
            _log(progress, f"not encryptable, next best: {setting.describe()}: {exc}")
            continue
        problem = estimate(plan).problem
        if problem is None:
            trial.runs, trial.problem = True, None
            return trial, plan, setting, refused
        trial.runs, trial.problem = False, problem
        _log(progress, f"not runnable, next best: {setting.describe()}: {problem}")
    problems = refused + [f"{t.description}: {t.problem}" for t, *_ in tried if t.runs is False]
    raise ModelError("no setting tried gives a model that compiles for encryption and fits "
                     "this machine's memory: " + "; ".join(problems))


def trial_line(trial: dict[str, Any]) -> str:
    """One line of a trial of the report: accuracy, depth, predicted latency and memory."""
    text = (f"{trial['description']}: {trial['val_accuracy_converted']:.2%} -> "
            f"{trial['val_accuracy']:.2%} after {trial['epochs']} epochs ({trial['stopped']}), "
            f"drop {trial['drop_points']:.2f}, depth {trial['depth']}")
    for packing in ("batch", "single"):
        cost = trial.get(packing)
        if cost and "seconds_per_request" in cost:
            per = (f"{cost['seconds_per_image'] * 1e3:.3g} ms/image of a full batch of "
                   f"{cost['seconds_per_request']:.3g} s" if packing == "batch"
                   else f"{cost['seconds_per_request']:.3g} s/image")
            text += (f"; {packing}: predicted {per}, {cost['memory_bytes'] / 2**30:.2f} GiB, "
                     f"N={cost['poly_modulus_degree']}")
        elif cost:
            text += f"; {packing}: not available ({cost['problem']})"
    if trial.get("problem"):
        text += f"; {'NOT RUNNABLE' if trial.get('runs') is False else 'refused'}: " \
                f"{trial['problem']}"
    return text


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
