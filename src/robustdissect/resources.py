"""Files shipped inside the package: training presets, checkpoints with cards, report templates and
the results of the finished studies (`results/`).

Everything is read through `importlib.resources`, so the files are found the same way in a
checkout, an editable install and a wheel install.
"""

from __future__ import annotations

import json
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, unknown_name

PRESETS = ("configs", "train")
WEIGHTS = ("weights",)
TEMPLATES = ("report", "templates")
RESULTS = ("results",)


def resource(*parts: str) -> Traversable:
    """The package resource at `parts` (e.g. `resource("weights", "x.json")`); it may not exist."""
    node = files("robustdissect")
    for part in parts:
        node = node / part
    return node


def _stems(folder: tuple[str, ...], suffix: str) -> list[str]:
    node = resource(*folder)
    if not node.is_dir():
        return []
    return sorted(p.name[: -len(suffix)] for p in node.iterdir() if p.name.endswith(suffix) and p.is_file())


def train_presets() -> list[str]:
    """Names of the training presets (`robustdissect train --config NAME`)."""
    return _stems(PRESETS, ".yaml")


def train_preset(name: str) -> Traversable:
    """The YAML file of training preset `name`; unknown names fail with close matches."""
    node = resource(*PRESETS, f"{name}.yaml")
    if not node.is_file():
        raise unknown_name("training preset", name, train_presets())
    return node


def read_train_config(name_or_path: str | Path) -> dict[str, Any]:
    """The settings of a training preset name or of a YAML file (a file that exists wins)."""
    spec = str(name_or_path)
    path = Path(spec)
    if path.is_file():
        where, text = str(path), path.read_text()
    elif path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        hint = f"; the preset '{path.stem}' is shipped: --config {path.stem}" if path.stem in train_presets() else ""
        raise UserError(f"config file {path} does not exist{hint}")
    else:
        where, text = f"preset {spec}", train_preset(spec).read_text()
    try:
        cfg = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{where} must hold a mapping of settings, not {type(cfg).__name__}")
    return cfg


def checkpoint_names() -> list[str]:
    """Names of the shipped checkpoints (each a `.safetensors` with its `.json` card)."""
    return [n for n in _stems(WEIGHTS, ".json") if resource(*WEIGHTS, f"{n}.safetensors").is_file()]


def checkpoint_files(name: str) -> tuple[Traversable, Traversable]:
    """(weights, card) of shipped checkpoint `name`; unknown names fail with close matches."""
    weights, card = resource(*WEIGHTS, f"{name}.safetensors"), resource(*WEIGHTS, f"{name}.json")
    if not (weights.is_file() and card.is_file()):
        raise unknown_name("shipped checkpoint", name, checkpoint_names())
    return weights, card


def template(name: str) -> str:
    """The text of report template `name` (e.g. `report.html.j2`)."""
    node = resource(*TEMPLATES, name)
    if not node.is_file():
        raise FileNotFoundError(f"robustdissect is installed without its report template {name}")
    return node.read_text(encoding="utf-8")


def shipped_result(name: str) -> dict[str, Any] | None:
    """The JSON result shipped as `results/NAME` (a finished study or stage result), or None."""
    node = resource(*RESULTS, name)
    if not node.is_file():
        return None
    data = json.loads(node.read_text())
    if not isinstance(data, dict):
        raise UserError(f"the shipped result {name} is not a JSON object")
    return data


def read_study(folder: str | Path, study: str, file: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The study `study` (e.g. "YU-1") that `python -m robustdissect.studies.<study>` wrote into
    `folder` as `file`; a missing or malformed file (no `keys`) is a UserError."""
    path = Path(folder) / file
    module = study.lower().replace("-", "")
    if not path.is_file():
        raise UserError(f"no {study} study in {folder} (missing {file}); run python -m robustdissect.studies.{module}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise UserError(f"{path} is not the file of a {study} study (it needs {', '.join(keys)})")
    return data


def study_or_shipped(
    folder: str | None, builtin: bool, study: str, file: str, keys: tuple[str, ...], shipped: str
) -> dict[str, Any] | None:
    """The study in `folder`, or (None) the one shipped as results/`shipped` when the run analyses
    a shipped Fashion-MNIST model on its own data (`builtin`), else None."""
    if folder is not None:
        return read_study(folder, study, file, keys)
    return shipped_result(shipped) if builtin else None
