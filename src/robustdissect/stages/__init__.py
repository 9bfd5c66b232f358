"""Pipeline stages; importing this package registers them in `pipeline.STAGES`."""

from ..pipeline import STAGES
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

__all__ = ["STAGES"]
