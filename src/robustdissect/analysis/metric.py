"""Model-level robustness metric Ψ (METHODS §2.3, reconstructed from Yu et al. 2019).

    ψ(x) = max_{‖δ‖∞ ≤ ε, x+δ ∈ [0,1]} KL( p_T(x) ‖ p_T(x+δ) ),    p_T = softmax(Z / T)
    Ψ    = mean_x ψ(x)   (also the 90th percentile); lower Ψ = more robust; no labels needed.

The maximiser is the package's PGD with `loss="kl"` (TRADES-style: Gaussian start of σ 0.001,
K sign steps of α = ε/4, projection onto the ball ∩ [0,1]) and `keep="max-loss"`, so each image
keeps the iterate of highest divergence whether or not its prediction flips. PGD needs labels
only for its bookkeeping; the clean predictions are passed.

K = 5 by default (`DEFAULT_STEPS`; METHODS §2.3 names K = 20, which stays an option: `steps=20`,
`robustdissect metric --steps 20`). Evidence that K = 5 ranks models like K = 20, measured on the
13 shipped YU-1 checkpoints (`python -m robustdissect.studies.yu1 --out docs/results/yu1
--psi-steps-check`, written to docs/results/yu1/psi_steps.json; ε = 0.1, T on 1,000 validation
images, two seeded sets of 100 test images): Spearman 0.978 and 0.978, Kendall 0.897 and 0.923
between the K = 5 and the K = 20 Ψ columns (4 and 3 of 78 model pairs swapped), while K = 20
against itself on the two image sets gives Spearman 0.984, Kendall 0.923 (3 pairs swapped): going
from K = 20 to K = 5 moves the ranking about as much as drawing another 100 images does. Every
swapped pair is two models whose K = 20 Ψ differ by at most 9% (PAT / SNS / TRADES / ALP, fast AT /
4-conv PGD-AT, smallcnn-w8 standard / label smoothing); the standard and the adversarially trained
models never mix. K = 3 falls to Spearman 0.951 / Kendall 0.872 on the second image set, K = 1 to
0.852 / 0.744. Ψ at K = 5 is smaller than at K = 20 (a weaker maximiser of the same maximum), so
compare Ψ values only at the same K.

Cost: one forward on the calibration images per model (cached in this process by the model's
weights, the images and the target, so further Ψ calls on the same model skip it), one forward on
x for the clean logits, one inside PGD for the KL's clean probabilities (whose logits PGD hands
back, so the attack's clean check repeats nothing), K forward+backward passes and one forward on
the last iterate; ψ is read from the attack's own logits on x_adv. `MetricResult.seconds` is the
whole call including calibration when it ran, `calibration_seconds` the part spent calibrating.
Measured by bench/metric.py (100 test images, one thread, a loaded 2-core machine): Ψ at K = 5
from scratch costs 0.10 of an early-stopped PGD-100 evaluation (ε = 0.1, 2 restarts) of the same
images on the PGD-trained smallcnn (0.05 once T is cached) but 2.5× it on the standard smallcnn,
whose images PGD breaks in a few steps; K = 20 costs 1.8–2.2× the K = 5 time.

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

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import PGD, Attack
from ..errors import UserError
from ..modelutil import eval_mode, model_device
from ..store import model_hash

__all__ = [
    "CALIBRATIONS",
    "DEFAULT_STEPS",
    "LogitTransform",
    "MetricResult",
    "calibrate_temperature",
    "clear_calibration_cache",
    "kl_divergence",
    "logits_of",
    "metric_attack",
    "model_temperature",
    "robustness_metric",
]

CALIBRATIONS = ("temperature", "logit_norm", "none")
DEFAULT_STEPS = 5  # KL-PGD steps of the default maximiser; see the module docstring for K = 5 vs 20
_CACHE_SIZE = 64
# (model weights, calibration images, target) -> (T, reached, seconds it took)
_TEMPERATURES: OrderedDict[tuple[str, str, float], tuple[float, bool, float]] = OrderedDict()

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


def _fingerprint(x: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def clear_calibration_cache() -> None:
    """Forget every cached temperature (the next Ψ call of each model calibrates again)."""
    _TEMPERATURES.clear()


def model_temperature(model: nn.Module, calibration_x: Tensor, target: float = 0.9, batch_size: int = 500,
                      cache: bool = True) -> tuple[float, bool, float, bool]:  # fmt: skip
    """T of `model` on the clean images `calibration_x` (M, C, H, W) (`calibrate_temperature` on
    one batched forward of them). Returns (T, reached, seconds spent in this call, from cache).

    With `cache`, T is kept in this process under the SHA-256 of the model's weights, of the images
    and the target, so changing any of them calibrates again."""
    key = (model_hash(model), _fingerprint(calibration_x), float(target)) if cache else None
    if key is not None and key in _TEMPERATURES:
        _TEMPERATURES.move_to_end(key)
        t, reached, _ = _TEMPERATURES[key]
        return t, reached, 0.0, True
    t0 = time.perf_counter()
    t, reached = calibrate_temperature(logits_of(model, calibration_x, batch_size), target)
    seconds = time.perf_counter() - t0
    if key is not None:
        _TEMPERATURES[key] = (t, reached, seconds)
        while len(_TEMPERATURES) > _CACHE_SIZE:
            _TEMPERATURES.popitem(last=False)
    return t, reached, seconds, False


def metric_attack(eps: float, steps: int = DEFAULT_STEPS, alpha: float | None = None, restarts: int = 1, seed: int = 0,
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
    the whole call (calibration when it ran, attack, forwards); calibration_seconds: the part of
    it spent calibrating (0 when T came from the cache: `calibration_cached`)."""

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
    calibration_seconds: float = 0.0
    calibration_cached: bool = False

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
            "calibration_seconds": self.calibration_seconds, "calibration_cached": self.calibration_cached,
        }  # fmt: skip


def robustness_metric(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float = 0.1,
    steps: int = DEFAULT_STEPS,
    alpha: float | None = None,
    restarts: int = 1,
    calibration: str = "temperature",
    calibration_x: Tensor | None = None,
    target_confidence: float = 0.9,
    logit_scale: float = 10.0,
    seed: int = 0,
    batch_size: int = 500,
    run_attack: AttackRunner | None = None,
    cache_calibration: bool = True,
) -> MetricResult:
    """Ψ of `model` on images x (N, C, H, W) in [0, 1] (METHODS §2.3).

    steps: K of the KL-PGD (default 5; 20 is METHODS' value); calibration_x: clean held-out images
    (M, C, H, W) for the temperature (default: x itself); run_attack: how to run the maximiser
    (default: call it), e.g. through an evidence store; cache_calibration: reuse T of the same
    model weights, images and target from an earlier call in this process."""
    if calibration not in CALIBRATIONS:
        raise UserError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    if len(x) == 0:
        raise UserError("the robustness metric needs at least one image")
    t0 = time.perf_counter()
    temperature: float | None = 1.0
    calibrated = True
    cal_seconds, cal_cached = 0.0, False
    if calibration == "temperature":
        temperature, calibrated, cal_seconds, cal_cached = model_temperature(
            model, calibration_x if calibration_x is not None else x, target_confidence, batch_size,
            cache=cache_calibration,
        )  # fmt: skip
    wrapped = LogitTransform(model, temperature or 1.0, logit_norm=calibration == "logit_norm",
                             logit_scale=logit_scale)  # fmt: skip
    if calibration == "logit_norm":
        temperature = None
    z_clean = logits_of(wrapped, x, batch_size)
    y = z_clean.argmax(dim=1)
    attack = metric_attack(eps, steps, alpha, restarts, seed, batch_size)
    if run_attack is None:
        device = model_device(model, x.device)
        z_adv = attack(wrapped, x.to(device), y.to(device)).logits.detach().float().cpu()  # logits at x_adv
    else:
        z_adv = logits_of(wrapped, run_attack(wrapped, attack, x, y), batch_size)
    psi = kl_divergence(z_clean, z_adv)
    seconds = time.perf_counter() - t0
    return MetricResult(
        psi=psi, mean=float(psi.mean()), p90=float(torch.quantile(psi.double(), 0.9)), calibration=calibration,
        temperature=temperature, calibrated=calibrated, eps=float(eps), steps=steps, restarts=restarts,
        flipped=float((z_adv.argmax(1) != y).float().mean()), seconds=seconds, calibration_seconds=cal_seconds,
        calibration_cached=cal_cached,
    )  # fmt: skip
