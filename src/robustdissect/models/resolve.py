"""The one place a model spec becomes a model: shipped checkpoints, checkpoint files with cards,
zoo architectures (+ weights) and user factories (+ weights).

Shipped checkpoints are tags of the zoo: each names its architecture in its card, and
`list_models` lists both kinds side by side, as one registry of loadable names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .. import resources
from ..data import Dataset
from ..errors import UserError, unknown_name
from .io import apply_weights, build_model, check_classifier, load_checkpoint, load_state_dict, load_user_model
from .io import read_card as _read_card
from .io import shipped_checkpoints as _shipped
from .spec import add_input_normalization, parse_normalization, short_label
from .zoo import MODELS

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".json")


@dataclass(frozen=True)
class ModelEntry:
    """One loadable name: a zoo architecture, or a shipped checkpoint tagged with its architecture."""

    name: str
    arch: str
    checkpoint: bool
    summary: str


def list_models(pattern: str = "*") -> list[str]:
    """Zoo architectures and shipped checkpoints whose name matches the shell-style `pattern`."""
    return sorted(n for n in {*MODELS.names(), *_shipped()} if fnmatchcase(n, pattern))


def describe_model(name: str) -> ModelEntry:
    """What `name` (from `list_models`) is: its architecture and a one-line summary."""
    if name in MODELS:
        entry = next(e for e in MODELS if e.name == name)
        return ModelEntry(name, name, False, entry.summary)
    if name in _shipped():
        card = _read_card(resources.checkpoint_files(name)[1])
        accuracy = card.get("test_accuracy")
        parts = [
            str(card.get("dataset", "?")),
            str(card.get("objective", {}).get("name", "?")) if isinstance(card.get("objective"), dict) else "?",
            f"test accuracy {accuracy:.4f}" if isinstance(accuracy, float) else "",
        ]
        return ModelEntry(name, card["arch"]["name"], True, ", ".join(p for p in parts if p))
    raise unknown_name("model", name, list_models())


def resolve_model(
    spec: str,
    weights: str | Path | None = None,
    model_args: Mapping[str, Any] | None = None,
    data: Dataset | None = None,
    require_weights: bool = True,
    normalize: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load `spec` in eval mode and return (model, card).

    `spec` is a shipped checkpoint name, a `.safetensors`/`.json` checkpoint with its card, a zoo
    architecture (`weights` required unless `require_weights` is False) or a user
    `file.py:factory` / `pkg.module:factory`. With `data`, zoo models are built for its channels,
    classes and statistics, and the model must fit it: one batch of the data's shape must give
    (N, classes) logits. A card that names another dataset is only a note in the log: a model is
    matched to data by what can be checked (channels, size, classes), not by name.
    `normalize` (`imagenet`, `cifar10`, `MEAN/STD`, or a card's `normalize` key) makes a model
    that expects standardised inputs take pixels in [0, 1] (see `spec.add_input_normalization`).
    """
    args = dict(model_args or {})
    card: dict[str, Any]
    if spec in _shipped() or spec.endswith(CHECKPOINT_SUFFIXES):
        if weights:
            raise UserError("--weights is only for zoo or user models; a checkpoint already has weights")
        if args:
            raise UserError(
                f"model arguments ({', '.join(sorted(args))}) are only for zoo or user models; "
                f"checkpoint {spec} fixes its architecture in its card"
            )
        model, card = load_checkpoint(spec)
    elif spec in MODELS:
        if data is not None:
            mean, std = data.channel_stats()
            args = {
                "num_classes": data.num_classes,
                "in_channels": data.image_shape[0],
                "mean": mean,
                "std": std,
                **args,
            }
        model = build_model(spec, **args)
        if not weights and require_weights:
            raise UserError(
                f"'{spec}' is an architecture without weights; pass --weights FILE, a shipped checkpoint "
                f"({', '.join(_shipped())}), or train one with `robustdissect train`"
            )
        card = {"arch": getattr(model, "arch", {"name": spec}), "weights": None if weights is None else str(weights)}
    elif ":" in spec:
        model = load_user_model(spec, **args)
        card = {
            "arch": {"name": spec, **args},
            "weights": None if weights is None else str(weights),
            "user_model": True,
            **(_training_record(Path(weights)) if weights else {}),
        }
    else:
        raise unknown_name("model", spec, list_models())
    normalize = normalize or card.get("normalize")
    if normalize:
        channels = data.image_shape[0] if data is not None else _card_channels(card)
        mean, std = parse_normalization(str(normalize), channels)
        add_input_normalization(model, mean, std)
        card = {**card, "normalize": str(normalize)}
    if weights:
        if data is not None and any(is_lazy(t) for t in (*model.parameters(), *model.buffers())):
            try:
                with torch.no_grad():  # lazy modules (nn.LazyLinear, ...) get their shapes from one forward
                    model.eval()(torch.zeros(1, *data.image_shape))
            except Exception as e:
                raise UserError(f"the model fails on inputs of shape (N, {', '.join(map(str, data.image_shape))}): "
                                f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
        apply_weights(model, load_state_dict(Path(weights)), str(weights))
    if data is not None:
        model = check_classifier(model, data.image_shape, data.num_classes)
        trained_on = card.get("dataset")
        if trained_on and trained_on != data.name:
            log.info("note: model %s was trained on %s; the data is %s (%s, %d classes)", short_label(spec),
                     trained_on, data.name, "x".join(map(str, data.image_shape)), data.num_classes)  # fmt: skip
    model.eval()
    return model, card


def _card_channels(card: dict[str, Any]) -> int:
    """The input channels a card records (`arch.in_channels`, default 3)."""
    arch = card.get("arch") or {}
    channels = arch.get("in_channels", 3) if isinstance(arch, dict) else 3
    return int(channels) if isinstance(channels, int) else 3


TRAINING_KEYS = ("dataset", "objective", "epochs", "train_seconds", "test_accuracy", "seed")


def _training_record(weights: Path) -> dict[str, Any]:
    """What the card beside weights written by `robustdissect train` (`NAME.json` next to
    `NAME.safetensors`) says of their training; {} when there is no such card."""
    side = weights.with_suffix(".json")
    if weights.suffix != ".safetensors" or not side.is_file() or side.stat().st_size > 1 << 20:
        return {}
    try:
        card = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: card[k] for k in TRAINING_KEYS if isinstance(card, dict) and k in card}
