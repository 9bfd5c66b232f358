"""robustdissect: dissect the adversarial robustness of image classifiers, feature by feature.

    import robustdissect as rd
    model, card = rd.models.load_checkpoint("fmnist-smallcnn-vanilla")
    data = rd.data.load_dataset("fashion-mnist")

Submodules are imported lazily so that `import robustdissect` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "analysis",
    "attacks",
    "cli",
    "config",
    "data",
    "models",
    "pipeline",
    "probe",
    "report",
    "runs",
    "training",
}

__all__ = ["UserError", "__version__", *sorted(_SUBMODULES)]

from .errors import UserError  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'robustdissect' has no attribute {name!r}")
