"""Pipeline stages; importing this package registers them in `STAGES` (`stages.base`)."""

from . import (  # noqa: F401
    compare,
    concepts,
    diagnose,
    evaluate,
    explorer,
    features,
    landscape,
    metric,
    overview,
    pushback,
    sensitivity,
)
from .base import STAGES

__all__ = ["STAGES"]
