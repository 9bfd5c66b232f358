"""Datasets: a registry of loaders that return train/val/test splits, in memory or read lazily
from files (`data.lazy`)."""

from __future__ import annotations

import inspect
from typing import Any, cast

from ..errors import UserError
from . import cifar10, files, idx, robust_data  # noqa: F401  (register loaders)
from .base import DATASETS, Dataset, Split, validate_images
from .lazy import LazyImages
from .transforms import augment

__all__ = ["DATASETS", "Dataset", "LazyImages", "Split", "augment", "load_dataset", "validate_images"]

_CACHE: dict[tuple[str, str | None, int, str], Dataset] = {}


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0, **kwargs: Any) -> Dataset:
    """Load a registered dataset by name (cached per process)."""
    if ":" in name and name.split(":", 1)[0] in DATASETS:  # name:PATH, e.g. robust-data:built.safetensors
        name, data_dir = name.split(":", 1)
    key = (name, data_dir, seed, repr(sorted(kwargs.items())))
    if key in _CACHE:
        return _CACHE[key]
    loader = cast(Any, DATASETS.get(name))
    accepted = set(inspect.signature(loader).parameters) - {"data_dir", "seed"}
    for option in kwargs:
        if option not in accepted:
            takes = ", ".join(sorted(accepted)) or "none"
            raise UserError(f"dataset {name} has no option '{option}' (it takes: {takes})")
    ds = cast(Dataset, loader(data_dir=data_dir, seed=seed, **kwargs))
    for split in (ds.train, ds.test):
        validate_images(split.x, split.y, f"{name} ({ds.source})")
    _CACHE[key] = ds
    return ds
