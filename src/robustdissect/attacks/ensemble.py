"""Worst-case evaluation over several attacks, AutoAttack style: each attack runs only on the
points that are still classified correctly after the clean pass and all earlier attacks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..modelutil import model_device
from .base import Attack, frozen, make_attack, validate_inputs

ROBUST = -1
CLEAN_ERROR = -2

# run(attack, idx) -> (x_adv (M, C, H, W), correct (M,)) for the points at positions idx (M,)
Runner = Callable[[Attack, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class AttackSummary:
    """One attack's part in the cascade: the points it saw, how many it broke, its accuracy on the
    points it saw, and the worst-case accuracy over all N points after it."""

    name: str
    n_attacked: int
    n_broken: int
    accuracy_on_attacked: float
    cumulative_accuracy: float
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EnsembleResult:
    """x_adv (N, C, H, W): each point's successful adversarial example (for points that stay robust:
    the first attack's output; for clean errors: x); robust: bool (N,); clean_correct: bool (N,);
    broken_by: int64 (N,), index of the attack that broke the point, -1 robust, -2 clean error."""

    x_adv: Tensor
    robust: Tensor
    clean_correct: Tensor
    broken_by: Tensor
    per_attack: list[AttackSummary]
    clean_accuracy: float
    worst_case_accuracy: float

    def describe(self) -> dict[str, Any]:
        return {
            "n": int(self.robust.numel()),
            "clean_accuracy": self.clean_accuracy,
            "worst_case_accuracy": self.worst_case_accuracy,
            "attacks": [
                {
                    "name": s.name,
                    "n_attacked": s.n_attacked,
                    "n_broken": s.n_broken,
                    "accuracy_on_attacked": s.accuracy_on_attacked,
                    "cumulative_accuracy": s.cumulative_accuracy,
                    "settings": s.settings,
                }
                for s in self.per_attack
            ],
        }


def worst_case(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[Attack | str],
    seed: int = 0,
    batch_size: int = 1000,
    run: Runner | None = None,
    clean_correct: Tensor | None = None,
) -> EnsembleResult:
    """Run `attacks` in order as a cascade on x (N, C, H, W) in [0, 1] with labels y (N,).

    Strings are built with make_attack(name). Each attack gets `seed`. Returns per-attack and
    worst-case robust accuracy, per-sample robust flags and the worst-case x_adv. `run(attack,
    idx)` replaces the direct call `attack(model, x[idx], y[idx], seed=seed)` (e.g. to fetch
    stored evidence); `clean_correct` (N,) spares the clean pass when already known.
    """
    built = [make_attack(a) if isinstance(a, str) else a for a in attacks]
    if not built:
        raise UserError("worst_case needs at least one attack")
    x, y, _ = validate_inputs(x, y, None)
    n = x.shape[0]
    if clean_correct is None:
        with torch.inference_mode(False), frozen(model), torch.no_grad():
            device = model_device(model, x.device)
            preds = torch.cat(
                [model(x[i : i + batch_size].to(device)).argmax(dim=1) for i in range(0, n, batch_size)]
            )
        clean_correct = preds.to(x.device) == y.to(x.device)
    clean_correct = clean_correct.to(x.device).bool()

    def direct(attack: Attack, idx: Tensor) -> tuple[Tensor, Tensor]:
        res = attack(model, x[idx], y[idx], seed=seed)
        return res.x_adv, res.correct

    runner = run or direct
    robust = clean_correct.clone()
    broken_by = torch.full((n,), ROBUST, dtype=torch.long, device=x.device)
    broken_by[~clean_correct] = CLEAN_ERROR
    x_adv = x.detach().clone()
    first_seen = torch.zeros(n, dtype=torch.bool, device=x.device)
    summaries: list[AttackSummary] = []
    for i, attack in enumerate(built):
        idx = robust.nonzero().squeeze(1)
        n_broken = 0
        if idx.numel():
            adv, correct = runner(attack, idx)
            broke = ~correct.to(x.device)
            n_broken = int(broke.sum())
            fill = broke | ~first_seen[idx]
            x_adv[idx[fill]] = adv[fill].to(x_adv.dtype)
            first_seen[idx] = True
            robust[idx[broke]] = False
            broken_by[idx[broke]] = i
        seen = int(idx.numel())
        summaries.append(
            AttackSummary(
                name=attack.name,
                n_attacked=seen,
                n_broken=n_broken,
                accuracy_on_attacked=(seen - n_broken) / seen if seen else float("nan"),
                cumulative_accuracy=float(robust.float().mean()),
                settings=attack.describe(),
            )
        )
    return EnsembleResult(
        x_adv=x_adv,
        robust=robust,
        clean_correct=clean_correct,
        broken_by=broken_by,
        per_attack=summaries,
        clean_accuracy=float(clean_correct.float().mean()),
        worst_case_accuracy=float(robust.float().mean()),
    )
