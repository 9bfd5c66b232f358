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
    name = "vanilla"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = model(x)
        return StepOutput(F.cross_entropy(logits, y), logits, {})

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}
