"""Run configuration: a frozen dataclass loaded from YAML, validated with clear messages.

Stage options live under `stages.<name>`; each stage validates its own block, so adding a stage
does not change this file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import UserError, unknown_name

DEFAULT_STAGES = (
    "overview", "evaluate", "sensitivity", "features", "concepts", "explorer", "compare", "diagnose", "metric",
    "landscape", "pushback",
)


@dataclass(frozen=True)
class RunConfig:
    """Everything `robustdissect run` needs; every field has a working default."""

    model: str = "fmnist-smallcnn-vanilla"  # shipped checkpoint, .safetensors with card, or module:factory
    weights: str | None = None  # weights for a module:factory model (.safetensors or .pt)
    model_args: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # the model's short name in reports (None: derived from the spec)
    normalize: str | None = None  # imagenet, cifar10, MEAN/STD: the model expects standardised inputs
    # counterparts to compare (SPEC, name=SPEC or {model, name, weights, model_args, normalize});
    # None: PAT and SNS beside a shipped Fashion-MNIST smallcnn, nothing beside any other model
    compare: list[Any] | None = None
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    # options of the dataset's loader, e.g. image-folder {image_size: 224} or {resize: 256, crop: 224}
    data_options: dict[str, Any] = field(default_factory=dict)
    split: str = "test"
    n: int | None = 500  # images analysed (None = the whole split)
    sample: bool = False  # false: the first n images in file order; true: a seeded random sample
    batch_size: int | str = "auto"  # a number, or auto: the largest that fits on CUDA, each stage's default on a CPU
    seed: int = 0
    device: str = "auto"
    quick: bool = True  # reduced attack budgets in every stage; false = the papers' full budgets
    stages: dict[str, dict[str, Any]] = field(default_factory=lambda: {s: {} for s in DEFAULT_STAGES})

    def __post_init__(self) -> None:
        path_fields(self, "weights", "data_dir")
        _check_types(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


MAX_CONFIG_VALUES = 100_000


def config_from_dict(data: Any, where: str = "config") -> RunConfig:
    """Build a validated RunConfig from parsed YAML; every problem is a UserError naming `where`."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of settings, got {type(data).__name__}")
    known = {f.name: f for f in fields(RunConfig)}
    for key in data:
        if key not in known:
            raise unknown_name(f"setting in {where}", str(key), known)
    stages = data.get("stages")
    if stages is not None:
        if isinstance(stages, list) and all(isinstance(s, str) for s in stages):
            data = {**data, "stages": {s: {} for s in stages}}
        elif isinstance(stages, dict):
            for k, v in stages.items():
                if v is not None and not isinstance(v, dict):
                    raise UserError(f"{where}: the options of stage '{k}' must be a mapping, got {type(v).__name__}")
            data = {**data, "stages": {str(k): dict(v or {}) for k, v in stages.items()}}
        else:
            raise UserError(f"{where}: 'stages' must be a list of names or a mapping name -> options")
    try:
        cfg = RunConfig(**data)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    check_device(cfg.device, where)
    return cfg


def path_fields(options: Any, *names: str) -> None:
    """Turn the path fields `names` of a (frozen) options dataclass given as os.PathLike by Python
    callers into strings, as YAML holds them."""
    for name in names:
        value = getattr(options, name)
        if isinstance(value, os.PathLike):
            object.__setattr__(options, name, os.fspath(value))


def is_int(v: Any) -> bool:
    """An int that is not a bool (YAML and JSON values)."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_ints(options: Any, minimums: Mapping[str, int], stage: str, *, optional: bool = False) -> None:
    """Refuse (UserError "<stage>: <name> must be an integer >= <lo>, got ...") the first integer
    field of an options dataclass, in the order of `minimums` ({field name: least value}), that is
    no int (a bool is none) or below its least value; with `optional`, None is accepted."""
    for name, lo in minimums.items():
        v = getattr(options, name)
        if (v is not None or not optional) and (not is_int(v) or v < lo):
            raise UserError(f"{stage}: {name} must be an integer >= {lo}{' or null' if optional else ''}, got {v!r}")


def _check_types(cfg: RunConfig) -> None:
    """Refuse values of the wrong type or range (raised from RunConfig.__post_init__)."""

    def need(ok: bool, what: str, value: Any) -> None:
        if not ok:
            raise UserError(f"{what}, got {value!r}")

    need(isinstance(cfg.model, str) and bool(cfg.model.strip()), "model must be a name or a path", cfg.model)
    need(cfg.weights is None or isinstance(cfg.weights, str), "weights must be a path or null", cfg.weights)
    need(isinstance(cfg.model_args, dict), "model_args must be a mapping", cfg.model_args)
    need(cfg.label is None or (isinstance(cfg.label, str) and bool(cfg.label.strip())), "label must be a short name",
         cfg.label)  # fmt: skip
    need(cfg.normalize is None or isinstance(cfg.normalize, str), "normalize must be imagenet, cifar10 or MEAN/STD",
         cfg.normalize)  # fmt: skip
    need(cfg.compare is None or isinstance(cfg.compare, list), "compare must be a list of model specs", cfg.compare)
    need(isinstance(cfg.dataset, str) and bool(cfg.dataset.strip()), "dataset must be a name", cfg.dataset)
    need(cfg.data_dir is None or isinstance(cfg.data_dir, str), "data_dir must be a path or null", cfg.data_dir)
    need(cfg.split in ("train", "val", "test"), "split must be train, val or test", cfg.split)
    need(cfg.n is None or (is_int(cfg.n) and cfg.n > 0), "n must be a positive integer or null", cfg.n)
    need(cfg.batch_size == "auto" or (is_int(cfg.batch_size) and int(cfg.batch_size) > 0),
         "batch_size must be a positive integer or auto", cfg.batch_size)  # fmt: skip
    need(isinstance(cfg.data_options, dict) and all(isinstance(k, str) for k in cfg.data_options),
         "data_options must be a mapping of the dataset loader's options", cfg.data_options)  # fmt: skip
    need(is_int(cfg.seed) and 0 <= cfg.seed < 2**63, "seed must be a non-negative integer", cfg.seed)
    need(isinstance(cfg.device, str) and _DEVICE.fullmatch(cfg.device) is not None, _DEVICE_HELP, cfg.device)
    need(isinstance(cfg.quick, bool), "quick must be true or false", cfg.quick)
    need(isinstance(cfg.sample, bool), "sample must be true or false", cfg.sample)
    need(
        isinstance(cfg.stages, dict) and all(isinstance(v, dict) for v in cfg.stages.values()),
        "stages must map stage names to option mappings",
        cfg.stages,
    )


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")
_DEVICE_HELP = "device must be auto, cpu, cuda, cuda:N or mps"


def check_device(name: Any, where: str = "--device") -> None:
    """Refuse a device name that is malformed or absent on this machine."""
    if not isinstance(name, str) or _DEVICE.fullmatch(name) is None:
        raise UserError(f"{where}: {_DEVICE_HELP}, got {name!r}")
    if name in ("auto", "cpu"):
        return
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{where}: device mps is not available on this machine; use auto or cpu")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= count:
        have = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise UserError(f"{where}: device {name} is not available (this machine has {have}); use auto or cpu")


def pick_device(name: str) -> torch.device:
    """The torch device for `name` (auto = CUDA when present); absent devices are a UserError."""
    check_device(name, "device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _count_values(data: Any, limit: int) -> int:
    """Count the values in parsed YAML, stopping past `limit` (YAML aliases can expand hugely)."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            break
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


MAX_CONFIG_BYTES = 2**20


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a YAML file with safe loading; a missing, unreadable, invalid or oversized file is a
    UserError with one line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist" if not p.exists() else f"{what} {p} is not a file")
    too_big = UserError(
        f"{what} {p} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; a configuration is a few kB, not a data file"
    )
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:  # refused before a byte is parsed (PyYAML: ~1 s per MB)
            raise too_big
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # a file that grows after the check is cut here
        if len(raw) > MAX_CONFIG_BYTES:
            raise too_big
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {p}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{p} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise UserError(f"{p} is nested too deeply to be a configuration") from None
    if _count_values(data, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise UserError(f"{p} expands to more than {MAX_CONFIG_VALUES} values; not a configuration")
    return {} if data is None else data


def load_config(path: str | Path) -> RunConfig:
    """Load and validate a run configuration from YAML."""
    return config_from_dict(load_yaml(path), str(path))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def parse_eps(text: str | float, maximum: float | None = None, name: str = "epsilon") -> float:
    """Parse an epsilon such as `0.1`, `8/255` or `2/255`; refuse NaN, infinity, negative values
    and values above `maximum`."""
    try:
        if isinstance(text, bool):
            raise ValueError
        if isinstance(text, (int, float)):
            value = float(text)
        elif "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError):
        raise UserError(f"cannot read {name} '{text}'; write e.g. 0.1 or 8/255") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{name} must be a finite, non-negative number, got {text}")
    if maximum is not None and value > maximum:
        raise UserError(f"{name} {text} is above {maximum:g}; images lie in [0, 1], write e.g. 0.1 or 8/255")
    return value


def parse_budgets(options: Any, *names: str, maximum: float | None = None, stage: str = "") -> None:
    """Replace the budget fields `names` of an options dataclass (frozen ones too) by floats where
    the options are built (`8/255` -> 0.0314, see `parse_eps`), so every reader gets a float; a
    list field is parsed item by item and None stays None. Call it first in `__post_init__`."""
    for name in names:
        value = getattr(options, name)
        what = f"{stage}: {name}" if stage else name
        if isinstance(value, (list, tuple)):
            value = [parse_eps(v, maximum, what) for v in value]
        elif value is not None:
            value = parse_eps(value, maximum, what)
        object.__setattr__(options, name, value)


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
