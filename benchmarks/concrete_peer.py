"""Concrete ML measured in the benchmark report's run, on the networks SHE converts.

:func:`measure` hands a trained network (the ONNX original in ``she/assets``: ReLU for
Concrete ML, which SHE converts) and the report's images to
:mod:`benchmarks.concrete_adapter`, run by the Concrete ML environment's interpreter
(:mod:`benchmarks.concrete_env`) as a subprocess; :func:`rows` turns its result into report
rows and :func:`section` renders the side-by-side comparison with SHE's rows of the same run.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ADAPTER = Path(__file__).with_name("concrete_adapter.py")
#: Mode names of the Concrete ML rows.
SIMULATION_MODE = "Concrete ML FHE simulation (plaintext)"
ENCRYPTED_MODE = "Concrete ML encrypted, one image"


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
    fhe_budget_s: float = 300.0


class ConcreteError(RuntimeError):
    """The Concrete ML adapter failed (its stderr went to this process's stderr)."""


def measure(python: str, model_path: Path, calibration: np.ndarray, x: np.ndarray,
            y: np.ndarray, settings: ConcreteSettings = ConcreteSettings()) -> dict[str, Any]:
    """Run :mod:`benchmarks.concrete_adapter` on ``model_path`` with ``python`` (the Concrete
    ML environment); calibration and test images as the report loaded them."""
    n = settings.simulate_images
    with tempfile.TemporaryDirectory(prefix="she-concrete-") as tmp:
        data, out = Path(tmp) / "data.npz", Path(tmp) / "result.json"
        np.savez(data, calibration=calibration[:settings.calibration_images].astype(np.float32),
                 x=x[:n].astype(np.float32), y=y[:n])
        command = [python, str(ADAPTER), "--model", str(model_path), "--data", str(data),
                   "--out", str(out), "--n-bits", str(settings.n_bits),
                   "--rounding-threshold-bits", str(settings.rounding_threshold_bits),
                   "--fhe-images", str(settings.fhe_images),
                   "--fhe-budget-s", str(settings.fhe_budget_s)]
        if settings.p_error is not None:
            command += ["--p-error", str(settings.p_error)]
        done = subprocess.run(command, check=False)
        if done.returncode != 0 or not out.exists():
            raise ConcreteError(f"the Concrete ML adapter failed on {model_path.name} "
                                f"(exit code {done.returncode}; its error is above)")
        return json.loads(out.read_text())


def rows(model: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The report rows of one :func:`measure` result: FHE simulation on the test set, and
    encrypted execution one image per request (the deployment API's flow)."""
    params = result["parameters"]
    stats = params["statistics"]
    common = {"model": model, "concrete_parameters": params, "versions": result["versions"],
              "threads": result["threads"], "compile_s": result["compile_s"],
              "float_accuracy": result["float_accuracy"]}
    n = result["simulate_images"]
    simulation = {**common, "mode": SIMULATION_MODE, "images": n,
                  "accuracy": result["simulate_accuracy"],
                  "argmax_agreement": result["simulate_agreement_with_float"],
                  "eval_s_per_image": result["simulate_s"] / n,
                  "latency_s": result["simulate_s"] / n}
    enc, server, dec = result["encrypt_s"], result["server_s"], result["decrypt_s"]
    encrypted = {**common, "mode": ENCRYPTED_MODE, "images": result["fhe_images"],
                 "fhe_budget_s": result["fhe_budget_s"], "accuracy": result["fhe_accuracy"],
                 "argmax_agreement": result["fhe_agreement_with_simulation"],
                 "encrypt_s": enc, "eval_s": server, "decrypt_s": dec,
                 "latency_s": enc["p50"] + server["p50"] + dec["p50"],
                 "eval_s_per_image": server["p50"], "upload_bytes": result["upload_bytes"],
                 "download_bytes": result["download_bytes"],
                 "public_key_bytes": result["evaluation_key_bytes"],
                 "keygen_s": result["keygen_s"],
                 "pbs_count": stats.get("programmable_bootstrap_count")}
    return [simulation, encrypted]


def _describe(params: dict[str, Any]) -> str:
    stats = params["statistics"]
    return (f"n_bits={params['n_bits']}, rounding_threshold_bits="
            f"{params['rounding_threshold_bits']}, p_error={params['p_error']:.2g} "
            f"(global {params['global_p_error']:.2g}), max {params['max_bit_width']} bits, "
            f"{stats.get('programmable_bootstrap_count', '?')} PBS")


def _she_params(row: dict[str, Any]) -> str:
    return f"CKKS N={row['poly_modulus_degree']}, {row['modulus_bits']}, depth {row['depth']}"


def section(report: dict[str, Any], seconds: Any, size: Any) -> list[str]:
    """Markdown lines of the Concrete ML comparison (``seconds`` and ``size`` format
    seconds and bytes as the rest of the report does)."""
    status = report.get("concrete")
    lines = ["## Concrete ML, measured in the same run", ""]
    concrete = [r for r in report["rows"] if r["mode"] == ENCRYPTED_MODE]
    if not concrete:
        reason = status["reason"] if status else "not run by this report's command"
        return lines + [f"Not measured: {reason}.", ""]
    version = concrete[0]["versions"]
    lines += [
        f"Concrete ML {version['concrete-ml']} (concrete-python {version['concrete-python']}, "
        f"torch {version['torch']}) in its own environment (`python -m benchmarks.concrete_env`), "
        "run by `benchmarks/concrete_adapter.py` as a subprocess of the report: "
        "`compile_torch_model` on the trained network (ReLU: Concrete ML runs it as trained; "
        "SHE runs what `she convert` made of it), then `FHEModelDev` / `FHEModelClient` / "
        "`FHEModelServer`, one image per request. Same test images as SHE, in the same run; "
        "ratios are Concrete ML / SHE (single packing). Concrete ML's accuracy is its FHE "
        "simulation on the test set; its encrypted execution ran on the first images within "
        "the stated budget, agreement against the simulation.", "",
        "| network | toolkit | parameters | accuracy (images) | encrypted images: accuracy, "
        "agreement | server p50 | server p90 | encrypt p50 | decrypt p50 | key generation | "
        "evaluation keys | upload / download |",
        "|" + " --- |" * 12,
    ]
    ratios = []
    for c in concrete:
        mine = {r["mode"]: r for r in report["rows"] if r["model"] == c["model"]}
        sim = mine.get(SIMULATION_MODE)
        she = mine.get("SHE CKKS single")
        she_acc = mine.get("SHE CKKS batch") or mine.get("HE-friendly plaintext (onnxruntime)") \
            or mine.get("plaintext (onnxruntime)")
        if she:
            keygen = seconds(she.get("keygen_s")) if she.get("keygen_s") is not None else "-"
            acc = (f"{she_acc['accuracy']:.2%} ({she_acc['images']}, {she_acc['mode']})"
                   if she_acc else "-")
            lines.append(
                f"| {c['model']} | SHE | {_she_params(she)} | {acc} | {she['images']}: "
                f"{she['accuracy']:.2%}, {she['argmax_agreement']:.2%} | "
                f"{seconds(she['eval_s']['p50'])} | {seconds(she['eval_s']['p90'])} | "
                f"{seconds(she['encrypt_s']['p50'])} | {seconds(she['decrypt_s']['p50'])} | "
                f"{keygen} | {size(she['public_key_bytes'])} | "
                f"{size(she['upload_bytes'])} / {size(she['download_bytes'])} |")
        sim_acc = f"{sim['accuracy']:.2%} ({sim['images']}, FHE simulation)" if sim else "-"
        lines.append(
            f"| {c['model']} | Concrete ML | {_describe(c['concrete_parameters'])} | {sim_acc} | "
            f"{c['images']} (budget {c['fhe_budget_s']:g} s): {c['accuracy']:.2%}, "
            f"{c['argmax_agreement']:.2%} | {seconds(c['eval_s']['p50'])} | "
            f"{seconds(c['eval_s']['p90'])} | {seconds(c['encrypt_s']['p50'])} | "
            f"{seconds(c['decrypt_s']['p50'])} | {seconds(c['keygen_s'])} | "
            f"{size(c['public_key_bytes'])} | {size(c['upload_bytes'])} / "
            f"{size(c['download_bytes'])} |")
        if she:
            ratios.append(
                f"- {c['model']}: server p50 {c['eval_s']['p50'] / she['eval_s']['p50']:.1f}x, "
                f"evaluation keys {c['public_key_bytes'] / she['public_key_bytes']:.1f}x, "
                f"upload {c['upload_bytes'] / she['upload_bytes']:.2f}x, accuracy "
                f"{100 * ((sim or c)['accuracy'] - (she_acc or she)['accuracy']):+.2f} points "
                f"(Concrete ML - SHE); Concrete ML compiled it in {c['compile_s']:.0f} s")
    lines += ["", "Concrete ML / SHE, same run:", "", *ratios, ""]
    return lines
