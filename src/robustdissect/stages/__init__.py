"""Pipeline stages; importing this package registers them in `pipeline.STAGES`."""

from ..pipeline import STAGES
from . import concepts, evaluate, features, landscape, metric, overview, pushback, sensitivity, training  # noqa: F401

__all__ = ["STAGES"]
