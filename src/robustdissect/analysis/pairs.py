"""Dual pair sets D̄ = {(x_i, x'_i)} from any attack callable (METHODS §5.1).

An attack is any callable `attack(model, x, y, targets=None, seed=None)` that returns an object
with an `x_adv` tensor (the package's attacks, Gaussian noise, or a user function). Pairs are
yielded as (x, x_adv, y) batches, so statistics can stream over them without holding all
adversarial examples in memory; wrap the generator in `list(...)` to reuse the pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal, Protocol

import torch
from torch import nn

from ..errors import UserError
from ..modelutil import model_device, predict

__all__ = ["AttackFn", "AttackOutput", "attack_pairs", "targeted_pair_sets", "targeted_pairs"]

Keep = Literal["all", "success"]


class AttackOutput(Protocol):
    """What an attack returns; only `x_adv` (N, C, H, W) in [0, 1] is used here."""

    @property
    def x_adv(self) -> torch.Tensor: ...


class AttackFn(Protocol):
    """`attack(model, x, y, *, targets=None, seed=None) -> AttackOutput` (e.g. `attacks.PGD`)."""

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> AttackOutput: ...


def attack_pairs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackFn,
    *,
    targets: int | torch.Tensor | None = None,
    keep: Keep = "all",
    batch_size: int = 256,
    seed: int | None = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run `attack` batch by batch and yield (x, x_adv, y) on the CPU.

    `targets` (an int for one target class, or (N,) labels) makes the attack targeted.
    `keep="success"` keeps only pairs where the model's prediction on x_adv equals the target
    (targeted) or differs from y (untargeted). Batch i uses seed `seed + i`.
    """
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{x.shape[0]} images but {y.shape[0]} labels")
    if keep not in ("all", "success"):
        raise UserError(f"keep must be 'all' or 'success', got {keep!r}")
    if isinstance(targets, torch.Tensor) and targets.shape[0] != x.shape[0]:
        raise UserError(f"{x.shape[0]} images but {targets.shape[0]} targets")
    device = model_device(model)
    for i, s in enumerate(range(0, x.shape[0], batch_size)):
        xb, yb = x[s : s + batch_size], y[s : s + batch_size]
        tb: torch.Tensor | None
        if targets is None:
            tb = None
        elif isinstance(targets, int):
            tb = torch.full_like(yb, targets)
        else:
            tb = targets[s : s + batch_size]
        res = attack(
            model,
            xb.to(device),
            yb.to(device),
            targets=None if tb is None else tb.to(device),
            seed=None if seed is None else seed + i,
        )
        xa = res.x_adv.detach().to(xb.device, xb.dtype)
        if xa.shape != xb.shape:
            raise UserError(f"attack returned shape {tuple(xa.shape)} for input {tuple(xb.shape)}")
        if keep == "success":
            pred = predict(model, xa, batch_size).to(yb.device)
            ok = pred == tb if tb is not None else pred != yb
            xb, xa, yb = xb[ok], xa[ok], yb[ok]
        if xb.shape[0]:
            yield xb, xa, yb


def targeted_pairs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackFn,
    target: int,
    *,
    batch_size: int = 256,
    seed: int | None = 0,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """D̄^y of E1/E3: images with label != target, attacked towards `target`, successes only."""
    keep = y != target
    return list(
        attack_pairs(
            model,
            x[keep],
            y[keep],
            attack,
            targets=target,
            keep="success",
            batch_size=batch_size,
            seed=seed,
        )
    )


def targeted_pair_sets(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackFn,
    targets: Sequence[int] | None = None,
    *,
    batch_size: int = 256,
    seed: int | None = 0,
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """{target: D̄^target} for every target class (default: all labels present in y)."""
    ts = sorted({int(v) for v in y.tolist()}) if targets is None else [int(t) for t in targets]
    return {t: targeted_pairs(model, x, y, attack, t, batch_size=batch_size, seed=seed) for t in ts}
