"""Batch augmentations in plain torch (no torchvision), seeded by a torch.Generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to the original size at a random offset per image.

    x: (N, C, H, W) -> (N, C, H, W).
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (N,1,H,1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (N,1,1,W)
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability p. x: (N, C, H, W)."""
    flip = torch.rand(x.shape[0], generator=generator) < p
    out = x.clone()
    out[flip] = x[flip].flip(-1)
    return out


def augment(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply a named augmentation preset: 'none' or 'crop-flip' (crop pad 4 + flip)."""
    if kind == "none":
        return x
    if kind == "crop-flip":
        return random_hflip(random_crop(x, 4, generator), 0.5, generator)
    raise ValueError(f"unknown augmentation {kind!r}")
