"""Conversion targets: ReLU CNNs with BatchNorm and MaxPool, converted and run encrypted.

For each data set: train an ordinary ReLU CNN (``converters.zoo``), convert it with
``converters.convert`` (fine-tuning on the training split), report the accuracy of the
original and after every stage on the full test set, then run the converted model
encrypted (CKKS, batch packing) on ``--encrypted`` test images and report the agreement
with its onnxruntime plaintext. Writes ``docs/results/convert_targets.json`` and
``docs/conversion.md``::

    python -m benchmarks.convert_targets --data ../shared/data [--encrypted 10000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import she
from she.data import load_idx_dataset
from she.pipeline import encrypted_predict

from .mnist_demo import machine

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: (row name, data set, network builder in converters.zoo, allowed accuracy drop)
MODELS = (("mnist", "mnist", "small_relu_cnn", 0.005),
          ("fashion-mnist", "fashion-mnist", "small_relu_cnn", 0.015),
          ("mnist GHN", "mnist", "ghn_cnn", 0.005))
COLUMNS = ("model", "original", "converted", "drop (points)", "encrypted images",
           "encrypted accuracy", "agreement with plaintext", "max \\|logit error\\|", "depth",
           "ring", "server time / image")
HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS)


def run_one(name: str, data_dir: Path, builder: str, target: float, epochs: int,
            finetune_epochs: int, n_encrypted: int) -> dict:
    import converters
    from converters import zoo

    def log(text: str) -> None:
        print(f"[{name}] {text}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    net, _ = zoo.train(getattr(zoo, builder)(), str(data_dir), epochs=epochs, log=log)
    train_s = time.perf_counter() - t
    x, y = load_idx_dataset(data_dir, "train")
    xt, yt = load_idx_dataset(data_dir, "test")
    t = time.perf_counter()
    proto, report = converters.convert(net, x, calibration_labels=y, eval_x=xt, eval_y=yt,
                                       input_shape=(1, 28, 28), finetune_epochs=finetune_epochs,
                                       finetune_lr=2e-3, progress=True)
    convert_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.she.onnx"
        converters.save_atomically(proto, path)
        model = she.load(path)
    plan = she.compile(model, calibration=x[:2000])
    xe, ye = xt[:n_encrypted], yt[:n_encrypted]
    log(f"encrypting {len(xe)} test images")
    enc, timings = encrypted_predict(plan, xe)
    plain = model.run_plain(xe)
    stages = [{"name": s.name, "accuracy": s.accuracy, "agreement": s.agreement}
              for s in report.stages]
    final = stages[-1]["accuracy"]
    return {
        "dataset": name,
        "network": builder,
        "original_accuracy": stages[0]["accuracy"],
        "converted_accuracy": final,
        "drop_points": 100 * (stages[0]["accuracy"] - final),
        "target_drop_points": 100 * target,
        "meets_target": stages[0]["accuracy"] - final <= target,
        "stages": stages,
        "encrypted_images": len(xe),
        "encrypted_accuracy": float(np.mean(enc.argmax(1) == ye)),
        "encrypted_agreement": float(np.mean(enc.argmax(1) == plain.argmax(1))),
        "max_abs_logit_error": float(np.abs(enc - plain).max()),
        "exact_layers": all(layer.exact for layer in plan.layers),
        "depth": plan.depth,
        "poly_modulus_degree": plan.params.poly_modulus_degree,
        "modulus_bits": list(plan.params.modulus_bits),
        "evaluate_ms_per_image": timings.per_sample()["evaluate_ms"],
        "seconds": {"train": train_s, "convert": convert_s},
        "epochs": epochs, "finetune_epochs": finetune_epochs,
    }


def render(result: dict) -> str:
    m = result["machine"]
    rows, stage_rows = [], []
    for r in result["models"]:
        rows.append(
            f"| {r['dataset']} | {r['original_accuracy']:.2%} | {r['converted_accuracy']:.2%} | "
            f"{r['drop_points']:.2f} (≤ {r['target_drop_points']:.1f}: "
            f"{'met' if r['meets_target'] else 'NOT met'}) | {r['encrypted_images']} | "
            f"{r['encrypted_accuracy']:.2%} | {r['encrypted_agreement']:.2%} | "
            f"{r['max_abs_logit_error']:.1e} | {r['depth']} | N={r['poly_modulus_degree']} | "
            f"{r['evaluate_ms_per_image']:.1f} ms |")
        for s in r["stages"]:
            stage_rows.append(f"| {r['dataset']} | {s['name']} | {s['accuracy']:.2%} | "
                              f"{s['agreement']:.2%} |")
    nl = "\n"
    return f"""# Conversion results

Numbers from `docs/results/convert_targets.json`, written by `{result['command']}` on
{result['date']} ({m['cores']} cores, {m['cpu']}; TenSEAL {m['tenseal']}, torch
{result['torch']}). The ReLU rows are an ordinary CNN (`converters.zoo.small_relu_cnn`:
conv 5×5 stride 2 + batch norm + ReLU + max pool, dense 392→64 + ReLU, dense 64→10); the
GHN row is `converters.zoo.ghn_cnn` (GHN conv and dense layers with analytic bias, quadratic
activations, average pooling: nothing to approximate, so only the power-of-two rounding
costs accuracy). Each is trained for {result['models'][0]['epochs']} epochs, then converted
by `converters.convert`
(batch norm folded, max pool → average pool, per-channel quadratic activations,
power-of-two weights and activation scales, {result['models'][0]['finetune_epochs']} epochs
of fine-tuning on the 60 000 training images: distillation to the original's logits plus
cross-entropy to the labels). Accuracies are on the full test
set; the encrypted run uses CKKS batch packing.

{HEADER}
{nl.join(rows)}

Accuracy after each stage (agreement: argmax agreement with the original model):

| model | stage | accuracy | agreement |
| --- | --- | --- | --- |
{nl.join(stage_rows)}

All layers of the converted models are exact shift-accumulates (power-of-two weights times
power-of-two activation scales), so the encrypted error is CKKS noise only.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="directory holding mnist/ and "
                        "fashion-mnist/ IDX folders")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--encrypted", type=int, default=2000,
                        help="test images run encrypted (default 2000)")
    args = parser.parse_args()
    import torch

    models = [run_one(name, Path(args.data) / data, builder, target, args.epochs,
                      args.finetune_epochs, args.encrypted)
              for name, data, builder, target in MODELS]
    result = {
        "benchmark": "convert_targets",
        "command": f"python -m benchmarks.convert_targets --data DIR --epochs {args.epochs} "
                   f"--finetune-epochs {args.finetune_epochs} --encrypted {args.encrypted}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "torch": torch.__version__, "models": models,
    }
    out = DOCS / "results" / "convert_targets.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    (DOCS / "conversion.md").write_text(render(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
