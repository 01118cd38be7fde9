"""Train the ordinary ReLU CNNs behind SHE's accuracy targets, convert them, ship them.

For one data set (MNIST or Fashion-MNIST): train :func:`converters.zoo.two_conv_relu_cnn`
(two Conv + BatchNorm + ReLU blocks, MaxPool, Dropout, two dense layers; nothing
HE-specific; or with ``--arch shallow`` :func:`converters.zoo.shallow_relu_cnn`, one
activation, for BFV; or with ``--arch ghn`` the GHN network :func:`converters.zoo.ghn_cnn`;
with ``--arch mlp`` the dense network :func:`converters.zoo.relu_mlp`; or with
``--arch tutorial`` the TenSEAL-tutorial architecture with ReLU,
:func:`converters.zoo.tutorial_relu_cnn`; with ``--arch resnet`` a small ResNet,
:func:`converters.zoo.residual_relu_cnn` (``--channels`` stem and block channels,
``--blocks``); with ``--arch wide`` a three-conv plain CNN,
:func:`converters.zoo.wide_relu_cnn`; with ``--arch pooled`` two full-resolution
convolutions each pooled before its ReLU, and a third on the 7x7 map when ``--channels``
names three, :func:`converters.zoo.pooled_relu_cnn`; with ``--arch fast`` two stride-2
convolutions and one dense layer sized for the N=8192 ring, :func:`converters.zoo.fast_relu_cnn`)
with random-shift augmentation, export it to ONNX, convert it exactly as
``she convert`` does (batch norm folded, max pool to average pool, quadratic activations
fitted on the calibration data, power-of-two weights, distillation fine-tuning on the
60 000 training images; with ``--search`` the settings are searched against the drop
target exactly as by ``she convert`` without flags), and write into ``--out-dir``::

    <name>_cnn.onnx        the original model (plaintext reference)
    <name>_cnn.she.onnx    the converted HE-friendly model
    <name>_cnn.json        the conversion report (accuracy after every stage)

Run from the repository root (about 30-60 minutes on 2 cores)::

    python -m converters.train_targets --data ../shared/data/mnist --name mnist
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnx
import torch

from converters import zoo
from converters.convert import convert, save_atomically, torch_to_onnx
from converters.finetune import DISTILLATIONS
from converters.search import BUDGET, search
from she.io.data import load_idx_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="IDX directory (train and t10k files)")
    parser.add_argument("--name", required=True, help="asset name prefix, e.g. mnist")
    parser.add_argument("--out-dir", default="she/assets")
    parser.add_argument("--arch", choices=("two_conv", "shallow", "ghn", "mlp", "tutorial", "resnet", "wide",
                                                 "pooled", "fast"),
                        default="two_conv")
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64],
                        help="conv channels (two for two_conv, one for shallow)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=2, help="residual blocks (resnet)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    parser.add_argument("--max-shift", type=int, default=2, help="augmentation (pixels)")
    parser.add_argument("--flip", action="store_true",
                        help="augmentation: random horizontal mirroring (Fashion-MNIST)")
    parser.add_argument("--skip-training", action="store_true",
                        help="convert the original NAME_cnn.onnx of an earlier run again "
                        "(its training command is kept in the record)")
    parser.add_argument("--search", action="store_true",
                        help="convert as `she convert` does by default (settings searched "
                        "against the accuracy-drop target in its time budget) instead of "
                        "with the fixed settings below")
    parser.add_argument("--budget", type=float, default=BUDGET,
                        help="--search: seconds for the settings search (as `she convert "
                        "--budget`)")
    parser.add_argument("--pow2-terms", type=int, default=1, choices=(1, 2, 3),
                        help="powers of two per converted weight")
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--finetune-lr", type=float, default=2e-3)
    parser.add_argument("--distillation", choices=DISTILLATIONS, default="kl",
                        help="fine-tuning loss (assets converted before 2026-11-28: mse)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (training and "
                        "conversion)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _train(args: argparse.Namespace, out: Path) -> dict:
    """Train the network, save the original ONNX; returns how long it took."""
    start = time.perf_counter()
    if args.arch == "shallow":
        net = zoo.shallow_relu_cnn(args.channels[0])
    elif args.arch == "ghn":
        net = zoo.ghn_cnn(args.channels[0], args.hidden)
    elif args.arch == "mlp":
        net = zoo.relu_mlp(args.hidden)
    elif args.arch == "tutorial":
        net = zoo.tutorial_relu_cnn(args.hidden)
    elif args.arch == "resnet":
        net = zoo.residual_relu_cnn(tuple(args.channels[:2]), args.blocks)
    elif args.arch == "pooled":
        net = zoo.pooled_relu_cnn(tuple(args.channels[:3]), args.hidden)
    elif args.arch == "fast":
        net = zoo.fast_relu_cnn(tuple(args.channels[:2]))
    elif args.arch == "wide":
        net = zoo.wide_relu_cnn(tuple(args.channels[:3]), args.hidden)
    else:
        net = zoo.two_conv_relu_cnn(tuple(args.channels), args.hidden)
    net, accuracy = zoo.train(net, args.data, epochs=args.epochs, lr=args.lr, seed=args.seed,
                              max_shift=args.max_shift, threads=args.threads,
                              flip=args.flip)
    seconds = round(time.perf_counter() - start)
    print(f"trained: test accuracy {accuracy:.2%} ({seconds} s)", flush=True)
    original = torch_to_onnx(net, (1, 28, 28))
    onnx.checker.check_model(original)
    save_atomically(original, out / f"{args.name}_cnn.onnx")
    return {"seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # training and conversion (fine-tuning) alike
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = out / f"{args.name}_cnn.json"
    command = "python -m converters.train_targets " + " ".join(
        f"--{k.replace('_', '-')}" if v is True else
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list | tuple) else v}"
        for k, v in vars(args).items() if k != "out_dir" and v is not False)
    if args.skip_training:
        earlier = json.loads(record.read_text())
        training = {"command": earlier.get("training_command", earlier["command"]),
                    "seconds": earlier["seconds"]["train"]}
    else:
        training = _train(args, out)
        training["command"] = command
        # recorded at once: a conversion interrupted later can be redone with --skip-training
        record.write_text(json.dumps({"command": command, "training_command": command,
                                      "seconds": {"train": training["seconds"]}}, indent=2) + "\n")
    original = onnx.load(str(out / f"{args.name}_cnn.onnx"))
    x, y = load_idx_dataset(args.data, "train")
    xt, yt = load_idx_dataset(args.data, "test")
    start = time.perf_counter()
    if args.search:
        proto, report = search(original, x, y, test_x=xt, test_y=yt, seed=args.seed,
                               budget=args.budget, progress=True)
    else:
        proto, report = convert(original, x, calibration_labels=y, eval_x=xt, eval_y=yt,
                                pow2_terms=args.pow2_terms, finetune_epochs=args.finetune_epochs,
                                finetune_lr=args.finetune_lr,
                                distillation=args.distillation, progress=True)
    convert_s = time.perf_counter() - start
    save_atomically(proto, out / f"{args.name}_cnn.she.onnx")
    summary = {"command": command, "training_command": training["command"],
               "seconds": {"train": training["seconds"], "convert": round(convert_s)},
               **report.as_dict()}
    record.write_text(json.dumps(summary, indent=2) + "\n")
    for stage in report.stages:
        print(f"  {stage.name}: {stage.accuracy:.2%}")
    print(f"converted in {convert_s:.0f} s; parameters {report.parameters}")


if __name__ == "__main__":
    main()
