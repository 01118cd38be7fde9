"""Train the small HE-friendly MNIST CNN that SHE ships as its demo model.

Architecture (input: raw pixels in ``[0, 1]``, no normalisation layer)::

    Conv2d(1, 5, 5x5, stride 2, padding 1) -> PolyAct(5) -> Flatten
    -> Linear(845, 100) -> PolyAct(100) -> Linear(100, 10)

:class:`PolyAct` is a learnable per-channel quadratic ``a * (x + b)^2 + c``. Its forward pass
is written as ``t = x + b; y = a * (t * t) + c`` so that the exported ONNX graph holds only
``Add, Mul(t, t), Mul, Add`` for it (no ``Pow``, no ``Relu``): a multiplicative depth of one
per activation under CKKS.

The script trains with Adam and a one-cycle learning-rate schedule on the 60 000 training
images, exports ``mnist_demo.onnx`` (opset 17, a single self-contained file with SHE's
metadata), checks it with onnxruntime on the 10 000 test images and writes
``mnist_samples.npz`` (the first 300 test digits). Run from the repository root::

    python -m converters.train_demo --data /path/to/mnist --out-dir she/assets [--epochs N]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import external_data_helper
from torch import nn

from converters.zoo import random_shift
from she.io.data import load_idx_dataset

try:  # progress bars are optional
    from tqdm import tqdm
except ImportError:  # pragma: no cover - depends on the environment
    tqdm = None

MODEL_FILE = "mnist_demo.onnx"
SAMPLES_FILE = "mnist_samples.npz"
#: Number of test images shipped in the samples file.
SAMPLE_COUNT = 300
#: Metadata SHE reads from the model file.
METADATA = {"she.input_range": "0,1", "she.dataset": "mnist", "she.classes": "10"}
#: Largest acceptable |torch - onnxruntime| difference of the logits.
MAX_LOGIT_DIFF = 1e-4
#: Size budget for model + samples together.
MAX_ASSET_BYTES = 2 * 1024 * 1024
OPSET = 17


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run."""

    epochs: int = 20
    batch_size: int = 128
    max_lr: float = 3e-3
    weight_decay: float = 0.0
    clip_norm: float = 5.0
    max_shift: int = 1
    seed: int = 0
    threads: int = 2


class PolyAct(nn.Module):
    """Learnable per-channel quadratic activation ``y = a * (x + b)^2 + c``.

    The channel axis is axis 1. With ``spatial=True`` the coefficients have shape
    ``(1, C, 1, 1)`` and broadcast over height and width (after a convolution); otherwise
    they have shape ``(1, C)`` (after a dense layer).
    """

    def __init__(self, channels: int, spatial: bool, init_a: float = 0.25) -> None:
        super().__init__()
        shape = (1, channels, 1, 1) if spatial else (1, channels)
        self.a = nn.Parameter(torch.full(shape, init_a))
        self.b = nn.Parameter(torch.zeros(shape))
        self.c = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written out so that the ONNX export is Add, Mul(t, t), Mul, Add.
        t = x + self.b
        y = self.a * (t * t) + self.c
        return y


class DemoNet(nn.Module):
    """The shipped demo network (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 5, kernel_size=5, stride=2, padding=1)
        self.act1 = PolyAct(5, spatial=True)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(845, 100)
        self.act2 = PolyAct(100, spatial=False)
        self.fc2 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv(x))
        h = self.act2(self.fc1(self.flatten(h)))
        return self.fc2(h)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_split(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One MNIST split as ``(images float32 (n, 1, 28, 28) in [0, 1], labels int64 (n,))``."""
    images, labels = load_idx_dataset(data_dir, split)
    return torch.from_numpy(images), torch.from_numpy(labels)


def batches(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of length ``size`` (the last one may be shorter)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def progress(items: Iterable[torch.Tensor], total: int, desc: str) -> Iterable[torch.Tensor]:
    """Wrap ``items`` in a tqdm bar when tqdm is installed."""
    if tqdm is None:
        return items
    return tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) for ``images``."""
    model.eval()
    return torch.cat([model(images[s]) for s in batches(len(images), batch_size)])


def accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Fraction of rows of ``logits`` whose argmax equals the label."""
    return float(np.mean(np.asarray(logits).argmax(1) == np.asarray(labels)))


def train(
    config: TrainConfig,
    train_set: tuple[torch.Tensor, torch.Tensor],
    test_set: tuple[torch.Tensor, torch.Tensor],
) -> DemoNet:
    """Train a :class:`DemoNet`, printing the loss and test accuracy after every epoch."""
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    generator = torch.Generator().manual_seed(config.seed)
    x_train, y_train = train_set
    x_test, y_test = test_set

    model = DemoNet()
    optimiser = torch.optim.Adam(
        model.parameters(), lr=config.max_lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = -(-len(x_train) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.max_lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        index_batches = (order[s] for s in batches(len(order), config.batch_size))
        total_loss, seen = 0.0, 0
        for idx in progress(index_batches, steps_per_epoch, f"epoch {epoch}/{config.epochs}"):
            images = random_shift(x_train[idx], config.max_shift, generator)
            loss = loss_fn(model(images), y_train[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimiser.step()
            schedule.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
        if not np.isfinite(total_loss):
            raise RuntimeError(f"training diverged in epoch {epoch} (loss {total_loss})")
        test_acc = accuracy(predict(model, x_test), y_test)
        print(
            f"epoch {epoch}/{config.epochs}: train loss {total_loss / seen:.4f}, "
            f"test accuracy {test_acc:.2%} ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    return model.eval()


@torch.no_grad()
def activation_report(model: DemoNet, images: torch.Tensor) -> dict[str, dict[str, float]]:
    """Coefficient ranges of each :class:`PolyAct` and the largest input magnitudes it sees.

    ``max_abs_x`` is ``max |x|`` over ``images`` and ``max_abs_t`` is ``max |x + b|`` (the
    value that gets squared) — the numbers that matter when choosing encryption scales.
    """
    report: dict[str, dict[str, float]] = {}
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, PolyAct):
            continue
        entry = report.setdefault(name, {"max_abs_x": 0.0, "max_abs_t": 0.0})
        for coef in ("a", "b", "c"):
            value = getattr(module, coef)
            entry[f"{coef}_min"], entry[f"{coef}_max"] = float(value.min()), float(value.max())

        def hook(
            mod: nn.Module,
            inputs: tuple[torch.Tensor],
            _out: torch.Tensor,
            entry: dict[str, float] = entry,
        ) -> None:
            x = inputs[0]
            entry["max_abs_x"] = max(entry["max_abs_x"], float(x.abs().max()))
            entry["max_abs_t"] = max(entry["max_abs_t"], float((x + mod.b).abs().max()))

        handles.append(module.register_forward_hook(hook))
    try:
        predict(model, images)
    finally:
        for handle in handles:
            handle.remove()
    return report


def export_onnx(model: DemoNet, path: Path) -> onnx.ModelProto:
    """Export ``model`` to ``path`` as one self-contained ONNX file with SHE's metadata.

    Uses the TorchScript exporter (``dynamo=False``): the dynamo exporter needs onnxscript
    and targets opset 18+. The export goes to a temporary directory first; any external
    data file the exporter writes is pulled inline and discarded with that directory.
    """
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / path.name
        with warnings.catch_warnings():  # the legacy exporter announces its own deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(raw_path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(raw_path), load_external_data=True)
    external_data_helper.convert_model_from_external_data(proto)  # all tensors inline
    del proto.metadata_props[:]
    for key, value in METADATA.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    stray = Path(f"{path}.data")
    if stray.exists():
        stray.unlink()
    return proto


def verify_onnx(
    path: Path, model: DemoNet, images: torch.Tensor, labels: torch.Tensor, compare: int = 1000
) -> tuple[float, float]:
    """Run ``path`` with onnxruntime on ``images``.

    Returns ``(accuracy, max |torch - onnxruntime|)``, the difference taken over the first
    ``compare`` images; raises if that difference exceeds :data:`MAX_LOGIT_DIFF`.
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate(
        [
            session.run(["logits"], {"input": images[s].numpy()})[0]
            for s in batches(len(images), 2000)
        ]
    )
    reference = predict(model, images[:compare]).numpy()
    diff = float(np.abs(logits[:compare] - reference).max())
    if diff > MAX_LOGIT_DIFF:
        raise RuntimeError(f"onnxruntime and torch disagree: max |diff| {diff:.2e}")
    return accuracy(logits, labels), diff


def write_samples(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Save the first :data:`SAMPLE_COUNT` test digits as uint8 ``images`` + int64 ``labels``."""
    pixels = images[:SAMPLE_COUNT, 0].numpy() * 255.0
    as_uint8 = np.rint(pixels).astype(np.uint8)
    if np.abs(pixels - as_uint8).max() > 1e-3:  # the IDX data are 8-bit: must round-trip
        raise RuntimeError("test images are not 8-bit values scaled to [0, 1]")
    np.savez_compressed(
        path, images=as_uint8, labels=labels[:SAMPLE_COUNT].numpy().astype(np.int64)
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m converters.train_demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", required=True, help="directory holding the MNIST IDX files")
    parser.add_argument("--out-dir", default="she/assets", help="where to write the assets")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train, export, verify and write the samples; print a summary."""
    args = parse_args(argv)
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    train_set = load_split(args.data, "train")
    x_test, y_test = load_split(args.data, "test")
    print(f"training on {len(train_set[0])} images, testing on {len(x_test)}: {config}")
    start = time.perf_counter()
    model = train(config, train_set, (x_test, y_test))
    train_seconds = time.perf_counter() - start
    torch_acc = accuracy(predict(model, x_test), y_test)

    model_path, samples_path = out_dir / MODEL_FILE, out_dir / SAMPLES_FILE
    proto = export_onnx(model, model_path)
    ort_acc, diff = verify_onnx(model_path, model, x_test, y_test)
    write_samples(samples_path, x_test, y_test)
    sizes = {p.name: p.stat().st_size for p in (model_path, samples_path)}

    print(f"training time {train_seconds:.1f} s")
    print(
        f"test accuracy: torch {torch_acc:.2%}, onnxruntime {ort_acc:.2%} "
        f"(max |torch - onnxruntime| {diff:.2e} on the first 1000 images)"
    )
    print("ONNX nodes:", ", ".join(node.op_type for node in proto.graph.node))
    for name, size in sizes.items():
        print(f"{name}: {size} bytes")
    for name, stats in activation_report(model, x_test).items():
        print(
            f"{name}: a [{stats['a_min']:.4f}, {stats['a_max']:.4f}], "
            f"b [{stats['b_min']:.4f}, {stats['b_max']:.4f}], "
            f"c [{stats['c_min']:.4f}, {stats['c_max']:.4f}], "
            f"max |x| {stats['max_abs_x']:.3f}, max |x + b| {stats['max_abs_t']:.3f}"
        )
    if sum(sizes.values()) > MAX_ASSET_BYTES:
        raise RuntimeError(f"assets take {sum(sizes.values())} bytes, over the 2 MB budget")


if __name__ == "__main__":
    main()
