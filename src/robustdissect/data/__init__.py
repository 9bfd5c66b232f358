"""Datasets: a registry of loaders that return in-memory train/val/test splits."""

from __future__ import annotations

from typing import Any, cast

from . import cifar10, files, idx, robust_data  # noqa: F401  (register loaders)
from .base import DATASETS, Dataset, Split, validate_images
from .transforms import augment

__all__ = ["DATASETS", "Dataset", "Split", "augment", "load_dataset", "validate_images"]

_CACHE: dict[tuple[str, str | None, int], Dataset] = {}


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0, **kwargs: Any) -> Dataset:
    """Load a registered dataset by name (cached per process)."""
    if ":" in name and name.split(":", 1)[0] in DATASETS:  # name:PATH, e.g. robust-data:built.safetensors
        name, data_dir = name.split(":", 1)
    key = (name, data_dir, seed)
    if key in _CACHE and not kwargs:
        return _CACHE[key]
    loader = cast(Any, DATASETS.get(name))
    ds = cast(Dataset, loader(data_dir=data_dir, seed=seed, **kwargs))
    for split in (ds.train, ds.test):
        validate_images(split.x, split.y, f"{name} ({ds.source})")
    if not kwargs:
        _CACHE[key] = ds
    return ds
