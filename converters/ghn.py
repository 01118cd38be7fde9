"""Generalized Hamming Network layers for PyTorch (Fan, NeurIPS 2017).

A GHN layer computes ``h = (2/L) w.x - mean(w) - mean(x)`` with ``L`` the fan-in; for a
convolution ``mean(x)`` is taken over each patch. The analytic bias ``-mean(w)`` replaces
batch normalisation. Both means are written as linear operations with constant weights
(``mean(x)`` is a convolution / matrix product with ``1/L``), so an exported GHN model is an
ordinary affine graph: SHE runs it exactly, without any rewriting.

:class:`DoubleThreshold` is GHN's activation: it keeps both extremes of ``h`` and damps the
band ``|h| < t`` (``f(h) = h - (1 - rho) * clip(h, -t, t)``). It is not a polynomial; train
GHN networks for encryption with :class:`Quadratic` instead, or let ``she convert`` fit one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GHNLinear(nn.Module):
    """``h = (2/L) x W^T - mean(W, rows) - mean(x)`` with ``L = in_features``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("mean_x", torch.full((1, in_features), 1.0 / in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2.0 / self.in_features
        return (scale * F.linear(x, self.weight) - self.weight.mean(dim=1)
                - F.linear(x, self.mean_x))


class GHNConv2d(nn.Module):
    """Convolutional GHN layer: ``mean(x)`` over each ``in_channels x k x k`` patch."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.stride, self.padding = stride, padding
        self.fan_in = in_channels * kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size,
                                               kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("mean_x", torch.full((1, in_channels, kernel_size, kernel_size),
                                                  1.0 / self.fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wx = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        mx = F.conv2d(x, self.mean_x, stride=self.stride, padding=self.padding)
        mw = self.weight.mean(dim=(1, 2, 3)).view(1, -1, 1, 1)
        return (2.0 / self.fan_in) * wx - mw - mx


class DoubleThreshold(nn.Module):
    """``f(h) = h - (1 - rho) * clip(h, -t, t)``: extremes kept, middle band damped."""

    def __init__(self, threshold: float = 0.1, rho: float = 0.0) -> None:
        super().__init__()
        self.threshold, self.rho = threshold, rho

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h - (1.0 - self.rho) * torch.clamp(h, -self.threshold, self.threshold)


class Quadratic(nn.Module):
    """Learnable per-channel ``a (x + b)^2 + c``: an HE-friendly activation."""

    def __init__(self, channels: int, spatial: bool, a: float = 0.1) -> None:
        super().__init__()
        shape = (1, channels, 1, 1) if spatial else (1, channels)
        self.a = nn.Parameter(torch.full(shape, a))
        self.b = nn.Parameter(torch.zeros(shape))
        self.c = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x + self.b
        return self.a * (t * t) + self.c
