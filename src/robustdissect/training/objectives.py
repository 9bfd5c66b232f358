"""Training objectives: each maps (model, x, y) to a scalar loss plus the clean logits.

Robust objectives (PAT, ALP, TRADES, fast AT, SNS) register here too; the loop stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, differentiable
    logits: torch.Tensor  # (N, K) logits on the clean batch, for running accuracy
    extra: dict[str, float]


class Objective(Protocol):
    name: str

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput: ...

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None: ...

    def describe(self) -> dict[str, Any]: ...


OBJECTIVES: Registry[Any] = Registry("objective")


@OBJECTIVES.register("vanilla", "standard cross-entropy training")
class Vanilla:
    """Cross-entropy; `label_smoothing` in [0, 1) mixes the one-hot targets with the uniform
    distribution (Szegedy et al. 2016), a non-adversarial baseline of METHODS §2.4."""

    name = "vanilla"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise TypeError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(x)
        return StepOutput(F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits, {})

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        if self.label_smoothing:
            return {"name": self.name, "label_smoothing": self.label_smoothing}
        return {"name": self.name}
