"""Model specs as users write them, and their short labels; input normalisation in pixel space.

A spec is what `--model` / `--compare` take: a shipped checkpoint name, a checkpoint file with
its card, a zoo architecture, or a user `file.py:factory` / `pkg.module:factory`, optionally
prefixed by a short name the user chooses (`robust=adv.safetensors`). Reports name models only
by these short labels, never by a file path.

Normalisation: many models (torchvision, timm, RobustBench ImageNet models) expect inputs
standardised with the training set's mean and std. `add_input_normalization` makes such a model
take pixels in [0, 1], so attacks, ε and every figure stay in pixel space.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")

# Per-channel (mean, std) of the usual preprocessing presets, in [0, 1] pixel units.
NORMALIZATION_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclass(frozen=True)
class ModelSpec:
    """One model as the user named it: `spec` (what resolves it), optional weights and factory
    arguments, and the short `label` reports use."""

    spec: str
    label: str
    weights: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    normalize: str | None = None


def split_label(text: str) -> tuple[str | None, str]:
    """`'name=SPEC'` -> ('name', 'SPEC'); a spec without a leading short name -> (None, spec)."""
    name, sep, rest = text.partition("=")
    if sep and rest and _LABEL.fullmatch(name) and "/" not in name and ":" not in name:
        return name, rest
    return None, text


def short_label(spec: str, weights: str | None = None) -> str:
    """A short, path-free name for a spec: shipped names as they are, checkpoint files by their
    stem, user factories by their weights' stem (or `module:factory` without weights)."""
    if weights:
        return Path(weights).stem
    if ":" in spec and not spec.endswith((".safetensors", ".json")):
        module, _, factory = spec.rpartition(":")
        return f"{Path(module).stem if module.endswith('.py') else module.rsplit('.', 1)[-1]}:{factory}"
    return Path(spec).stem if spec.endswith((".safetensors", ".json")) else spec


def unique_labels(labels: Iterable[str]) -> list[str]:
    """The labels with repeats made distinct (`a`, `a-2`, `a-3`, ...)."""
    seen: dict[str, int] = {}
    out: list[str] = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return out


def parse_compare(entries: Sequence[Any] | None, weights: Sequence[str | None] = ()) -> list[ModelSpec]:
    """The models given with `--compare` / the `compare` config key.

    Each entry is a string (`SPEC` or `name=SPEC`) or a mapping with `model` and optional `name`,
    `weights`, `model_args`, `normalize`; `weights` pairs positionally with string entries
    (`--compare-weights`, empty for none)."""
    specs: list[ModelSpec] = []
    for i, entry in enumerate(entries or []):
        if isinstance(entry, str):
            name, spec = split_label(entry.strip())
            if not spec:
                raise UserError("--compare: empty model spec; give SPEC or name=SPEC, comma-separated")
            w = weights[i] if i < len(weights) else None
            specs.append(ModelSpec(spec, name or short_label(spec, w), w or None))
        elif isinstance(entry, dict):
            unknown = set(entry) - {"model", "name", "weights", "model_args", "normalize"}
            if unknown or not isinstance(entry.get("model"), str):
                raise UserError(
                    "compare: each entry is SPEC, name=SPEC, or a mapping with 'model' and optional "
                    f"'name', 'weights', 'model_args', 'normalize'; got {entry!r}"
                )
            w = entry.get("weights")
            label = entry.get("name") or short_label(entry["model"], w)
            if not isinstance(label, str) or not _LABEL.fullmatch(label):
                raise UserError(f"compare: name {label!r} must be a short name of letters, digits, '-', '_', '.'")
            args = entry.get("model_args") or {}
            if not isinstance(args, dict):
                raise UserError(f"compare: model_args of {label} must be a mapping")
            specs.append(ModelSpec(entry["model"], label, w, dict(args), entry.get("normalize")))
        else:
            raise UserError(f"compare: each entry is a model spec or a mapping, got {type(entry).__name__}")
    if len(weights) > len(specs):
        raise UserError(f"--compare-weights gives {len(weights)} files for {len(specs)} --compare models")
    return specs


def parse_normalization(text: str, channels: int) -> tuple[list[float], list[float]]:
    """`imagenet`, `cifar10`, ... or `MEAN/STD` with comma-separated per-channel values
    (`0.5,0.5,0.5/0.25,0.25,0.25`; one value applies to every channel) -> (mean, std)."""
    key = text.strip().lower()
    if key in NORMALIZATION_PRESETS:
        mean, std = (list(v) for v in NORMALIZATION_PRESETS[key])
    else:
        parts = key.split("/")
        if len(parts) != 2:
            raise UserError(
                f"--normalize {text!r}: use one of {', '.join(NORMALIZATION_PRESETS)} or MEAN/STD, "
                "e.g. 0.485,0.456,0.406/0.229,0.224,0.225"
            )
        try:
            mean, std = ([float(v) for v in p.split(",")] for p in parts)
        except ValueError:
            raise UserError(f"--normalize {text!r}: MEAN and STD must be numbers separated by commas") from None
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise UserError(f"--normalize {text!r} gives {len(mean)} mean and {len(std)} std values for "
                        f"{channels}-channel images (give 1 or {channels} of each)")  # fmt: skip
    mean, std = mean * (channels // len(mean)), std * (channels // len(std))
    if not all(s > 0 for s in std) or not all(abs(v) < 1e3 for v in (*mean, *std)):
        raise UserError(f"--normalize {text!r}: std must be positive and the values finite")
    return mean, std


def add_input_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Make `model` take pixels in [0, 1]: inputs are standardised, (x − mean) / std per channel,
    before its forward. Done with a forward pre-hook and two buffers on the model itself (not a
    wrapper), so layer names and module paths stay the user's own. Returns the same model."""
    if hasattr(model, "input_mean"):
        raise UserError("the model already normalises its inputs (input_mean is set); drop --normalize")
    # not persistent: the weights the user saved (without normalisation) load as they are
    model.register_buffer("input_mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), False)
    model.register_buffer("input_std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), False)

    def standardise(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return ((x - module.input_mean) / module.input_std, *args[1:])

    model.register_forward_pre_hook(standardise)
    return model
