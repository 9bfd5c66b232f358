"""Image datasets: float32 NCHW images in [0, 1] with integer labels, held in memory or read
lazily (`LazyImages`: files decoded per batch, stored as uint8)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..errors import UserError
from ..registry import Registry
from .lazy import LazyImages


@dataclass(frozen=True)
class Split:
    """One split of a dataset. `x`: (N, C, H, W) float32 in [0, 1]; `y`: (N,) int64.

    `x` is a tensor, or a `LazyImages` view for data read from files: it indexes like a tensor
    (`x[:n]`, `x[idx]` decode and return only those images), so the stages need not know."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @staticmethod
    def lazy(x: LazyImages, y: torch.Tensor) -> Split:
        """A split over lazily read images."""
        if len(x) != y.shape[0]:
            raise ValueError(f"{len(x)} images but {y.shape[0]} labels")
        return Split(cast(torch.Tensor, x), y)

    @property
    def is_lazy(self) -> bool:
        return isinstance(self.x, LazyImages)

    def take(self, idx: torch.Tensor | slice) -> Split:
        """The images `idx` selects (in that order); lazy stays lazy (nothing decoded)."""
        x: Any = self.x
        if isinstance(x, LazyImages):
            return Split.lazy(x.view(idx), self.y[idx])
        return Split(x[idx], self.y[idx])

    def materialized(self) -> Split:
        """The same split with its images in memory (float32); an in-memory split as is."""
        x: Any = self.x
        return Split(x.materialize(), self.y) if isinstance(x, LazyImages) else self

    def subset(self, n: int | None, seed: int = 0) -> Split:
        """The first `n` images of a seeded permutation (all of them when n is None); a subset
        is for analysis, so lazily read images are decoded (only those n)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise UserError(f"--n must be positive, got {n}")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        return self.take(idx).materialized()

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) mini-batches; a given generator makes the order reproducible. A lazy
        split streams through a DataLoader (workers and pinned memory when `device` is CUDA)."""
        order = torch.randperm(len(self), generator=generator) if shuffle else None
        x: Any = self.x
        if isinstance(x, LazyImages):
            view = x.view(order) if order is not None else x
            ys = self.y[order] if order is not None else self.y
            start = 0
            for xb in view.batches(batch_size, device=device):
                yield xb, ys[start : start + xb.shape[0]]
                start += xb.shape[0]
            return
        for start in range(0, len(self), batch_size):
            if order is None:
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                yield self.x[idx], self.y[idx]


@dataclass(frozen=True)
class Dataset:
    """A dataset with train / val / test splits; `val` is a fixed slice held out from train."""

    name: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    source: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.test.x.shape[1:]
        return int(c), int(h), int(w)

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise UserError(f"unknown split '{name}'; use train, val or test")
        split: Split = getattr(self, name)
        return split

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training split (for the model's Normalize); a lazy
        split is streamed (float64 sums), not loaded."""
        x: Any = self.train.x
        if isinstance(x, LazyImages):
            return _streamed_stats(x)
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def _streamed_stats(x: LazyImages, batch_size: int = 256) -> tuple[list[float], list[float]]:
    c = x.shape[1]
    total, sq, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for xb in x.batches(batch_size):
        xd = xb.double()
        total += xd.sum(dim=(0, 2, 3))
        sq += (xd * xd).sum(dim=(0, 2, 3))
        count += xb.shape[0] * xb.shape[2] * xb.shape[3]
    mean = total / max(count, 1)
    var = (sq - count * mean * mean) / max(count - 1, 1)  # unbiased, as Tensor.std
    std = var.clamp_min(0).sqrt().clamp_min(1e-6)
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


DATASETS: Registry[object] = Registry("dataset")


def validate_images(x: torch.Tensor, y: torch.Tensor, where: str) -> None:
    """Refuse NaN/inf, values outside [0, 1], wrong rank and label/image count mismatches. Lazy
    images (decoded from 8-bit files: in range by construction) are checked for shape only."""
    if isinstance(x, LazyImages):
        if y.ndim != 1 or y.shape[0] != len(x):
            raise UserError(f"{where}: {len(x)} images but labels of shape {tuple(y.shape)}")
        return
    if x.ndim != 4:
        raise UserError(f"{where}: images must have shape (N, C, H, W), got {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UserError(
            f"{where}: {x.shape[0]} images but labels of shape {tuple(y.shape)}; give one integer label per image"
        )
    if not torch.isfinite(x).all():
        raise UserError(f"{where}: images contain NaN or infinite values; clean the data first")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise UserError(
            f"{where}: pixel values must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]; divide 8-bit images by 255"
        )
    if y.numel() and int(y.min()) < 0:
        raise UserError(f"{where}: labels must be non-negative integers")


def split_train_val(x: torch.Tensor, y: torch.Tensor, val_size: int, seed: int = 0) -> tuple[Split, Split]:
    """Hold out a fixed, seeded slice of `val_size` training images for model selection."""
    n = x.shape[0]
    val_size = min(val_size, n // 10) if n < 10 * val_size else val_size
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    whole = Split(x, y)
    return whole.take(train_idx), whole.take(val_idx)
