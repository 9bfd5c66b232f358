"""Adversarial-training objectives: PGD-AT (PAT), adversarial logit pairing (ALP), TRADES and
fast FGSM-AT, all plugged into the one training loop.

Inner maximisation. Every objective generates its training perturbation with the model in **eval
mode** (BatchNorm uses its running statistics, as the attack library does for every attack); the
training modes of all modules are restored afterwards. Some reference code (Madry et al.'s, Wong
et al.'s fast AT) runs the inner loop in train mode instead; we choose eval mode so that a training
perturbation is the same kind of point the evaluation attacks produce, and so that the inner loop
does not move the BatchNorm running statistics. The inner loop runs in fp32 (autocast off) and
differentiates with respect to the input only (no weight gradients are computed).

Outer step. Clean and adversarial batches go through the model as **one concatenated batch** of
2B images (one forward, one backward; BatchNorm in train mode normalises over both halves).

Randomness (random starts, TRADES' Gaussian start) comes from a generator reseeded from
(seed, epoch) at every epoch start, so a run resumed at epoch e draws exactly what an uninterrupted
run draws.

Tensor shapes: x (B, C, H, W) float in [0, 1]; y (B,) int64; logits (B, K).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import PGD
from ..errors import UserError
from .objectives import OBJECTIVES, StepOutput

__all__ = ["ALP", "PAT", "TRADES", "AdversarialObjective", "FastAT"]

MIXES = ("half", "adv")


class AdversarialObjective:
    """Shared settings and machinery of the L-inf adversarial objectives.

    eps: L-inf radius in pixel units; steps: k; alpha: step size (None: `step_rule`, "paper" =
    eps/sqrt(k), "madry" = 2.5*eps/k); random_start: start away from x; seed: base of the
    per-epoch generator; loss and start: the inner attack's loss ("ce", "kl") and start kind
    ("uniform", "gaussian"). The inner maximisation is `attacks.PGD` (`self.attack`).
    """

    name = "adversarial"

    def __init__(
        self,
        eps: float = 0.1,
        steps: int = 10,
        alpha: float | None = None,
        step_rule: str = "paper",
        random_start: bool = True,
        seed: int = 0,
        loss: str = "ce",
        start: str = "uniform",
    ) -> None:
        if not (eps >= 0 and math.isfinite(eps)):
            raise UserError(f"eps must be a finite number >= 0, got {eps}")
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"steps must be an integer >= 1, got {steps!r}")
        self.eps = float(eps)
        self.steps = steps
        self.step_rule = step_rule
        self.random_start = bool(random_start)
        self.seed = int(seed)
        if self.eps == 0:
            alpha = None  # nothing to step; the attack returns x
        self.attack = PGD(
            self.eps,
            norm="linf",
            steps=steps,
            alpha=alpha,
            step_rule=step_rule,
            loss=loss,
            random_start=start if self.random_start else "none",
            seed=self.seed,
        )
        self.alpha = self.attack.alpha
        self._epoch = 0
        self._gen: torch.Generator | None = None
        self.rank_stream = 0  # set to the rank under data-parallel training: a distinct random stream

    # -- randomness -------------------------------------------------------------------------
    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self._epoch = epoch
        self._gen = None  # recreated lazily on the batch's device

    def generator(self, device: torch.device) -> torch.Generator:
        """The epoch's generator on `device`, seeded from (seed, epoch)."""
        if self._gen is None or self._gen.device != device:
            seed = self.seed * 1_000_003 + self._epoch + 7_919 * self.rank_stream
            self._gen = torch.Generator(device=device).manual_seed(seed)
        return self._gen

    def pgd(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training perturbation x' (B, C, H, W) against the current model: the attack
        library's PGD (`self.attack`), k steps from its start, last iterate."""
        return self.attack.perturb(model, x, y, self.generator(x.device))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "eps": self.eps,
            "steps": self.steps,
            "alpha": self.alpha,
            "step_rule": self.step_rule,
            "random_start": self.random_start,
            "seed": self.seed,
            "inner_mode": "eval",
        }


def _split_forward(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward on the concatenated batch (2B, C, H, W); returns clean and adversarial logits."""
    logits = model(torch.cat([x, x_adv]))
    return logits[: len(x)], logits[len(x) :]


@OBJECTIVES.register("pat", "PGD adversarial training: 1/2 CE(clean) + 1/2 CE(adv), or pure adversarial")
class PAT(AdversarialObjective):
    """PGD adversarial training (Madry et al. 2018; the neuron-sensitivity paper's PAT).

    L = ½CE(F(x), y) + ½CE(F(x'), y) with `mix="half"` (default), L = CE(F(x'), y) with
    `mix="adv"`; x' = L-inf PGD-k on the current model. With `mix="adv"` the returned logits are
    the adversarial ones (the running accuracy is then robust training accuracy).
    """

    name = "pat"

    def __init__(self, eps: float = 0.1, steps: int = 10, mix: str = "half", **kwargs: Any) -> None:
        super().__init__(eps=eps, steps=steps, **kwargs)
        if mix not in MIXES:
            raise UserError(f"mix must be one of {', '.join(MIXES)}, got {mix!r}")
        self.mix = mix

    def adv_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(L_adv scalar, logits to report (B, K), adversarial logits (B, K) or None)."""
        if self.mix == "adv":
            adv_logits = model(x_adv)
            return F.cross_entropy(adv_logits, y), adv_logits, adv_logits
        clean, adv = _split_forward(model, x, x_adv)
        return 0.5 * F.cross_entropy(clean, y) + 0.5 * F.cross_entropy(adv, y), clean, adv

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        x_adv = self.pgd(model, x, y)
        loss, logits, _ = self.adv_loss(model, x, y, x_adv)
        return StepOutput(loss, logits, {})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mix": self.mix}


@OBJECTIVES.register("alp", "adversarial logit pairing: PAT + lambda * ||Z(x) - Z(x')||^2")
class ALP(PAT):
    """Adversarial logit pairing (Kannan et al. 2018) as in the neuron-sensitivity paper:
    L = PAT loss + λ·mean_i ‖Z(x_i) − Z(x'_i)‖²₂ (λ = 0.5, logits Z (B, K)); mix "half" only."""

    name = "alp"

    def __init__(self, eps: float = 0.1, steps: int = 10, lam: float = 0.5, **kwargs: Any) -> None:
        super().__init__(eps=eps, steps=steps, **kwargs)
        if self.mix != "half":
            raise UserError("alp pairs clean and adversarial logits; it needs mix='half'")
        self.lam = float(lam)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        x_adv = self.pgd(model, x, y)
        clean, adv = _split_forward(model, x, x_adv)
        base = 0.5 * F.cross_entropy(clean, y) + 0.5 * F.cross_entropy(adv, y)
        pair = (clean - adv).pow(2).sum(dim=1).mean()
        return StepOutput(base + self.lam * pair, clean, {"alp_pair": float(pair.detach())})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lam": self.lam}


@OBJECTIVES.register("trades", "TRADES: CE(clean) + beta * KL(F(x) || F(x')), KL inner maximisation")
class TRADES(AdversarialObjective):
    """TRADES (Zhang et al. 2019): L = CE(F(x), y) + β·KL(p(x) ‖ p(x')), β = 6.

    x' maximises KL(p(x) ‖ p(x')) by L-inf PGD-k from x + 0.001·N(0, 1) (the reference start);
    KL is summed over classes and averaged over the batch.
    """

    name = "trades"

    def __init__(self, eps: float = 0.1, steps: int = 10, beta: float = 6.0, **kwargs: Any) -> None:
        kwargs.setdefault("random_start", True)
        super().__init__(eps=eps, steps=steps, loss="kl", start="gaussian", **kwargs)
        self.beta = float(beta)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        x_adv = self.pgd(model, x, y)
        clean, adv = _split_forward(model, x, x_adv)
        robust = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        loss = F.cross_entropy(clean, y) + self.beta * robust
        return StepOutput(loss, clean, {"trades_kl": float(robust.detach())})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beta": self.beta}


@OBJECTIVES.register("fast", "fast adversarial training: FGSM from a uniform random start (Wong et al. 2020)")
class FastAT(AdversarialObjective):
    """Fast AT (Wong et al. 2020): δ0 ~ U(−ε, ε), one signed step of α = 1.25ε (`alpha`),
    δ clipped to [−ε, ε] and x + δ to [0, 1]; L = CE(F(x + δ), y) (`mix="adv"`, default) or the
    1:1 mix. Returns the adversarial logits with mix "adv"."""

    name = "fast"

    def __init__(self, eps: float = 0.1, alpha: float | None = None, mix: str = "adv", **kwargs: Any) -> None:
        kwargs.pop("steps", None)
        super().__init__(eps=eps, steps=1, alpha=1.25 * eps if alpha is None else alpha, **kwargs)
        if mix not in MIXES:
            raise UserError(f"mix must be one of {', '.join(MIXES)}, got {mix!r}")
        self.mix = mix

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        x_adv = self.pgd(model, x, y)
        if self.mix == "adv":
            logits = model(x_adv)
            return StepOutput(F.cross_entropy(logits, y), logits, {})
        clean, adv = _split_forward(model, x, x_adv)
        return StepOutput(0.5 * F.cross_entropy(clean, y) + 0.5 * F.cross_entropy(adv, y), clean, {})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mix": self.mix}
