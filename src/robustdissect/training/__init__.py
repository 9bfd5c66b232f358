"""Training: one loop, pluggable objectives."""

from ..modelutil import accuracy
from .loop import TrainConfig, TrainResult, make_model_for, make_objective, train
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
    "train",
]
