"""Train the small HE-friendly MNIST CNN that SHE ships as its demo model.

Architecture (raw pixels in [0, 1], no normalisation layer)::

    Conv(1->5, 5x5, stride 2, pad 1) -> quadratic -> Flatten -> Linear(845, 100)
    -> quadratic -> Linear(100, 10)

The quadratic activation is ``a * (x + b)^2 + c`` with per-channel ``a, b, c``, written so
that the ONNX export contains only Add, Mul(t, t), Mul and Add. Run::

    python -m converters.train_demo --data ../shared/data/mnist --out-dir she/assets
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from she.data import load_idx_dataset

SAMPLES = 300


class Quadratic(nn.Module):
    """Learnable per-channel ``a * (x + b)^2 + c`` (channels on axis 1)."""

    def __init__(self, channels: int, spatial: bool) -> None:
        super().__init__()
        shape = (1, channels, 1, 1) if spatial else (1, channels)
        self.a = nn.Parameter(torch.full(shape, 0.1))
        self.b = nn.Parameter(torch.zeros(shape))
        self.c = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x + self.b
        return self.a * (t * t) + self.c


class DemoNet(nn.Module):
    """The shipped demo network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 5, kernel_size=5, stride=2, padding=1)
        self.act1 = Quadratic(5, spatial=True)
        self.fc1 = nn.Linear(845, 100)
        self.act2 = Quadratic(100, spatial=False)
        self.fc2 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv(x))
        h = self.act2(self.fc1(torch.flatten(h, 1)))
        return self.fc2(h)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
    return float((pred == y).float().mean())


def train(data_dir: str, epochs: int, seed: int = 0) -> tuple[DemoNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(2)
    x_train, y_train = (torch.from_numpy(a) for a in load_idx_dataset(data_dir, "train"))
    x_test, y_test = (torch.from_numpy(a) for a in load_idx_dataset(data_dir, "test"))
    model = DemoNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * (len(x_train) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        start = time.time()
        order = torch.randperm(len(x_train))
        for i in range(0, len(x_train) - 127, 128):
            idx = order[i:i + 128]
            batch = x_train[idx]
            # light augmentation: random shifts of up to 1 pixel
            dx, dy = np.random.randint(-1, 2, size=2)
            batch = torch.roll(batch, shifts=(int(dx), int(dy)), dims=(2, 3))
            optimiser.zero_grad()
            loss = loss_fn(model(batch), y_train[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimiser.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, test accuracy "
              f"{accuracy(model, x_test, y_test):.4%} ({time.time() - start:.0f}s)", flush=True)
    return model, x_test, y_test


def export(model: DemoNet, path: Path) -> None:
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    torch.onnx.export(model, (dummy,), str(path), input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    for key, value in (("she.input_range", "0,1"), ("she.dataset", "mnist"),
                       ("she.classes", "10")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="directory with MNIST IDX files")
    parser.add_argument("--out-dir", default="she/assets")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, x_test, y_test = train(args.data, args.epochs)
    export(model, out / "mnist_demo.onnx")

    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "mnist_demo.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x_test.numpy()})[0]
    with torch.no_grad():
        reference = model(x_test[:1000]).numpy()
    print(f"onnxruntime test accuracy {np.mean(logits.argmax(1) == y_test.numpy()):.4%}, "
          f"max |torch - onnxruntime| {np.abs(logits[:1000] - reference).max():.2e}")
    images = np.round(x_test[:SAMPLES, 0].numpy() * 255).astype(np.uint8)
    np.savez_compressed(out / "mnist_samples.npz", images=images,
                        labels=y_test[:SAMPLES].numpy().astype(np.int64))


if __name__ == "__main__":
    main()
