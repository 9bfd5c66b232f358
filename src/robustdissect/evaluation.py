"""Robustness evaluation: the attack table with confidence intervals, curves, per-class accuracy,
perturbation norms, image grids and gradient-masking warnings.

Adversarial examples are cached in the run directory (`adv/<attack>.safetensors`, with the
attack's settings in the metadata), so analyses reuse them and an interrupted evaluation resumes
at the first attack it had not finished.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attacks import (
    ATTACKS,
    Attack,
    check_black_box_vs_white_box,
    check_large_eps,
    check_more_steps,
    check_random_output,
    make_attack,
    output_randomness,
)
from .config import parse_eps
from .errors import UserError

log = logging.getLogger(__name__)

# The columns of the neuron-sensitivity paper's Table III, then the reliable-evaluation extras.
TABLE_ATTACKS = ("cw-l2", "pgd-l2", "pgd-linf", "fgsm", "spsa", "nattack", "apgd-ce", "apgd-dlr")
BLACK_BOX = ("spsa", "nattack")
CORRUPTION_NAMES = ("gaussian-noise", "shot-noise", "impulse-noise", "gaussian-blur", "contrast", "brightness", "jpeg")


@dataclass(frozen=True)
class EvaluateOptions:
    """Settings of the evaluation (METHODS §5.3, §8.1); every one is a config option."""

    attacks: str | list[str] = "all"  # "all" or names from TABLE_ATTACKS
    eps: float | str = 0.1  # L-inf budget (pixel units)
    eps_l2: float | str = 1.5  # L2 budget
    pgd_steps: int = 20
    step_rule: str = "madry"  # alpha = 2.5 eps / k for evaluation tables; "paper" = eps / sqrt(k)
    cw_steps: int = 300
    cw_search_steps: int = 3
    apgd_steps: int = 100
    blackbox_n: int = 500  # SPSA / NAttack run on a fixed subset of this many images
    spsa_iterations: int = 100
    spsa_samples: int = 512
    nattack_iterations: int = 100
    nattack_population: int = 300
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTION_NAMES))
    noise_scale: str = "auto"  # auto: "fmnist" (x3.19 set) for 1-channel 28x28 images, else "cifar"
    eps_sweep: list[float] = field(default_factory=lambda: [0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20])
    steps_sweep: list[int] = field(default_factory=lambda: [1, 2, 3, 5, 7, 10, 20])
    curve_n: int = 1000
    large_eps: float = 0.5  # for the gradient-masking check
    grid_attack: str = "pgd-linf"
    batch_size: int = 500

    def attack_names(self) -> list[str]:
        if self.attacks == "all":
            return list(TABLE_ATTACKS)
        names = [a.strip() for a in (self.attacks.split(",") if isinstance(self.attacks, str) else self.attacks)]
        for n in names:
            if n not in TABLE_ATTACKS:
                ATTACKS.get(n)  # unknown names raise with close matches
                raise UserError(f"'{n}' is a corruption; list it under 'corruptions', not 'attacks'")
        return names


QUICK_EVALUATE = {
    "cw_steps": 50,
    "cw_search_steps": 3,
    "apgd_steps": 50,
    "blackbox_n": 100,
    "spsa_iterations": 20,
    "spsa_samples": 128,
    "nattack_iterations": 30,
    "nattack_population": 100,
    "curve_n": 300,
    "eps_sweep": [0.02, 0.05, 0.1, 0.15, 0.2],
    "steps_sweep": [1, 3, 10, 20],
    "corruptions": ["gaussian-noise"],
}


def build_attack(name: str, opts: EvaluateOptions, seed: int) -> Attack:
    """The evaluation's instance of a table attack."""
    eps, eps_l2 = parse_eps(opts.eps), parse_eps(opts.eps_l2)
    common: dict[str, Any] = {"seed": seed, "batch_size": opts.batch_size}
    if name == "pgd-linf":
        return make_attack(name, eps=eps, steps=opts.pgd_steps, step_rule=opts.step_rule, **common)
    if name == "pgd-l2":
        return make_attack(name, eps=eps_l2, steps=opts.pgd_steps, step_rule=opts.step_rule, **common)
    if name == "fgsm":
        return make_attack(name, eps=eps, **common)
    if name == "cw-l2":
        return make_attack(name, steps=opts.cw_steps, search_steps=opts.cw_search_steps, **common)
    if name in ("apgd-ce", "apgd-dlr"):
        return make_attack(name, eps=eps, steps=opts.apgd_steps, **common)
    if name == "spsa":
        return make_attack(name, eps=eps, iterations=opts.spsa_iterations, n_samples=opts.spsa_samples, **common)
    if name == "nattack":
        return make_attack(
            name, eps=eps, iterations=opts.nattack_iterations, population=opts.nattack_population, **common
        )
    return make_attack(name, **common)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct / n."""
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class AttackOutcome:
    """One attack on a set of images: x_adv (N, C, H, W), correct (N,) bool, pred (N,)."""

    name: str
    x_adv: torch.Tensor
    correct: torch.Tensor
    pred: torch.Tensor
    settings: dict[str, Any]
    index: torch.Tensor  # (N,) positions of these images in the evaluated set

    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.correct) else math.nan


def run_cached(
    attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, cache: Path | None
) -> AttackOutcome:
    """Run `attack` unless `cache` holds a result with the same settings and images; save it."""
    from safetensors.torch import load_file, save_file

    settings = attack.describe()
    key = json.dumps({"settings": settings, "n": len(y), "index_sum": int(index.sum())}, sort_keys=True)
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") == key:
            t = load_file(str(cache))
            log.info("reusing cached %s", cache.name)
            return AttackOutcome(attack.name, t["x_adv"], t["correct"].bool(), t["pred"], settings, index)
    res = attack(model, x, y)
    pred = res.logits.argmax(1).cpu()
    outcome = AttackOutcome(attack.name, res.x_adv.cpu(), res.correct.cpu(), pred, settings, index)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        tensors = {
            "x_adv": outcome.x_adv.contiguous(),
            "correct": outcome.correct.to(torch.uint8),
            "pred": pred.contiguous(),
            "index": index.contiguous(),
        }
        save_file(tensors, str(tmp), metadata={"key": key, "settings": json.dumps(settings)})
        tmp.replace(cache)
    return outcome


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, float]:
    """Mean and max L-inf / L2 norm of x_adv - x over images; both (N, C, H, W)."""
    d = (x_adv - x).flatten(1)
    linf, l2 = d.abs().amax(1), d.norm(dim=1)
    return {
        "linf_mean": float(linf.mean()),
        "linf_max": float(linf.max()),
        "l2_mean": float(l2.mean()),
        "l2_max": float(l2.max()),
    }


def pgd_curve(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_values: Sequence[float],
    steps_values: Sequence[int],
    opts: EvaluateOptions,
    seed: int,
    fixed_eps: float,
    fixed_steps: int,
) -> tuple[dict[float, float], dict[int, float]]:
    """L-inf PGD accuracy against eps (at fixed_steps) and against steps (at fixed_eps)."""

    def acc(e: float, k: int) -> float:
        return make_attack("pgd-linf", eps=e, steps=k, step_rule=opts.step_rule, seed=seed, batch_size=opts.batch_size)(
            model, x, y
        ).robust_accuracy

    by_eps = {float(e): acc(float(e), fixed_steps) for e in eps_values}
    by_steps = {int(k): acc(fixed_eps, int(k)) for k in steps_values}
    return by_eps, by_steps


def masking_warnings(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    table: dict[str, float],
    white_box: dict[str, bool],
    eps_curve: dict[float, float],
    steps_curve: dict[int, float],
    opts: EvaluateOptions,
    seed: int,
) -> list[str]:
    """Every gradient-masking check, on numbers the evaluation already measured (plus one large-eps PGD)."""
    large = make_attack(
        "pgd-linf",
        eps=opts.large_eps,
        steps=opts.pgd_steps,
        step_rule=opts.step_rule,
        seed=seed,
        batch_size=opts.batch_size,
    )(model, x, y).robust_accuracy
    warnings = check_black_box_vs_white_box(table, white_box)
    warnings += check_large_eps({**eps_curve, opts.large_eps: large})
    warnings += check_more_steps(steps_curve)
    warnings += check_random_output(output_randomness(model, x, seed=seed))
    return warnings


def options_dict(opts: EvaluateOptions) -> dict[str, Any]:
    return asdict(opts)
