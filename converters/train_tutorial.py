"""Train the TenSEAL-tutorial MNIST network that the plain-TenSEAL baselines run.

Architecture (input: raw pixels in ``[0, 1]``, shape ``N x 1 x 28 x 28``)::

    Conv2d(1, 4, 7x7, stride 3, no padding)  # 28x28 -> 4 x 8 x 8 = 256
    -> x * x -> Flatten -> Linear(256, 64) -> x * x -> Linear(64, 10)

This is the network of TenSEAL's "Encrypted evaluation on MNIST" tutorial. The squares are
written as ``x * x`` so that the exported ONNX graph holds only ``Conv, Mul, Flatten, Gemm``.
Training follows the tutorial (Adam, learning rate 1e-3, batch 64, cross entropy) on the
60 000 training images; the script prints the test accuracy, exports the ONNX file (opset
17, input ``input`` with a dynamic batch axis, output ``logits``), checks it with
onnxruntime and checks that ``she.load`` and ``she.compile`` accept it. Run from the
repository root::

    python -m converters.train_tutorial [--data ../shared/data/mnist] [--epochs 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import she
from converters.train_demo import (
    accuracy,
    batches,
    export_onnx,
    load_split,
    predict,
    progress,
    seed_everything,
)

DEFAULT_OUT = "she/assets/tutorial_cnn.onnx"
DEFAULT_DATA = "../shared/data/mnist"
#: The only operators the exported graph may contain.
ALLOWED_OPS = frozenset({"Conv", "Mul", "Flatten", "Reshape", "Gemm"})
#: Largest acceptable |torch - onnxruntime| difference, relative to max |logit|.
MAX_RELATIVE_DIFF = 1e-5
#: Calibration images handed to ``she.compile`` in the acceptance check.
CALIBRATION_SAMPLES = 512


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (the tutorial's)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    threads: int = 2


class Square(nn.Module):
    """``x * x`` (exported as ``Mul(x, x)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class TutorialNet(nn.Module):
    """The TenSEAL tutorial network (see the module docstring)."""

    def __init__(self, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=7, stride=3, padding=0)
        self.act1 = Square()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(256, hidden)
        self.act2 = Square()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.flatten(self.act1(self.conv(x)))
        return self.fc2(self.act2(self.fc1(h)))


def train_epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    train_set: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    generator: torch.Generator,
    desc: str,
) -> float:
    """One pass over the shuffled training set; returns the mean training loss."""
    x_train, y_train = train_set
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    order = torch.randperm(len(x_train), generator=generator)
    steps = -(-len(order) // config.batch_size)
    total, seen = 0.0, 0
    for idx in progress((order[s] for s in batches(len(order), config.batch_size)), steps, desc):
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    if not np.isfinite(total):
        raise RuntimeError(f"training diverged ({desc}, loss {total})")
    return total / seen


def train(
    config: TrainConfig,
    train_set: tuple[torch.Tensor, torch.Tensor],
    test_set: tuple[torch.Tensor, torch.Tensor],
) -> TutorialNet:
    """Train a :class:`TutorialNet`, printing loss and test accuracy after every epoch."""
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(config.seed)
    model = TutorialNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        loss = train_epoch(model, optimiser, train_set, config, generator, f"epoch {epoch}/{config.epochs}")
        test_acc = accuracy(predict(model, test_set[0]), test_set[1])
        print(
            f"epoch {epoch}/{config.epochs}: train loss {loss:.4f}, test accuracy {test_acc:.2%} "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    return model.eval()


def check_graph(proto: onnx.ModelProto) -> list[str]:
    """The graph's operator types; raises if any is outside :data:`ALLOWED_OPS`."""
    ops = [node.op_type for node in proto.graph.node]
    extra = sorted(set(ops) - ALLOWED_OPS)
    if extra:
        raise RuntimeError(f"exported graph holds unexpected operators {extra}")
    return ops


def verify_onnx(
    path: Path, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """onnxruntime accuracy on ``images`` and the relative max |torch - onnxruntime| difference."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate(
        [session.run(["logits"], {"input": images[s].numpy()})[0] for s in batches(len(images), 2000)]
    )
    reference = predict(model, images).numpy()
    diff = float(np.abs(logits - reference).max() / max(np.abs(reference).max(), 1e-12))
    if diff > MAX_RELATIVE_DIFF:
        raise RuntimeError(f"onnxruntime and torch disagree: relative max |diff| {diff:.2e}")
    return accuracy(logits, labels), diff


def check_she(path: Path, calibration: np.ndarray) -> str:
    """Load ``path`` with ``she.load`` and compile it with calibration data; returns a summary."""
    plan = she.compile(she.load(path), calibration=calibration)
    params = plan.params
    return f"she.compile: N={params.poly_modulus_degree}, {len(params.primes)} primes, depth {plan.depth}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m converters.train_tutorial", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--data", default=DEFAULT_DATA, help="directory holding the MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--out", default=DEFAULT_OUT, help="path of the ONNX file to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train, export, verify; print a summary."""
    args = parse_args(argv)
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    train_set = load_split(args.data, "train")
    x_test, y_test = load_split(args.data, "test")
    print(f"training on {len(train_set[0])} images, testing on {len(x_test)}: {config}")
    start = time.perf_counter()
    model = train(config, train_set, (x_test, y_test))
    print(f"training time {time.perf_counter() - start:.1f} s")

    out = Path(args.out)
    proto = export_onnx(model, out)
    ops = check_graph(proto)
    ort_acc, diff = verify_onnx(out, model, x_test, y_test)
    torch_acc = accuracy(predict(model, x_test), y_test)
    print(f"test accuracy: torch {torch_acc:.2%}, onnxruntime {ort_acc:.2%} (relative diff {diff:.1e})")
    print("ONNX nodes:", ", ".join(ops))
    print(check_she(out, train_set[0][:CALIBRATION_SAMPLES].numpy()))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
