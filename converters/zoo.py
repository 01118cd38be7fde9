"""Ordinary (not HE-friendly) networks and their training, used by the conversion
benchmarks and tests: what a model owner brings to ``she convert``."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from she.data import load_idx_dataset


def small_relu_cnn(channels: int = 8, hidden: int = 64) -> nn.Module:
    """Conv(5x5, stride 2) + BatchNorm + ReLU + MaxPool, Dropout, Linear + ReLU, Linear."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 5, stride=2, padding=2), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.1),
        nn.Linear(channels * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(model: nn.Module, data_dir: str, epochs: int = 5, lr: float = 3e-3,
          seed: int = 0, log=print) -> tuple[nn.Module, float]:
    """Train on the IDX training split; returns the model (eval mode) and test accuracy."""
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    x, y = (torch.from_numpy(a) for a in load_idx_dataset(data_dir, "train"))
    xt, yt = load_idx_dataset(data_dir, "test")
    opt = torch.optim.Adam(model.parameters(), lr)
    steps = epochs * ((len(x) + 127) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        start = time.time()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
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
    """A GHN network (analytic bias, no batch norm) with quadratic activations."""
    from .ghn import GHNConv2d, GHNLinear, Quadratic

    return nn.Sequential(
        GHNConv2d(1, channels, 5, stride=2, padding=2), Quadratic(channels, spatial=True),
        nn.AvgPool2d(2), nn.Flatten(), GHNLinear(channels * 7 * 7, hidden),
        Quadratic(hidden, spatial=False), GHNLinear(hidden, 10))
