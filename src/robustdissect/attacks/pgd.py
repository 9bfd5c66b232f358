"""FGSM and PGD (L-inf and L2), untargeted and targeted, with the threat model kept separate.

FGSM:   x' = clip[0,1](x + eps * sign(grad_x CE(F(x), y)))         (targeted: minus, CE to target)
PGD:    x(t+1) = Proj_{B(x, eps) ∩ [0,1]}(x(t) + alpha * step_norm(grad_x L(x(t))))
        L = CE(F(x), y) (untargeted) or -CE(F(x), t) (targeted); random start in the ball.

Step size: alpha = eps / sqrt(k) ("paper", the neuron-sensitivity paper), or 2.5 * eps / k
("madry"), or an explicit value. Each sample keeps its best iterate over all restarts: successful
iterates beat unsuccessful ones, and among equals the one with the higher loss wins ("best");
`keep="first"` freezes a sample at its first successful iterate, `keep="last"` returns the final one.

Cost of PGD-k: k forward+backward passes with respect to the input plus one forward on the last
iterate; gradients are taken with torch.autograd.grad on the input only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import UserError
from .base import ATTACKS, Attack, SearchOutput, check_int, check_positive
from .losses import cross_entropy
from .threat import get_threat

DEFAULT_EPS = {"linf": 0.1, "l2": 1.5}  # Fashion-MNIST defaults (METHODS §8.1)
STEP_RULES = ("paper", "madry")
KEEP_RULES = ("best", "first", "last")


def _objective(logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
    """Per-sample loss to maximise: CE to y, or -CE to the target."""
    if targets is None:
        return cross_entropy(logits, y)
    return -cross_entropy(logits, targets)


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al. 2015), L-inf; one gradient, one step of eps."""

    supports_targeted = True

    def __init__(
        self,
        eps: float = DEFAULT_EPS["linf"],
        *,
        target: str | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(name="fgsm", norm="linf", eps=eps, seed=seed, batch_size=batch_size, target=target)

    def _search(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, generator: torch.Generator
    ) -> SearchOutput:
        x0 = x.detach().requires_grad_(True)
        logits = model(x0)
        (grad,) = torch.autograd.grad(_objective(logits, y, targets).sum(), x0)
        x_adv = (x + self.eps * grad.sign()).clamp_(0.0, 1.0)
        return SearchOutput(x_adv, clean_logits=logits.detach())


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018) in the L-inf or L2 ball.

    eps: radius (pixel units); steps: k; alpha: step size (None: from `step_rule`, "paper" =
    eps/sqrt(k), "madry" = 2.5*eps/k); random_start: start at a random point of the ball; restarts:
    number of runs, each after the first only on the samples not yet successful; target: None,
    "random" or "least-likely" (explicit targets go to the call); keep: "best", "first" or "last"
    iterate per sample.
    """

    supports_targeted = True

    def __init__(
        self,
        eps: float | None = None,
        *,
        norm: str = "linf",
        steps: int = 10,
        alpha: float | None = None,
        step_rule: str = "paper",
        random_start: bool = True,
        restarts: int = 1,
        target: str | None = None,
        keep: str = "best",
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        if norm not in DEFAULT_EPS:
            raise UserError(f"unknown norm '{norm}' for PGD; use linf or l2")
        eps = DEFAULT_EPS[norm] if eps is None else eps
        super().__init__(name=f"pgd-{norm}", norm=norm, eps=eps, seed=seed, batch_size=batch_size, target=target)
        check_int("steps", steps)
        check_int("restarts", restarts)
        if step_rule not in STEP_RULES:
            raise UserError(f"step_rule must be one of {', '.join(STEP_RULES)}, got {step_rule!r}")
        if keep not in KEEP_RULES:
            raise UserError(f"keep must be one of {', '.join(KEEP_RULES)}, got {keep!r}")
        if alpha is not None:
            check_positive("alpha", alpha)
        self.steps = steps
        self.step_rule = step_rule
        self.alpha = float(alpha) if alpha is not None else self.default_alpha(self.eps, steps, step_rule)
        self.random_start = bool(random_start)
        self.restarts = restarts
        self.keep = keep

    @staticmethod
    def default_alpha(eps: float, steps: int, rule: str = "paper") -> float:
        """eps / sqrt(k) ("paper") or 2.5 * eps / k ("madry")."""
        return eps / math.sqrt(steps) if rule == "paper" else 2.5 * eps / steps

    def _search(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, generator: torch.Generator
    ) -> SearchOutput:
        best_x, best_logits, best_loss, best_ok, clean = self._run(model, x, y, targets, generator)
        for _ in range(self.restarts - 1):
            todo = (~best_ok).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            sub_t = targets[todo] if targets is not None else None
            rx, rl, rloss, rok, _ = self._run(model, x[todo], y[todo], sub_t, generator)
            better = _better(rok, rloss, best_ok[todo], best_loss[todo], self.keep)
            pick = todo[better]
            best_x[pick] = rx[better]
            best_logits[pick] = rl[better]
            best_loss[pick] = rloss[better]
            best_ok[pick] = rok[better]
        return SearchOutput(best_x, logits=best_logits, clean_logits=clean)

    def _run(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """One PGD run; returns best x (N, C, H, W), its logits (N, K), loss (N,), success (N,)
        and the clean logits when the run started at x."""
        assert self.norm is not None
        threat = get_threat(self.norm)
        project = threat.projector(x, self.eps)
        x_t = threat.random_start(x, self.eps, generator) if self.random_start else x.clone()
        best_x = x_t
        best_logits: Tensor | None = None
        best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
        best_ok = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        clean: Tensor | None = None
        for t in range(self.steps + 1):
            last = t == self.steps
            if last:
                with torch.no_grad():
                    logits = model(x_t)
                    loss = _objective(logits, y, targets)
            else:
                x_t.requires_grad_(True)
                logits = model(x_t)
                loss_g = _objective(logits, y, targets)
                (grad,) = torch.autograd.grad(loss_g.sum(), x_t)
                x_t, logits, loss = x_t.detach(), logits.detach(), loss_g.detach()
            pred = logits.argmax(dim=1)
            ok = pred != y if targets is None else pred == targets
            if t == 0 and not self.random_start:
                clean = logits
            if best_logits is None:
                best_x, best_logits, best_loss, best_ok = x_t, logits, loss, ok
            else:
                better = _better(ok, loss, best_ok, best_loss, self.keep)
                b4 = better.view(-1, *([1] * (x.dim() - 1)))
                best_x = torch.where(b4, x_t, best_x)
                best_logits = torch.where(better[:, None], logits, best_logits)
                best_loss = torch.where(better, loss, best_loss)
                best_ok = best_ok | ok if self.keep != "last" else ok
            if not last:
                x_t = project(threat.step(x_t, grad, self.alpha))
        assert best_logits is not None
        return best_x.clone(), best_logits.clone(), best_loss.clone(), best_ok.clone(), clean


def _better(ok: Tensor, loss: Tensor, best_ok: Tensor, best_loss: Tensor, keep: str) -> Tensor:
    """Which candidates (N,) replace the current best under the keep rule."""
    if keep == "last":
        return torch.ones_like(ok)
    newly = ok & ~best_ok
    if keep == "first":
        return newly | (~ok & ~best_ok & (loss > best_loss))
    return newly | ((ok == best_ok) & (loss > best_loss))


class PGDLinf(PGD):
    """PGD in the L-inf ball (default eps 0.1, k 10, alpha eps/sqrt(k), random start)."""

    def __init__(
        self,
        eps: float | None = None,
        *,
        steps: int = 10,
        alpha: float | None = None,
        step_rule: str = "paper",
        random_start: bool = True,
        restarts: int = 1,
        target: str | None = None,
        keep: str = "best",
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(
            eps,
            norm="linf",
            steps=steps,
            alpha=alpha,
            step_rule=step_rule,
            random_start=random_start,
            restarts=restarts,
            target=target,
            keep=keep,
            seed=seed,
            batch_size=batch_size,
        )


class PGDL2(PGD):
    """PGD in the L2 ball (default eps 1.5, k 10, alpha eps/sqrt(k), random start)."""

    def __init__(
        self,
        eps: float | None = None,
        *,
        steps: int = 10,
        alpha: float | None = None,
        step_rule: str = "paper",
        random_start: bool = True,
        restarts: int = 1,
        target: str | None = None,
        keep: str = "best",
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(
            eps,
            norm="l2",
            steps=steps,
            alpha=alpha,
            step_rule=step_rule,
            random_start=random_start,
            restarts=restarts,
            target=target,
            keep=keep,
            seed=seed,
            batch_size=batch_size,
        )


ATTACKS.register("fgsm", "FGSM, one L-inf step of eps (untargeted or targeted)")(FGSM)
ATTACKS.register("pgd-linf", "PGD in the L-inf ball; k steps, alpha eps/sqrt(k) or 2.5eps/k, restarts")(PGDLinf)
ATTACKS.register("pgd-l2", "PGD in the L2 ball; k steps, alpha eps/sqrt(k) or 2.5eps/k, restarts")(PGDL2)
