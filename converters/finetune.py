"""Distillation fine-tuning of a converted model against the original's logits.

The converted model runs as a :class:`~converters.torch_graph.TorchGraph`; its weights,
biases and polynomial coefficients are trained to reproduce the original model's logits on
the calibration data (mean squared error), with power-of-two weights through a
straight-through estimator. A progress bar shows the epochs.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from .torch_graph import TorchGraph


def finetune(model: onnx.ModelProto, x: np.ndarray, teacher_logits: np.ndarray, *,
             epochs: int = 3, lr: float = 1e-3, batch_size: int = 128,
             pow2_bits: int | None = None, pow2_terms: int = 1,
             labels: np.ndarray | None = None,
             progress: bool = True, seed: int = 0) -> list[float]:
    """Train ``model`` in place; returns the mean loss of every epoch.

    The loss is the mean squared error to ``teacher_logits``, plus the cross-entropy to
    ``labels`` when they are given (the true classes help where the student cannot
    reproduce every logit of the teacher).
    """
    torch.manual_seed(seed)
    student = TorchGraph(model, pow2_bits=pow2_bits, pow2_terms=pow2_terms)
    optimiser = torch.optim.Adam(student.parameters(), lr=lr)
    steps = max(1, epochs * (len(x) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    xs = torch.from_numpy(np.asarray(x, np.float32))
    ys = torch.from_numpy(np.asarray(teacher_logits, np.float32))
    classes = None if labels is None else torch.from_numpy(np.asarray(labels, np.int64))
    losses = []
    bar = _bar(epochs * ((len(xs) + batch_size - 1) // batch_size), progress)
    for _ in range(epochs):
        order = torch.randperm(len(xs))
        total, count = 0.0, 0
        student.train()
        for i in range(0, len(xs), batch_size):
            idx = order[i:i + batch_size]
            optimiser.zero_grad()
            out = student(xs[idx])
            loss = nn.functional.mse_loss(out, ys[idx])
            if classes is not None:
                loss = loss + nn.functional.cross_entropy(out, classes[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError("fine-tuning diverged (non-finite loss); lower lr")
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
            count += len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / count:.4f}")
        losses.append(total / count)
    if bar is not None:
        bar.close()
    student.write_back()
    return losses


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="fine-tuning", unit="batch")
