"""Training: one loop, pluggable objectives."""

from .loop import TrainConfig, TrainResult, accuracy, make_model_for, pick_device, train
from .objectives import OBJECTIVES, Objective, StepOutput, Vanilla

__all__ = [
    "OBJECTIVES",
    "Objective",
    "StepOutput",
    "TrainConfig",
    "TrainResult",
    "Vanilla",
    "accuracy",
    "make_model_for",
    "pick_device",
    "train",
]
