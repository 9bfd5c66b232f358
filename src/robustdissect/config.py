"""Run configuration: a frozen dataclass loaded from YAML, validated with clear messages.

Stage options live under `stages.<name>`; each stage validates its own block, so adding a stage
does not change this file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, unknown_name

DEFAULT_STAGES = ("overview", "evaluate", "sensitivity", "training")


@dataclass(frozen=True)
class RunConfig:
    """Everything `robustdissect run` needs; every field has a working default."""

    model: str = "fmnist-smallcnn-vanilla"  # shipped checkpoint, .safetensors with card, or module:factory
    weights: str | None = None  # weights for a module:factory model (.safetensors or .pt)
    model_args: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    split: str = "test"
    n: int | None = 500  # images analysed (None = the whole split)
    batch_size: int = 250
    seed: int = 0
    device: str = "auto"
    quick: bool = True  # reduced attack budgets in every stage; false = the papers' full budgets
    stages: dict[str, dict[str, Any]] = field(default_factory=lambda: {s: {} for s in DEFAULT_STAGES})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def config_from_dict(data: dict[str, Any], where: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of settings, got {type(data).__name__}")
    known = {f.name: f for f in fields(RunConfig)}
    for key in data:
        if key not in known:
            raise unknown_name(f"setting in {where}", key, known)
    stages = data.get("stages")
    if stages is not None:
        if isinstance(stages, list):
            data = {**data, "stages": {str(s): {} for s in stages}}
        elif isinstance(stages, dict):
            data = {**data, "stages": {str(k): dict(v or {}) for k, v in stages.items()}}
        else:
            raise UserError(f"{where}: 'stages' must be a list of names or a mapping name -> options")
    cfg = RunConfig(**data)
    _check_types(cfg, where)
    return cfg


def _check_types(cfg: RunConfig, where: str) -> None:
    if cfg.n is not None and (not isinstance(cfg.n, int) or cfg.n <= 0):
        raise UserError(f"{where}: n must be a positive integer or null, got {cfg.n!r}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size <= 0:
        raise UserError(f"{where}: batch_size must be a positive integer, got {cfg.batch_size!r}")
    if cfg.split not in ("train", "val", "test"):
        raise UserError(f"{where}: split must be train, val or test, got {cfg.split!r}")
    if not isinstance(cfg.seed, int):
        raise UserError(f"{where}: seed must be an integer, got {cfg.seed!r}")


def load_config(path: str | Path) -> RunConfig:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
    return config_from_dict(data, str(p))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def parse_eps(text: str | float) -> float:
    """Parse an epsilon such as `0.1`, `8/255` or `2/255`."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"cannot read epsilon '{text}'; write e.g. 0.1 or 8/255") from None


def stage_options(cls: type[Any], options: dict[str, Any], stage: str) -> Any:
    """Build a stage's frozen options dataclass from its config block, refusing unknown keys."""
    known = {f.name for f in fields(cls)}
    for key in options:
        if key not in known:
            raise unknown_name(f"option of stage '{stage}'", key, known)
    try:
        return cls(**options)
    except TypeError as e:
        raise UserError(f"stage '{stage}': {e}") from None
