"""Ordinary (not HE-friendly) networks and their training, used by the conversion
benchmarks and tests: what a model owner brings to ``she convert``."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from she.io.data import load_idx_dataset


def small_relu_cnn(channels: int = 8, hidden: int = 64) -> nn.Module:
    """Conv(5x5, stride 2) + BatchNorm + ReLU + MaxPool, Dropout, Linear + ReLU, Linear."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 5, stride=2, padding=2), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.1),
        nn.Linear(channels * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def two_conv_relu_cnn(channels: tuple[int, int] = (32, 64), hidden: int = 128) -> nn.Module:
    """Two Conv + BatchNorm + ReLU blocks (5x5 and 3x3, stride 2), MaxPool, Dropout,
    Linear + ReLU, Linear: an ordinary MNIST-class CNN near 99.4 % on MNIST."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 5, stride=2, padding=2), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(c2 * 3 * 3, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def fast_relu_cnn(channels: tuple[int, int] = (16, 64)) -> nn.Module:
    """Two Conv + BatchNorm + ReLU blocks (5x5 and 3x3, stride 2), Dropout, Linear: an
    ordinary CNN sized for encrypted latency. Two activations (two levels) and no layer wider
    than 4096 values (14x14x16 and 7x7x64 with the default channels), so single packing
    fits the N=8192 ring (measured: a rotation 1.75 ms with 3 primes, against 13.2 ms at
    N=16384 with 7)."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 5, stride=2, padding=2), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(c2 * 7 * 7, 10))


def pooled_relu_cnn(channels: tuple[int, ...] = (32, 64), hidden: int = 128) -> nn.Module:
    """Two Conv (stride 1) + BatchNorm + AvgPool + ReLU blocks, with a third channel count a
    Conv 3x3 + BatchNorm + ReLU on the 7x7 map, AvgPool, two dense layers: pooling ahead of
    the first two activations, so they act on 4x fewer values (what an encrypted square
    costs) while the convolutions see the full resolution."""
    if len(channels) not in (2, 3):
        raise ValueError(f"pooled_relu_cnn takes two or three channel counts, not {channels}")
    c1, c2 = channels[:2]
    layers: list[nn.Module] = [
        nn.Conv2d(1, c1, 5, padding=2), nn.BatchNorm2d(c1), nn.AvgPool2d(2), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.AvgPool2d(2), nn.ReLU()]
    if len(channels) == 3:
        layers += [nn.Conv2d(c2, channels[2], 3, padding=1), nn.BatchNorm2d(channels[2]),
                   nn.ReLU()]
    return nn.Sequential(*layers, nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(channels[-1] * 3 * 3, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def shallow_relu_cnn(channels: int = 16) -> nn.Module:
    """Conv(5x5, stride 2) + BatchNorm + ReLU + MaxPool, Flatten, Linear: one activation,
    so its converted model has depth 1 (what BFV's exact integer arithmetic can hold)."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 5, stride=2, padding=2), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * 7 * 7, 10))


def relu_mlp(hidden: int = 64) -> nn.Module:
    """Flatten, Linear(784, hidden) + ReLU, Linear(hidden, 10): the smallest ordinary MNIST
    network, the MLP that the Concrete ML comparison runs on both toolkits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def tutorial_relu_cnn(hidden: int = 64) -> nn.Module:
    """The TenSEAL-tutorial architecture (Conv 4 x 7x7 stride 3, Linear 256 -> hidden ->
    10) with ReLU where the tutorial squares: the ordinary network a model owner would
    train, which the Concrete ML comparison runs on both toolkits."""
    return nn.Sequential(nn.Conv2d(1, 4, 7, stride=3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def random_shift(batch: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift every image independently by up to ``max_shift`` pixels in x and y (zero fill)."""
    if max_shift == 0:
        return batch
    n, _, height, width = batch.shape
    padded = nn.functional.pad(batch, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(height)  # (n, H)
    cols = offsets[:, 1, None] + torch.arange(width)  # (n, W)
    index = torch.arange(n)[:, None, None]
    return padded[:, 0][index, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train(model: nn.Module, data_dir: str, epochs: int = 5, lr: float = 3e-3,
          seed: int = 0, log=print, max_shift: int = 0,
          threads: int = 2, flip: bool = False) -> tuple[nn.Module, float]:
    """Train on the IDX training split; returns the model (eval mode) and test accuracy.

    ``max_shift`` > 0 augments every batch with random translations of up to that many
    pixels, and ``flip`` with random horizontal mirroring (for clothes, not digits);
    ``threads`` is torch's thread count.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    x, y = (torch.from_numpy(a) for a in load_idx_dataset(data_dir, "train"))
    xt, yt = load_idx_dataset(data_dir, "test")
    opt = torch.optim.Adam(model.parameters(), lr)
    steps = epochs * ((len(x) + 127) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        start = time.time()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            opt.zero_grad()
            images = random_shift(x[idx], max_shift, generator)
            if flip:
                mirror = torch.rand(len(idx), generator=generator) < 0.5
                images[mirror] = images[mirror].flip(-1)
            nn.functional.cross_entropy(model(images), y[idx]).backward()
            opt.step()
            schedule.step()
        log(f"  epoch {epoch + 1}/{epochs}: test accuracy {accuracy(model, xt, yt):.2%} "
            f"({time.time() - start:.0f}s)")
    return model.eval(), accuracy(model, xt, yt)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 2000])).argmax(1)
                          for i in range(0, len(x), 2000)])
    return float((pred.numpy() == y).mean())


def ghn_cnn(channels: int = 8, hidden: int = 64) -> nn.Module:
    """A GHN network (analytic bias, no batch norm) with quadratic activations; pooling
    before the activation keeps the squares on the 7x7 map."""
    from converters.ghn import GHNConv2d, GHNLinear, Quadratic

    return nn.Sequential(
        GHNConv2d(1, channels, 5, stride=2, padding=2), nn.AvgPool2d(2),
        Quadratic(channels, spatial=True), nn.Flatten(), GHNLinear(channels * 7 * 7, hidden),
        Quadratic(hidden, spatial=False), GHNLinear(hidden, 10))


class _ResidualBlock(nn.Module):
    """Conv 3x3 + BatchNorm + ReLU, Conv 3x3 + BatchNorm, plus the input (identity) or its
    1x1 projection + BatchNorm (when the stride or the channels change); ReLU after the
    addition: torchvision's basic block."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResidualReluCNN(nn.Module):
    """A small ResNet: stem Conv 5x5 stride 2 + BatchNorm + ReLU, a projection block
    (stride 2) and ``blocks - 1`` identity blocks, global average pooling
    (``x.mean(dim=(2, 3))``), Linear."""

    def __init__(self, channels: tuple[int, int] = (16, 48), blocks: int = 2,
                 classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.stem = nn.Sequential(nn.Conv2d(1, c1, 5, stride=2, padding=2, bias=False),
                                  nn.BatchNorm2d(c1), nn.ReLU())
        self.blocks = nn.Sequential(_ResidualBlock(c1, c2, stride=2),
                                    *(_ResidualBlock(c2, c2) for _ in range(blocks - 1)))
        self.fc = nn.Linear(c2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def residual_relu_cnn(channels: tuple[int, int] = (16, 48), blocks: int = 2) -> nn.Module:
    """:class:`ResidualReluCNN`: an ordinary small ResNet for 28x28 images."""
    return ResidualReluCNN(channels, blocks)


def wide_relu_cnn(channels: tuple[int, int, int] = (32, 64, 64), hidden: int = 128) -> nn.Module:
    """Three Conv 3x3 + BatchNorm + ReLU layers (the first two stride 2), MaxPool,
    Linear + ReLU, Linear: a wider/deeper plain CNN."""
    c1, c2, c3 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.Conv2d(c2, c3, 3, padding=1), nn.BatchNorm2d(c3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c3 * 3 * 3, hidden), nn.ReLU(),
        nn.Linear(hidden, 10))
