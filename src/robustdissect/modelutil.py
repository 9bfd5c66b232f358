"""Small helpers for any `nn.Module`: its device, eval mode with the flags restored, predictions."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["accuracy", "eval_mode", "model_device", "predict"]


def model_device(model: nn.Module, default: torch.device | str | None = None) -> torch.device:
    """The device of the model's first parameter, else of its first buffer, else `default`
    (CPU when `default` is None): stateless modules have no device of their own."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu") if default is None else torch.device(default)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each module's own training flag on exit, also
    after an exception (so modules that were deliberately left in eval mode, e.g. frozen
    BatchNorm inside a training model, stay that way)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels (N,) int64 on the CPU for images x (N, C, H, W); eval mode, no grad,
    batches of `batch_size` on the model's device."""
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        preds = [model(x[s : s + batch_size].to(device)).argmax(1).cpu() for s in range(0, x.shape[0], batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of the model (eval mode, no grad) on x (N, C, H, W), y (N,); NaN for N = 0."""
    if x.shape[0] == 0:
        return math.nan
    return int((predict(model, x, batch_size) == y.cpu()).sum()) / x.shape[0]
