"""The default ``she convert`` command on models trained outside the converter.

For every exporter family of :mod:`benchmarks.user_models` (MNIST and Fashion-MNIST), the
model is trained and exported by ordinary user code, then converted with the command a
user types, no flags::

    python -m she convert MODEL.onnx -o MODEL.she.onnx --data DIR --json

and the converted model is run encrypted (batch packing) on test images. Records the
accuracy drop on the full test split, the wall-clock and CPU time of the command (and the
machine's load average around it), the settings it chose (and every one it tried, with the
predicted latency and memory of its plans), the encrypted agreement with the converted
plaintext model, and the measured server time of one request beside the predicted one
into ``docs/results/convert_users.json``; ``docs/conversion.md`` shows them (between its
``convert_users`` markers)::

    python -m benchmarks.convert_users --data ../shared/data [--models torch_cnn:mnist ...]
        [--n 500]

Rows of models not re-measured are kept, so the benchmark can be run a model at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import she
from benchmarks import user_models
from benchmarks.mnist_demo import machine
from converters.search import trial_line
from she.io.data import arrange, load_dataset
from she.pipeline import encrypted_predict
from she.plan.estimate import LATENCY_MODEL, estimate

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "convert_users.json"
DOC = REPO / "docs" / "conversion.md"
#: Every (family, data set) pair measured by default.
DEFAULT_MODELS = [f"{family}:{data}" for data in ("mnist", "fashion-mnist")
                  for family in user_models.FAMILIES + user_models.RESIDUAL_FAMILIES]
#: Targets of the issue: drop in points by data set, minutes, encrypted agreement.
TARGET_DROP = {"mnist": 0.5, "fashion-mnist": 1.0}
TARGET_MINUTES = 10.0
TARGET_AGREEMENT = 0.995
MARKERS = ("<!-- convert_users:begin -->", "<!-- convert_users:end -->")
#: Rows carry the day they were measured; those of the first runs do not: they were all
#: measured that day.
FIRST_RUN = "2026-11-27"
#: The day the default search's fine-tuning last changed (rows before it predate it).
CURRENT_SEARCH = "2026-11-28"


def measure(family: str, dataset: str, data_root: Path, n: int, workdir: Path,
            trained: Path | None = None) -> dict:
    """Train, export, convert with the default command, run encrypted; one result row.
    ``trained``: a directory already holding ``{family}-{dataset}.onnx`` from an earlier
    run of the same trainer (training is then skipped)."""
    data_dir = data_root / dataset
    x, y = load_dataset(data_dir, "train", (1, 28, 28))
    t0 = time.perf_counter()
    name = f"{family}-{dataset}.onnx"
    if trained is not None and (trained / name).exists():
        path, train_s = trained / name, None
    else:
        path = user_models.train(family, x, y, workdir / name)
        train_s = round(time.perf_counter() - t0, 1)
    out = workdir / f"{family}-{dataset}.she.onnx"
    argv = [sys.executable, "-m", "she", "convert", str(path), "-o", str(out), "--data",
            str(data_dir), "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    convert_s = time.perf_counter() - t0
    load_after = os.getloadavg()[0]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{family}/{dataset}: she convert failed: {done.stdout}{done.stderr}")
    report = json.loads(done.stdout)
    stages = report["stages"]
    original, converted = stages[0]["accuracy"], stages[-1]["accuracy"]
    model = she.load(out)
    xt, yt = load_dataset(data_dir, "test", model.input_shape)
    cal = arrange(x[:1000], model.input_shape)
    plan = she.compile(model, calibration=cal)
    predicted = estimate(plan)
    enc, timings = encrypted_predict(plan, xt[:n])
    plain = model.run_plain(xt[:n])
    search = report["search"]
    trials = search["trials"]
    return {
        "model": family, "data": dataset, "exporter_file": path.name,
        "command": shlex.join(["python", "-m", "she", "convert", path.name, "-o", out.name,
                               "--data", str(data_dir)]),
        "train_s": train_s,
        "convert_wall_s": round(convert_s, 1), "convert_cpu_s": round(cpu_s, 1),
        "load_average_1min": [round(load_before, 1), round(load_after, 1)],
        "test_samples": report["eval_samples"],
        "original_accuracy": original, "converted_accuracy": converted,
        "drop_points": round(100 * (original - converted), 2),
        "chosen": trials[search["chosen"]]["description"], "reason": search["reason"],
        "target_met_on_validation": search["target_met"],
        "trials": [{k: t.get(k) for k in ("description", "depth", "val_accuracy_converted",
                                          "val_accuracy", "drop_points", "epochs", "stopped",
                                          "seconds", "runs", "problem", "batch", "single")}
                   for t in trials],
        "not_runnable": search.get("not_runnable", []),
        "tail_outputs": report["tail_outputs"],
        "depth": report["depth"], "poly_modulus_degree": plan.params.poly_modulus_degree,
        "modulus_bits": list(plan.params.modulus_bits),
        "encrypted_images": int(min(n, len(xt))),
        "encrypted_agreement": float(np.mean(enc.argmax(1) == plain.argmax(1))),
        "encrypted_accuracy": float(np.mean(enc.argmax(1) == yt[:n])),
        "max_abs_logit_error": float(np.abs(enc - plain).max()),
        "predicted_max_error": plan.predicted_error,
        "evaluate_ms_per_image": 1e3 * timings.evaluate / max(1, sum(timings.batches)),
        # the latency model against the measured wall clock of the same requests
        "evaluate_s_per_request": timings.evaluate / max(1, len(timings.batches)),
        "predicted_s_per_request": predicted.seconds_per_request,
        "predicted_memory_gib": round(predicted.memory_bytes / 2**30, 2),
    }


def write_markdown(results: dict) -> None:
    """Replace the table between the markers of docs/conversion.md."""
    rows = sorted(results["rows"].values(), key=lambda r: (r["data"], r["model"]))
    lines = [MARKERS[0], "",
             f"Written by `python -m benchmarks.convert_users` (last run {results['date']}, "
             f"{results['machine']['cores']} cores, {results['machine']['cpu']}; the machine "
             "was shared with other jobs, so wall-clock times are inflated: the CPU time of "
             "the command is given beside them, and the machine's 1-minute load average before "
             "and after it in brackets; \"one request\" is the measured wall-clock server time "
             "of the encrypted request of the test images (batch packing, same load) beside the "
             "latency model's prediction and the plan's predicted memory). Targets: drop ≤ "
             f"{TARGET_DROP['mnist']} points (MNIST), ≤ {TARGET_DROP['fashion-mnist']} "
             f"(Fashion-MNIST), ≤ {TARGET_MINUTES:.0f} minutes, encrypted agreement ≥ "
             f"{TARGET_AGREEMENT:.1%}. Rows measured before {CURRENT_SEARCH} predate the "
             "search's current fine-tuning (the KL distillation loss, and fine-tuning on "
             "within the target).", "",
             "| model (exporter) | data | measured | original | converted | drop (points) | "
             "convert wall / CPU (load) | chosen setting | depth, N | encrypted agreement | "
             "one request: measured / predicted | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = (r["drop_points"] <= TARGET_DROP[r["data"]]
               and r["convert_wall_s"] <= 60 * TARGET_MINUTES
               and r["encrypted_agreement"] >= TARGET_AGREEMENT)
        lines.append(
            f"| {r['model']} | {r['data']} | {r.get('date', FIRST_RUN)} | "
            f"{r['original_accuracy']:.2%} | "
            f"{r['converted_accuracy']:.2%} | {r['drop_points']:.2f} | "
            f"{r['convert_wall_s'] / 60:.1f} / {r['convert_cpu_s'] / 60:.1f} min"
            f"{_load(r)} | {r['chosen']} | {r['depth']}, {r['poly_modulus_degree']} | "
            f"{r['encrypted_agreement']:.2%} ({r['encrypted_images']} images) | "
            f"{_request_times(r)} | {'met' if met else 'missed'} |")
    lines += ["", "Every setting each conversion tried (validation accuracy before and after "
              "fine-tuning, epochs, why it stopped; for rows measured since the search weighs "
              f"runnability, the predicted latency and memory of its plans, {LATENCY_MODEL}):",
              ""]
    for r in rows:
        tried = " · ".join(f"[{i + 1}] {trial_line(t)}" for i, t in enumerate(r["trials"]))
        lines.append(f"- {r['model']} / {r['data']}: {tried}. Chosen: {r['reason']}.")
    lines += ["", MARKERS[1]]
    text = DOC.read_text()
    if MARKERS[0] in text:
        head, rest = text.split(MARKERS[0], 1)
        text = head + "\n".join(lines) + rest.split(MARKERS[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    DOC.write_text(text)


def _load(row: dict) -> str:
    """The 1-minute load average before and after the command, when recorded."""
    load = row.get("load_average_1min")
    return f" ({load[0]:.0f}-{load[1]:.0f})" if load else ""


def _request_times(row: dict) -> str:
    """Measured and predicted server seconds of one encrypted request, when recorded."""
    if "predicted_s_per_request" not in row:
        return "n/a"
    return (f"{row['evaluate_s_per_request']:.0f} s / {row['predicted_s_per_request']:.0f} s, "
            f"{row['predicted_memory_gib']:.1f} GiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="directory holding mnist/, fashion-mnist/")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="family:dataset pairs (default: every family on both)")
    parser.add_argument("--n", type=int, default=500, help="encrypted test images (default 500)")
    parser.add_argument("--trained", type=Path, help="directory of models this module's "
                        "trainers already wrote ({family}-{dataset}.onnx): not trained again")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    with tempfile.TemporaryDirectory(prefix="she-users-") as tmp:
        for item in args.models:
            family, _, dataset = item.partition(":")
            print(f"== {family} on {dataset}", file=sys.stderr, flush=True)
            row = measure(family, dataset or "mnist", Path(args.data), args.n, Path(tmp),
                          args.trained)
            now = datetime.datetime.now(datetime.timezone.utc)
            results["rows"][f"{family}:{row['data']}"] = {**row, "date": now.date().isoformat()}
            results.update(date=now.isoformat(timespec="seconds"), machine=machine())
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            write_markdown(results)
            print(json.dumps({k: row[k] for k in ("model", "data", "drop_points",
                                                  "convert_wall_s", "convert_cpu_s", "chosen",
                                                  "encrypted_agreement")}),
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
