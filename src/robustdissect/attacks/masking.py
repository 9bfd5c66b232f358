"""Gradient-masking checks (Athalye et al. 2018; Carlini et al. 2019; Croce & Hein 2020).

Each `check_*` function takes measured numbers and returns a list of warning strings (empty when
nothing looks wrong); each message starts with the check that fired and how sure it is
("gradient masking? [more steps; strong evidence] ...") and carries the numbers. Evidence levels:
"strong" (a direct measurement, or two independent checks agree), "moderate" (one check, clear
margin), "weak" (one check that also fits an honestly robust model). `masking_checks` measures what
it needs on a model and runs every check.

A flat accuracy-against-steps curve alone is no evidence: a model robust well beyond eps sits there
too. The steps check therefore fires only when a larger eps does not break the model either (the
two curves agree), or, without an eps curve, as weak evidence.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..modelutil import model_device
from .base import frozen
from .pgd import PGD

EVIDENCE = ("weak", "moderate", "strong")


def masking_warning(check: str, evidence: str, text: str) -> str:
    """One warning line: which check fired, how sure it is, what it measured."""
    assert evidence in EVIDENCE
    return f"gradient masking? [{check}; {evidence} evidence] {text}"


def check_black_box_vs_white_box(
    accuracies: Mapping[str, float], white_box: Mapping[str, bool], margin: float = 0.01
) -> list[str]:
    """Warn when the best black-box attack leaves lower robust accuracy than the best white-box one
    (accuracies of whole table rows, possibly on different images: moderate evidence)."""
    wb = {k: v for k, v in accuracies.items() if white_box.get(k) is True and not math.isnan(v)}
    bb = {k: v for k, v in accuracies.items() if white_box.get(k) is False and not math.isnan(v)}
    if not wb or not bb:
        return []
    best_wb = min(wb, key=lambda k: wb[k])
    best_bb = min(bb, key=lambda k: bb[k])
    if bb[best_bb] < wb[best_wb] - margin:
        return [
            masking_warning(
                "black box beats white box", "moderate",
                f"black-box attack '{best_bb}' leaves {bb[best_bb]:.1%} robust accuracy, "
                f"{100 * (wb[best_wb] - bb[best_bb]):.1f} points below the best white-box attack "
                f"'{best_wb}' ({wb[best_wb]:.1%}): gradients may be masked; trust the lower number",
            )
        ]  # fmt: skip
    return []


def check_black_box_breaks(attack: str, broken: int, attacked: int, n: int, min_share: float = 0.01) -> list[str]:
    """Warn when a black-box attack, run last on the `attacked` points that every white-box attack
    left robust, still breaks some (`broken` of the n images): the gradient attacks missed
    adversarial examples that exist. Strong evidence from `min_share` of the images on (and at
    least 2 images), weak below."""
    if broken <= 0 or n <= 0:
        return []
    evidence = "strong" if broken >= 2 and broken / n >= min_share else "weak"
    return [
        masking_warning(
            "black box beats white box", evidence,
            f"black-box attack '{attack}' broke {broken} of the {attacked} points that every white-box attack "
            f"left robust ({broken / n:.1%} of the {n} images): the gradients mislead the white-box attacks on "
            "them; the worst case includes these points",
        )
    ]  # fmt: skip


def check_large_eps(
    curve: Mapping[float, float], max_accuracy: float = 0.05, tolerance: float = 0.02, n: int | None = None
) -> list[str]:
    """Warn when accuracy at the largest eps stays above `max_accuracy`, or rises with eps by more
    than `tolerance` and (with the number of images `n`) by more than one image: a single image
    that another random start misses is the attack's noise, not evidence."""
    if not curve:
        return []
    if n:
        tolerance = max(tolerance, 1.5 / n)
    eps_sorted = sorted(curve)
    out: list[str] = []
    top = eps_sorted[-1]
    if curve[top] > max_accuracy:
        evidence = "strong" if curve[top] > 4 * max_accuracy else "moderate"
        out.append(
            masking_warning(
                "large eps", evidence,
                f"robust accuracy is still {curve[top]:.1%} at eps={top:g} (expected near 0 for a large "
                f"eps, threshold {max_accuracy:.0%}): the attack may be blocked by gradient masking",
            )
        )  # fmt: skip
    for a, b in itertools.pairwise(eps_sorted):
        if curve[b] > curve[a] + tolerance:
            out.append(
                masking_warning(
                    "accuracy rises with eps", "strong",
                    f"robust accuracy rises from {curve[a]:.1%} at eps={a:g} to {curve[b]:.1%} at eps={b:g}: "
                    "a larger ball must not help the model; the attack is unreliable",
                )
            )  # fmt: skip
    return out


def check_more_steps(
    curve: Mapping[int, float],
    min_gain: float = 0.005,
    floor: float = 0.05,
    eps_curve: Mapping[float, float] | None = None,
    max_accuracy: float = 0.05,
) -> list[str]:
    """Warn when the most PGD steps leave more accuracy than the fewest (the attack does not
    converge), or when more steps do not lower accuracy (unless already <= floor) AND a larger eps
    does not break the model either: the accuracy at the largest eps of `eps_curve` stays above
    `max_accuracy`. A flat steps curve with a larger eps that breaks the model is what a model
    robust beyond eps shows: no warning. Without `eps_curve` the flat curve is weak evidence."""
    if len(curve) < 2:
        return []
    ks = sorted(curve)
    lo, hi = ks[0], ks[-1]
    a_lo, a_hi = curve[lo], curve[hi]
    if a_hi > a_lo + min_gain:
        return [
            masking_warning(
                "more steps", "moderate",
                f"PGD-{hi} leaves more robust accuracy ({a_hi:.1%}) than PGD-{lo} ({a_lo:.1%}): "
                "the iterative attack is not converging; gradients may be masked or the step size is off",
            )
        ]  # fmt: skip
    if a_lo <= floor or a_lo - a_hi >= min_gain:
        return []
    flat = f"PGD-{hi} ({a_hi:.1%}) is no stronger than PGD-{lo} ({a_lo:.1%}): more steps do not help"
    if not eps_curve:
        return [masking_warning("more steps", "weak", f"{flat}; no larger eps was measured to tell masking from "
                                                      "a model robust beyond eps")]  # fmt: skip
    top = max(eps_curve)
    if eps_curve[top] <= max_accuracy:
        return []  # the attack breaks the model at a larger eps: its gradients work
    return [
        masking_warning(
            "more steps", "strong",
            f"{flat}, and eps={top:g} still leaves {eps_curve[top]:.1%}: the attack does not move the images, "
            "a sign of gradient masking",
        )
    ]  # fmt: skip


@dataclass(frozen=True)
class OutputRandomness:
    """flip_rate: fraction of predictions that change under N(0, sigma^2) input noise;
    normalized_entropy: mean softmax entropy / log K (1 = uniform); repeat_max_diff: largest
    |logit difference| between two forward passes on the same input (0 for a deterministic model)."""

    sigma: float
    flip_rate: float
    normalized_entropy: float
    repeat_max_diff: float


def output_randomness(
    model: nn.Module, x: Tensor, sigma: float = 1e-3, seed: int = 0, batch_size: int = 500
) -> OutputRandomness:
    """Measure how random the model's output is on x (N, C, H, W) in [0, 1]."""
    device = model_device(model, x.device)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    flips = 0
    entropy = 0.0
    diff = 0.0
    with torch.inference_mode(False), frozen(model), torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device)
            a = model(xb)
            b = model(xb)
            noise = torch.randn(xb.shape, generator=g, device=xb.device, dtype=xb.dtype)
            c = model((xb + sigma * noise).clamp(0.0, 1.0))
            flips += int((a.argmax(1) != c.argmax(1)).sum())
            logp = torch.log_softmax(a.double(), dim=1)
            entropy += float(-(logp.exp() * logp).sum(dim=1).sum()) / math.log(max(a.shape[1], 2))
            diff = max(diff, float((a - b).abs().max()))
    n = max(1, x.shape[0])
    return OutputRandomness(sigma, flips / n, entropy / n, diff)


def check_random_output(
    stats: OutputRandomness,
    max_flip_rate: float = 0.05,
    max_entropy: float = 0.9,
    max_repeat_diff: float = 1e-4,
) -> list[str]:
    """Warn when the output is stochastic, unstable under tiny noise, or near-uniform."""
    out: list[str] = []
    if stats.repeat_max_diff > max_repeat_diff:
        out.append(
            masking_warning(
                "random output", "strong",
                f"the model's output changes between two passes on the same input (max |logit diff| "
                f"{stats.repeat_max_diff:.3g}): randomised defences need EOT attacks",
            )
        )  # fmt: skip
    if stats.flip_rate > max_flip_rate:
        out.append(
            masking_warning(
                "unstable output", "moderate",
                f"{stats.flip_rate:.1%} of predictions change under Gaussian noise of sigma={stats.sigma:g} "
                f"(threshold {max_flip_rate:.0%}): the output looks random, gradients are unreliable",
            )
        )  # fmt: skip
    if stats.normalized_entropy > max_entropy:
        out.append(
            masking_warning(
                "near-uniform output", "weak",
                f"mean softmax entropy is {stats.normalized_entropy:.2f} of the uniform maximum (threshold "
                f"{max_entropy:.2f}): near-uniform outputs can hide gradients",
            )
        )  # fmt: skip
    return out


AccuracyFn = Callable[[PGD], float]  # robust accuracy of an attack on the checked images
PGDFactory = Callable[[float, int], PGD]  # (eps, steps) -> the PGD the checks run


def zero_gradient_share(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Share of samples x (N, C, H, W) whose input gradient of CE(F(x), y) is exactly zero (e.g.
    a softmax saturated in float32) or not finite: PGD cannot move them, so their robustness is
    fake."""
    device = model_device(model, x.device)
    zero = 0
    with torch.inference_mode(False), frozen(model), torch.enable_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device).detach().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(xb), y[i : i + batch_size].to(device), reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)
            flat = g.flatten(1)
            zero += int(((flat.abs().amax(dim=1) == 0) | ~torch.isfinite(flat).all(dim=1)).sum())
    return zero / max(1, x.shape[0])


def check_zero_gradients(share: float, max_share: float = 0.01) -> list[str]:
    """Warn when more than `max_share` of the samples have an exactly zero input gradient."""
    if share > max_share:
        return [
            masking_warning(
                "zero gradients", "strong",
                f"{share:.1%} of the samples have an exactly zero (or non-finite) input gradient (threshold "
                f"{max_share:.0%}): "
                "the softmax is saturated or the gradient is masked, so gradient attacks cannot move them; "
                "use a margin/DLR loss (apgd-dlr) or a black-box attack before trusting robust accuracy",
            )
        ]  # fmt: skip
    return []


def _default_pgd(norm: str, seed: int) -> PGDFactory:
    return lambda eps, steps: PGD(eps, norm=norm, steps=steps, step_rule="madry", early_stop=True, seed=seed)


def check_margin_vs_ce(
    broken: Mapping[str, int], n: int, margin_attacks: Sequence[str] = ("apgd-dlr",), min_share: float = 0.01
) -> list[str]:
    """Warn when a margin/DLR attack, run after the cross-entropy attacks of a worst-case cascade,
    still breaks more than `min_share` of the n points: CE gradients were too weak (saturated
    softmax, masking) to find those adversarial examples. `broken`: points each attack broke."""
    out: list[str] = []
    for name in margin_attacks:
        k = broken.get(name, 0)
        if n and k / n > min_share:
            out.append(
                masking_warning(
                    "margin loss beats cross-entropy", "moderate",
                    f"'{name}' (margin loss) broke {k} of {n} points ({k / n:.1%}) that the cross-entropy attacks "
                    "before it left robust: CE gradients are weak on this model (saturated softmax or masking); "
                    "trust the worst case, and add apgd-dlr / more restarts to any CE-only evaluation",
                )
            )  # fmt: skip
    return out


def _accuracy_fn(model: nn.Module, x: Tensor, y: Tensor, accuracy: AccuracyFn | None) -> AccuracyFn:
    if accuracy is not None:
        return accuracy
    return lambda attack: attack(model, x, y).robust_accuracy


def accuracy_vs_eps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_values: Sequence[float],
    norm: str = "linf",
    steps: int = 20,
    seed: int = 0,
    accuracy: AccuracyFn | None = None,
    pgd: PGDFactory | None = None,
) -> dict[float, float]:
    """Robust accuracy under PGD-k for each eps; `pgd(eps, k)` builds the attack (default alpha
    2.5 eps / k, random start, early stop), `accuracy(attack)` runs it (default: on x, y)."""
    run = _accuracy_fn(model, x, y, accuracy)
    make = pgd or _default_pgd(norm, seed)
    return {float(e): run(make(float(e), steps)) for e in eps_values}


def accuracy_vs_steps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps_values: Sequence[int] = (1, 10, 30),
    norm: str = "linf",
    seed: int = 0,
    accuracy: AccuracyFn | None = None,
    pgd: PGDFactory | None = None,
) -> dict[int, float]:
    """Robust accuracy under PGD-k for each k (attack built by `pgd(eps, k)`, as accuracy_vs_eps)."""
    run = _accuracy_fn(model, x, y, accuracy)
    make = pgd or _default_pgd(norm, seed)
    return {int(k): run(make(eps, int(k))) for k in steps_values}


@dataclass(frozen=True)
class MaskingReport:
    """What the checks measured (accuracy against eps and against steps, output randomness, share
    of zero input gradients) and the warnings they raised."""

    accuracy_vs_eps: dict[float, float]
    accuracy_vs_steps: dict[int, float]
    randomness: OutputRandomness
    zero_gradient_share: float
    warnings: list[str]


def masking_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    accuracies: Mapping[str, float] | None = None,
    white_box: Mapping[str, bool] | None = None,
    large_eps: float | None = None,
    eps_values: Sequence[float] | None = None,
    steps_values: Sequence[int] = (1, 10, 30),
    steps: int = 20,
    seed: int = 0,
    accuracy: AccuracyFn | None = None,
    pgd: PGDFactory | None = None,
) -> MaskingReport:
    """Measure and run every check on x (N, C, H, W), y (N,): accuracy against eps (up to a large
    eps, AutoAttack's "eps = large" check) and against steps, output randomness, zero gradients,
    and black-box against white-box when `accuracies` / `white_box` from an evaluation are given.

    large_eps: default 0.5 (L-inf) or 0.5 * sqrt(C*H*W) (L2). eps_values: the sweep (default
    eps, 2 eps, 4 eps); large_eps is always added. accuracy(attack): how attacks are run (e.g.
    through a run's evidence store); default directly on x, y. pgd(eps, steps): the attack of the
    sweeps (default PGD with alpha 2.5 eps / k, random start, early stop).
    """
    if eps <= 0:
        raise UserError(f"masking checks need eps > 0, got {eps}")
    if large_eps is None:
        large_eps = max(0.5, 4 * eps) if norm == "linf" else max(0.5 * math.sqrt(x[0].numel()), 4 * eps)
    grid = sorted({float(e) for e in (eps_values if eps_values is not None else (eps, 2 * eps, 4 * eps))} | {large_eps})
    by_eps = accuracy_vs_eps(model, x, y, grid, norm=norm, steps=steps, seed=seed, accuracy=accuracy, pgd=pgd)
    by_steps = accuracy_vs_steps(model, x, y, eps, steps_values, norm=norm, seed=seed, accuracy=accuracy, pgd=pgd)
    randomness = output_randomness(model, x, seed=seed)
    zero = zero_gradient_share(model, x, y)
    warnings = check_large_eps(by_eps, n=len(y)) + check_more_steps(by_steps, eps_curve=by_eps)
    warnings += check_random_output(randomness)
    warnings += check_zero_gradients(zero)
    if accuracies is not None and white_box is not None:
        warnings += check_black_box_vs_white_box(accuracies, white_box)
    return MaskingReport(by_eps, by_steps, randomness, zero, warnings)
