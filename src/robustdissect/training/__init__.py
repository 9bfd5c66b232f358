"""Training: one loop, pluggable objectives."""

from .loop import TrainConfig, TrainResult, accuracy, make_model_for, make_objective, pick_device, train
from .objectives import OBJECTIVES, Objective, StepOutput, Vanilla
from .robust import ALP, PAT, TRADES, FastAT
from .sns import SNS

__all__ = [
    "ALP",
    "OBJECTIVES",
    "PAT",
    "SNS",
    "TRADES",
    "FastAT",
    "Objective",
    "StepOutput",
    "TrainConfig",
    "TrainResult",
    "Vanilla",
    "accuracy",
    "make_model_for",
    "make_objective",
    "pick_device",
    "train",
]
