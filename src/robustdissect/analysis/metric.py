"""Model-level robustness metric Ψ (METHODS §2.3, reconstructed from Yu et al. 2019).

    ψ(x) = max_{‖δ‖∞ ≤ ε, x+δ ∈ [0,1]} KL( p_T(x) ‖ p_T(x+δ) ),    p_T = softmax(Z / T)
    Ψ    = mean_x ψ(x)   (also the 90th percentile); lower Ψ = more robust; no labels needed.

The maximiser is the package's PGD with `loss="kl"` (TRADES-style: Gaussian start of σ 0.001,
K sign steps of α = ε/4, projection onto the ball ∩ [0,1]) and `keep="max-loss"`, so each image
keeps the iterate of highest divergence whether or not its prediction flips. PGD needs labels
only for its bookkeeping; the clean predictions are passed.

Rescaling the logits (Z → cZ) changes no decision but changes raw KL. `calibration`:

- "temperature" (default): T per model such that the mean max-softmax of Z/T on a clean held-out
  batch equals `target_confidence` (0.9), found by bisection on log T; Z → cZ gives T → cT and
  the same p_T, hence the same Ψ.
- "logit_norm": Z ← s·Z/‖Z‖₂ (fixed s = `logit_scale`), invariant to Z → cZ for c > 0.
- "none": raw KL on softmax(Z).

Either transform is a module wrapped around the model (`LogitTransform`), so the attack, the
evidence store (which keys on the wrapper's weights, T included) and the KL all see p_T.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import PGD, Attack
from ..errors import UserError
from ..modelutil import eval_mode, model_device

__all__ = [
    "CALIBRATIONS",
    "LogitTransform",
    "MetricResult",
    "calibrate_temperature",
    "kl_divergence",
    "logits_of",
    "metric_attack",
    "robustness_metric",
]

CALIBRATIONS = ("temperature", "logit_norm", "none")

# (model, attack, x (N, C, H, W), y (N,)) -> x_adv (N, C, H, W); lets a stage route the attack
# through the run's evidence store.
AttackRunner = Callable[[nn.Module, Attack, Tensor, Tensor], Tensor]


class LogitTransform(nn.Module):
    """`model` followed by Z/T (`temperature`) or s·Z/‖Z‖₂ (`logit_scale`, with `logit_norm`).

    Input (N, C, H, W), output (N, K). T and s are buffers, so `store.model_hash` tells models
    with different calibrations apart."""

    def __init__(self, model: nn.Module, temperature: float = 1.0, logit_norm: bool = False,
                 logit_scale: float = 10.0) -> None:  # fmt: skip
        super().__init__()
        if not temperature > 0 or not math.isfinite(temperature):
            raise UserError(f"temperature must be a positive number, got {temperature}")
        if not logit_scale > 0:
            raise UserError(f"logit_scale must be > 0, got {logit_scale}")
        self.model = model
        self.logit_norm = bool(logit_norm)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def forward(self, x: Tensor) -> Tensor:
        z = self.model(x).float()
        if self.logit_norm:
            return self.logit_scale * z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return z / self.temperature


def logits_of(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Logits (N, K) of `model` on x (N, C, H, W) in eval mode, on the CPU."""
    device = model_device(model, x.device)
    out = []
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(x[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def kl_divergence(z_clean: Tensor, z_adv: Tensor) -> Tensor:
    """KL(softmax(z_clean) ‖ softmax(z_adv)) per row (N,), ≥ 0; exactly 0 for identical rows."""
    logp = F.log_softmax(z_clean.double(), dim=1)
    logq = F.log_softmax(z_adv.double(), dim=1)
    return (logp.exp() * (logp - logq)).sum(dim=1).clamp_min(0.0).float()


def calibrate_temperature(logits: Tensor, target: float = 0.9, iterations: int = 100) -> tuple[float, bool]:
    """T such that mean_i max softmax(logits_i / T) = `target`, by bisection on log T.

    logits: (N, K) of a clean held-out batch. Returns (T, reached): when no T in [1e-6, 1e6] reaches
    the target (constant or tied logits), the closer bound and False."""
    if not 0.0 < target < 1.0:
        raise UserError(f"target_confidence must be in (0, 1), got {target}")
    z = logits.double()

    def confidence(log_t: float) -> float:
        return float(F.softmax(z / math.exp(log_t), dim=1).amax(dim=1).mean())

    lo, hi = math.log(1e-6), math.log(1e6)  # confidence decreases in T
    c_lo, c_hi = confidence(lo), confidence(hi)
    if c_lo < target:
        return math.exp(lo), False
    if c_hi > target:
        return math.exp(hi), False
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if confidence(mid) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi)), True


def metric_attack(eps: float, steps: int = 20, alpha: float | None = None, restarts: int = 1, seed: int = 0,
                  batch_size: int | None = 500) -> PGD:  # fmt: skip
    """The ψ maximiser: L-inf PGD on KL(p(x) ‖ p(x')), Gaussian start σ 0.001, α = ε/4 by default,
    keeping each image's highest-KL iterate."""
    return PGD(
        eps, norm="linf", steps=steps, alpha=alpha if alpha is not None else max(eps, 1e-12) / 4, loss="kl",
        random_start="gaussian", start_sigma=0.001, restarts=restarts, keep="max-loss", seed=seed,
        batch_size=batch_size,
    )  # fmt: skip


@dataclass(frozen=True)
class MetricResult:
    """Ψ of one model on N images.

    psi: (N,) ψ(x) per image; mean / p90: Ψ and its 90th percentile; temperature: T used (1 for
    "none", None for "logit_norm"); calibrated: whether the bisection reached the target;
    flipped: fraction of images whose prediction changes at the maximiser; seconds: wall time of
    the whole computation (calibration, attack, final forwards)."""

    psi: Tensor
    mean: float
    p90: float
    calibration: str
    temperature: float | None
    calibrated: bool
    eps: float
    steps: int
    restarts: int
    flipped: float
    seconds: float

    @property
    def n(self) -> int:
        return int(self.psi.numel())

    @property
    def robustness(self) -> float:
        """1/Ψ (optional read-out of METHODS §2.3)."""
        return 1.0 / self.mean if self.mean > 0 else math.inf

    def summary(self) -> dict[str, float | int | str | bool | None]:
        return {
            "psi_mean": self.mean, "psi_p90": self.p90, "n": self.n, "eps": self.eps, "steps": self.steps,
            "restarts": self.restarts, "calibration": self.calibration, "temperature": self.temperature,
            "calibrated": self.calibrated, "flipped": self.flipped, "seconds": self.seconds,
        }  # fmt: skip


def robustness_metric(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float = 0.1,
    steps: int = 20,
    alpha: float | None = None,
    restarts: int = 1,
    calibration: str = "temperature",
    calibration_x: Tensor | None = None,
    target_confidence: float = 0.9,
    logit_scale: float = 10.0,
    seed: int = 0,
    batch_size: int = 500,
    run_attack: AttackRunner | None = None,
) -> MetricResult:
    """Ψ of `model` on images x (N, C, H, W) in [0, 1] (METHODS §2.3).

    calibration_x: clean held-out images (M, C, H, W) for the temperature (default: x itself);
    run_attack: how to run the maximiser (default: call it), e.g. through an evidence store."""
    if calibration not in CALIBRATIONS:
        raise UserError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    if len(x) == 0:
        raise UserError("the robustness metric needs at least one image")
    t0 = time.perf_counter()
    temperature: float | None = 1.0
    calibrated = True
    if calibration == "temperature":
        cal = logits_of(model, calibration_x if calibration_x is not None else x, batch_size)
        temperature, calibrated = calibrate_temperature(cal, target_confidence)
    wrapped = LogitTransform(model, temperature or 1.0, logit_norm=calibration == "logit_norm",
                             logit_scale=logit_scale)  # fmt: skip
    if calibration == "logit_norm":
        temperature = None
    z_clean = logits_of(wrapped, x, batch_size)
    y = z_clean.argmax(dim=1)
    attack = metric_attack(eps, steps, alpha, restarts, seed, batch_size)
    if run_attack is None:
        device = model_device(model, x.device)
        x_adv = attack(wrapped, x.to(device), y.to(device)).x_adv.cpu()
    else:
        x_adv = run_attack(wrapped, attack, x, y)
    z_adv = logits_of(wrapped, x_adv, batch_size)
    psi = kl_divergence(z_clean, z_adv)
    seconds = time.perf_counter() - t0
    return MetricResult(
        psi=psi, mean=float(psi.mean()), p90=float(torch.quantile(psi.double(), 0.9)), calibration=calibration,
        temperature=temperature, calibrated=calibrated, eps=float(eps), steps=steps, restarts=restarts,
        flipped=float((z_adv.argmax(1) != y).float().mean()), seconds=seconds,
    )  # fmt: skip
