"""robustdissect: dissect the adversarial robustness of image classifiers, feature by feature.

    import robustdissect as rd
    model, card = rd.models.load_checkpoint("fmnist-smallcnn-vanilla")
    data = rd.data.load_dataset("fashion-mnist")
    rd.evaluate(model, data.test.subset(200), attacks=["fgsm", "pgd-linf"]).to_frame()

The analyses (`evaluate`, `sensitivity`, `features`, `concepts`, `diagnose`, `metric`,
`landscape`) are the notebook API of `robustdissect.api`. Submodules and the API are imported
lazily so that `import robustdissect` stays light.
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

# the notebook API (robustdissect.api): name -> attribute of that module
_API = {
    "evaluate", "sensitivity", "features", "concepts", "diagnose", "metric", "landscape",
    "EvaluateReport", "SensitivityReport", "FeaturesReport", "ConceptsReport", "DiagnoseReport", "MetricReport",
    "LandscapeReport",
}  # fmt: skip

__all__ = ["UserError", "__version__", "api", *sorted(_SUBMODULES), *sorted(_API)]

from .errors import UserError  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES or name == "api":
        return importlib.import_module(f".{name}", __name__)
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module 'robustdissect' has no attribute {name!r}")
