"""Concrete ML measured in the benchmark report's run, on the networks SHE converts.

:func:`measure` hands a trained network (the ONNX original in ``she/assets``: ReLU for
Concrete ML, which SHE converts) and the report's images to
:mod:`benchmarks.concrete_adapter`, run by the Concrete ML environment's interpreter
(:mod:`benchmarks.concrete_env`) as a subprocess; :func:`rows` turns its result into report
rows and :func:`section` renders the side-by-side comparison with SHE's rows of the same run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.concrete_env import CONCRETE_ML_VERSION, ENV_VARIABLE

ADAPTER = Path(__file__).with_name("concrete_adapter.py")
#: Mode names of the Concrete ML rows.
SIMULATION_MODE = "Concrete ML FHE simulation (plaintext)"
ENCRYPTED_MODE = "Concrete ML encrypted, one image"


#: Why the report runs the wide networks through Concrete ML's compiler and simulation only.
WIDE_NOTE = (
    "Encrypted execution \"not run\": the wide networks (the MNIST accuracy-target CNN, "
    "32 and 64 channels) are compiled and simulated only. Concrete ML compiles that CNN to "
    "over 100,000 programmable bootstraps; run encrypted on this 2-core machine "
    "(`benchmarks/concrete_adapter.py --model she/assets/mnist_cnn.onnx --fhe-images 1`, "
    "2026-11-27), it generated 1.3 GB of evaluation keys in 367 s and was then killed at "
    "9 GB of memory before the first image finished. Their FHE simulation takes seconds "
    "per image, so it runs on fewer images.")


@dataclass(frozen=True)
class ConcreteSettings:
    """Concrete ML's compilation options (those of the comparison issue; ``p_error=None``
    keeps Concrete ML's default) and how many images it runs on."""

    n_bits: int = 6
    rounding_threshold_bits: int = 5
    p_error: float | None = None
    calibration_images: int = 1000
    simulate_images: int = 10_000
    fhe_images: int = 10
    fhe_budget_s: float = 600.0
    wide_simulate_images: int = 100  # wide networks: seconds per simulated image

    def for_wide(self) -> ConcreteSettings:
        """The settings for a wide network: fewer simulated images, no encrypted run
        (:data:`WIDE_NOTE`)."""
        return dataclasses.replace(self, fhe_images=0, simulate_images=min(
            self.simulate_images, self.wide_simulate_images))


class ConcreteError(RuntimeError):
    """The Concrete ML adapter failed (its stderr went to this process's stderr)."""


def measure(python: str, model_path: Path, calibration: np.ndarray, x: np.ndarray,
            y: np.ndarray, settings: ConcreteSettings = ConcreteSettings()) -> dict[str, Any]:
    """Run :mod:`benchmarks.concrete_adapter` on ``model_path`` with ``python`` (the Concrete
    ML environment); calibration and test images as the report loaded them."""
    with tempfile.TemporaryDirectory(prefix="she-concrete-") as tmp:
        data, out = Path(tmp) / "data.npz", Path(tmp) / "result.json"
        np.savez(data, calibration=calibration[:settings.calibration_images].astype(np.float32),
                 x=x.astype(np.float32), y=y)
        command = [python, str(ADAPTER), "--model", str(model_path), "--data", str(data),
                   "--out", str(out), "--n-bits", str(settings.n_bits),
                   "--rounding-threshold-bits", str(settings.rounding_threshold_bits),
                   "--simulate-images", str(settings.simulate_images),
                   "--fhe-images", str(settings.fhe_images),
                   "--fhe-budget-s", str(settings.fhe_budget_s)]
        if settings.p_error is not None:
            command += ["--p-error", str(settings.p_error)]
        load_before = os.getloadavg()[0]
        done = subprocess.run(command, check=False)
        if done.returncode != 0 or not out.exists():
            raise ConcreteError(f"the Concrete ML adapter failed on {model_path.name} "
                                f"(exit code {done.returncode}; its error is above)")
        # the machine is shared: its load beside the timings
        return {**json.loads(out.read_text()), "load_average": [load_before, os.getloadavg()[0]]}


def rows(model: str, result: dict[str, Any], she_command: str | None = None
         ) -> list[dict[str, Any]]:
    """The report rows of one :func:`measure` result: FHE simulation on the test set
    (with the deployment's sizes and key generation time, and ``she_command``, the
    command that made SHE's model of the same network), and encrypted execution one image
    per request when at least one image finished within the budget."""
    n = result["simulate_images"]
    deployment = {k: result[k] for k in ("keygen_s", "evaluation_key_bytes", "upload_bytes",
                                         "download_bytes", "fhe_images", "fhe_budget_s",
                                         "fhe_unfinished_s")}
    simulation = {"model": model, "mode": SIMULATION_MODE, "images": n,
                  "accuracy": result["simulate_accuracy"],
                  "argmax_agreement": result["simulate_agreement_with_quantized"],
                  "eval_s_per_image": result["simulate_s"] / n,
                  "latency_s": result["simulate_s"] / n, "threads": result["threads"],
                  "float_accuracy": result["float_accuracy"], "compile_s": result["compile_s"],
                  "quantized_accuracy": result["quantized_accuracy"],
                  "quantized_images": result["images"],
                  "concrete_parameters": result["parameters"], "versions": result["versions"],
                  "deployment": deployment, "she_command": she_command,
                  "load_average": result.get("load_average")}
    if not result["fhe_images"]:
        return [simulation]
    enc, server, dec = result["encrypt_s"], result["server_s"], result["decrypt_s"]
    encrypted = {"model": model, "mode": ENCRYPTED_MODE, "images": result["fhe_images"],
                 "accuracy": result["fhe_accuracy"],
                 "argmax_agreement": result["fhe_agreement_with_simulation"],
                 "encrypt_s": enc, "eval_s": server, "decrypt_s": dec,
                 "latency_s": enc["p50"] + server["p50"] + dec["p50"],
                 "eval_s_per_image": server["p50"], "upload_bytes": result["upload_bytes"],
                 "download_bytes": result["download_bytes"],
                 "public_key_bytes": result["evaluation_key_bytes"],
                 "keygen_s": result["keygen_s"], "threads": result["threads"]}
    return [simulation, encrypted]


def _describe(params: dict[str, Any]) -> str:
    stats = params["statistics"]
    return (f"n_bits={params['n_bits']}, rounding_threshold_bits="
            f"{params['rounding_threshold_bits']}, p_error={params['p_error']:.2g} "
            f"(global {params['global_p_error']:.2g}), max {params['max_bit_width']} bits, "
            f"{stats.get('programmable_bootstrap_count', '?')} PBS")


def _she_params(row: dict[str, Any]) -> str:
    return f"CKKS N={row['poly_modulus_degree']}, {row['modulus_bits']}, depth {row['depth']}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s" if value >= 1 else f"{1e3 * value:.1f} ms"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def section(report: dict[str, Any], size: Callable[[float | None], str]) -> list[str]:
    """Markdown lines of the Concrete ML comparison (``size`` formats bytes as the rest of
    the report does)."""
    seconds = _seconds
    lines = ["## Concrete ML, measured in the same run", "",
             f"Concrete ML needs an environment of its own (it pins its own torch): create it "
             f"once with `python -m benchmarks.concrete_env` (`.venv-concrete`, "
             f"concrete-ml=={CONCRETE_ML_VERSION}; several GB), and the report measures it "
             f"beside SHE (or pass `--concrete-python PATH`, or set `${ENV_VARIABLE}`).", ""]
    simulated = [r for r in report["rows"] if r["mode"] == SIMULATION_MODE]
    if not simulated:
        status = report.get("concrete")
        reason = status["reason"] if status else "not run by this report's command"
        return lines + [f"Not measured: {reason}.", ""]
    version = simulated[0]["versions"]
    lines += [
        f"Concrete ML {version['concrete-ml']} (concrete-python {version['concrete-python']}, "
        f"torch {version['torch']}) in its own environment (`python -m benchmarks.concrete_env`), "
        "run by `benchmarks/concrete_adapter.py` as a subprocess of the report: "
        "`compile_torch_model` on the trained network (ReLU: Concrete ML runs it as trained, "
        "SHE runs what `she convert` made of it; the TenSEAL-tutorial network squares, and "
        "both run it as trained), then `FHEModelDev` / `FHEModelClient` / "
        "`FHEModelServer`, one image per request. Same test images as SHE, in the same run. "
        "Concrete ML's accuracy is its FHE simulation on the first test images (agreement: "
        "with its quantised model in the clear, `fhe=\"disable\"`, whose accuracy on the "
        "whole test set is given too); its encrypted execution ran on the first images until "
        "the budget of server time was spent (agreement: with the simulation). SHE's accuracy "
        "is its encrypted batch row's (agreement: with its plaintext model).", "",
        "| network | toolkit | parameters | accuracy (images) | encrypted: images, accuracy, "
        "agreement | server p50 | server p90 | encrypt p50 | decrypt p50 | key generation | "
        "evaluation keys | upload / download |",
        "|" + " --- |" * 12,
    ]
    ratios = []
    for sim in simulated:
        mine = {r["mode"]: r for r in report["rows"] if r["model"] == sim["model"]}
        she, c, d = mine.get("SHE CKKS single"), mine.get(ENCRYPTED_MODE), sim["deployment"]
        she_acc = mine.get("SHE CKKS batch") or she
        if she:
            lines.append(
                f"| {sim['model']} | SHE | {_she_params(she)} | {_percent(she_acc['accuracy'])} "
                f"({she_acc['images']}) | {she['images']}, {_percent(she['accuracy'])}, "
                f"{_percent(she['argmax_agreement'])} | {seconds(she['eval_s']['p50'])} | "
                f"{seconds(she['eval_s']['p90'])} | {seconds(she['encrypt_s']['p50'])} | "
                f"{seconds(she['decrypt_s']['p50'])} | {seconds(she.get('keygen_s'))} | "
                f"{size(she['public_key_bytes'])} | "
                f"{size(she['upload_bytes'])} / {size(she['download_bytes'])} |")
        unfinished = ("" if d["fhe_unfinished_s"] is None else
                      f" (image {d['fhe_images'] + 1} given up after "
                      f"{d['fhe_unfinished_s']:.0f} s)")
        encrypted = ("not run, " if not (d["fhe_images"] or d["fhe_unfinished_s"]) else
                     f"{d['fhe_images']} in {d['fhe_budget_s']:g} s{unfinished}, ")
        encrypted += (f"{_percent(c['accuracy'])}, {_percent(c['argmax_agreement'])}"
                      if c else "-, -")
        timing = ([c["eval_s"]["p50"], c["eval_s"]["p90"], c["encrypt_s"]["p50"],
                   c["decrypt_s"]["p50"]] if c else [None] * 4)
        lines.append(
            f"| {sim['model']} | Concrete ML | {_describe(sim['concrete_parameters'])} | "
            f"{_percent(sim['accuracy'])} ({sim['images']}, FHE simulation); "
            f"{_percent(sim['quantized_accuracy'])} ({sim['quantized_images']}, quantised, "
            f"clear) | {encrypted} | "
            + " | ".join(seconds(t) for t in timing)
            + f" | {seconds(d['keygen_s'])} | {size(d['evaluation_key_bytes'])} | "
            f"{size(d['upload_bytes'])} / {size(d['download_bytes'])} |")
        if she:
            ratio = [f"server p50 {c['eval_s']['p50'] / she['eval_s']['p50']:.1f}x" if c else
                     f"server > {d['fhe_unfinished_s'] / she['eval_s']['p50']:.0f}x (no image "
                     "finished)" if d["fhe_unfinished_s"] else "no encrypted run"]
            if she.get("keygen_s") and d["keygen_s"]:
                ratio.append(f"key generation {d['keygen_s'] / she['keygen_s']:.1f}x")
            if d["evaluation_key_bytes"]:
                ratio += [f"evaluation keys "
                          f"{d['evaluation_key_bytes'] / she['public_key_bytes']:.1f}x",
                          f"upload {d['upload_bytes'] / she['upload_bytes']:.2f}x"]
            ratios.append(
                f"- {sim['model']}: {', '.join(ratio)}; accuracy "
                f"{100 * (sim['quantized_accuracy'] - she_acc['accuracy']):+.2f} points "
                f"(Concrete ML's quantised model on {sim['quantized_images']} images, whose FHE "
                f"simulation agreed with it on {_percent(sim['argmax_agreement'])} of "
                f"{sim['images']}; SHE encrypted on {she_acc['images']}); "
                f"Concrete ML compiled it in {sim['compile_s']:.0f} s"
                + (" (1-minute load average {:.0f} before and {:.0f} after its run on 2 cores)"
                   .format(*sim["load_average"]) if sim.get("load_average") else "")
                + (f"; SHE's model: `{sim['she_command']}`" if sim.get("she_command") else ""))
    if any(not (r["deployment"]["fhe_images"] or r["deployment"]["fhe_unfinished_s"])
           for r in simulated):
        lines += ["", WIDE_NOTE]
    lines += ["", "Concrete ML / SHE, measured in the same run:", "", *ratios, ""]
    return lines
