"""FGSM and PGD (L-inf and L2), untargeted and targeted, with the threat model kept separate.

FGSM:   x' = clip[0,1](x + eps * sign(grad_x CE(F(x), y)))         (targeted: minus, CE to target)
PGD:    x(t+1) = Proj_{B(x, eps) ∩ [0,1]}(x(t) + alpha * step_norm(grad_x L(x(t))))
        L = CE(F(x), y) (untargeted) or -CE(F(x), t) (targeted), or KL to the clean prediction
        (TRADES), the margin, DLR, or a callable; the start comes from the threat model.

Step size: alpha = eps / sqrt(k) ("paper", the neuron-sensitivity paper), or 2.5 * eps / k
("madry"), or an explicit value. Each sample keeps its best iterate over all restarts: successful
iterates beat unsuccessful ones, and among equals the one with the higher loss wins ("best");
`keep="first"` freezes a sample at its first successful iterate, `keep="last"` returns the final one,
`keep="max-loss"` the iterate of highest loss whether or not it succeeds (a maximiser such as the
robustness metric's KL; restarts then rerun every sample).

Cost of PGD-k: k forward+backward passes with respect to the input plus one forward on the last
iterate (the KL loss adds one forward on the clean images, whose logits are handed back so that
the base class does not repeat it); gradients are taken with torch.autograd.grad on the input only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .base import ATTACKS, Attack, SearchOutput, check_int, check_positive, frozen, variant
from .losses import cross_entropy, dlr, dlr_targeted, margin, other_max
from .rng import SampleRandom
from .threat import STARTS, get_threat

LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits (N, K), labels (N,)) -> per-sample loss (N,) to maximise
LOSSES = ("ce", "kl", "margin", "dlr")

DEFAULT_EPS = {"linf": 0.1, "l2": 1.5}  # Fashion-MNIST defaults (METHODS §8.1)
STEP_RULES = ("paper", "madry")
# the rules by formula, as users write them: eps/sqrt(k) (the neuron-sensitivity paper) and 2.5eps/k (Madry et al.)
STEP_RULE_ALIASES = {"eps/sqrt(k)": "paper", "2.5eps/k": "madry", "2.5*eps/k": "madry"}
KEEP_RULES = ("best", "first", "last", "max-loss")


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
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> SearchOutput:
        x0 = x.detach().requires_grad_(True)
        logits = model(x0)
        (grad,) = torch.autograd.grad(_objective(logits, y, targets).sum(), x0)
        x_adv = (x + self.eps * grad.sign()).clamp_(0.0, 1.0)
        return SearchOutput(x_adv, clean_logits=logits.detach())


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018) in the L-inf or L2 ball; the one iterative
    gradient loop of the package (evaluation, analyses and every training objective use it).

    eps: radius (pixel units); steps: k; alpha: step size (None: from `step_rule`, "paper" =
    eps/sqrt(k), "madry" = 2.5*eps/k); loss: "ce" (default), "kl" (KL(p(x) || p(x')), TRADES),
    "margin" (max_{j!=y} z_j - z_y), "dlr", or a callable (logits (N, K), y (N,)) -> (N,) to
    maximise; random_start: True/"uniform" (uniform in the ball), "gaussian" (x + start_sigma *
    N(0, 1)), "boundary", or False/"none"; restarts: number of runs, each after the first only on
    the samples not yet successful; target: None, "random" or "least-likely" (explicit targets go
    to the call); keep: "best", "first", "last" or "max-loss" iterate per sample; early_stop: drop a sample
    from the attacked batch at its first successful iterate (robust accuracy is unchanged, the
    returned point is that iterate; σ pairs that need the k-th iterate leave it off).

    `perturb(model, x, y, rng)` is the training entry point: the same loop for exactly k
    steps, returning the last iterate without the evaluation's bookkeeping or extra forwards.
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
        loss: str | LossFn = "ce",
        random_start: bool | str = True,
        start_sigma: float = 0.001,
        restarts: int = 1,
        target: str | None = None,
        keep: str = "best",
        early_stop: bool = False,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        if norm not in DEFAULT_EPS:
            raise UserError(f"unknown norm '{norm}' for PGD; use linf or l2")
        eps = DEFAULT_EPS[norm] if eps is None else eps
        super().__init__(name=f"pgd-{norm}", norm=norm, eps=eps, seed=seed, batch_size=batch_size, target=target)
        check_int("steps", steps)
        check_int("restarts", restarts)
        step_rule = STEP_RULE_ALIASES.get(str(step_rule).replace(" ", ""), step_rule)
        if step_rule not in STEP_RULES:
            raise UserError(f"step_rule must be one of {', '.join(STEP_RULES)}, got {step_rule!r}")
        if keep not in KEEP_RULES:
            raise UserError(f"keep must be one of {', '.join(KEEP_RULES)}, got {keep!r}")
        if keep == "max-loss" and early_stop:
            raise UserError("keep='max-loss' looks for the highest loss; it cannot stop early at success")
        if alpha is not None:
            check_positive("alpha", alpha)
        check_positive("start_sigma", start_sigma)
        if callable(loss):
            self._loss_fn: LossFn | None = loss
            self.loss = getattr(loss, "__name__", type(loss).__name__)
        else:
            if loss not in LOSSES:
                raise UserError(f"loss must be one of {', '.join(LOSSES)} or a callable, got {loss!r}")
            self._loss_fn = None
            self.loss = loss
        if isinstance(random_start, bool):
            random_start = "uniform" if random_start else "none"
        if random_start not in STARTS:
            raise UserError(f"random_start must be true, false or one of {', '.join(STARTS)}, got {random_start!r}")
        self.steps = steps
        self.step_rule = step_rule
        self.alpha = float(alpha) if alpha is not None else self.default_alpha(self.eps, steps, step_rule)
        self.random_start = random_start
        self.start_sigma = float(start_sigma)
        self.restarts = restarts
        self.keep = keep
        self.early_stop = bool(early_stop)

    @staticmethod
    def default_alpha(eps: float, steps: int, rule: str = "paper") -> float:
        """eps / sqrt(k) ("paper") or 2.5 * eps / k ("madry")."""
        return eps / math.sqrt(steps) if rule == "paper" else 2.5 * eps / steps

    # -- the loss ------------------------------------------------------------------------------
    def _per_sample(self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None) -> dict[str, Tensor]:
        """Per-sample tensors the loss needs (labels, targets, clean probabilities for "kl");
        indexed together when early stopping shrinks the batch."""
        aux = {"y": y}
        if targets is not None:
            if self._loss_fn is not None or self.loss == "kl":
                raise UserError(f"PGD with loss '{self.loss}' has no targeted mode")
            aux["t"] = targets
        if self.loss == "kl" and self._loss_fn is None:
            with torch.no_grad():
                z = model(x)
            aux["p"] = F.softmax(z.float(), dim=1)
            aux["z"] = z  # the clean logits: returned to the base class, which then needs no clean forward
        return aux

    def _objective(self, logits: Tensor, aux: dict[str, Tensor]) -> Tensor:
        """Per-sample loss (N,) to maximise."""
        y, t = aux["y"], aux.get("t")
        if self._loss_fn is not None:
            return self._loss_fn(logits, y)
        if self.loss == "ce":
            return cross_entropy(logits, y) if t is None else -cross_entropy(logits, t)
        if self.loss == "kl":
            return F.kl_div(F.log_softmax(logits.float(), dim=1), aux["p"], reduction="none").sum(dim=1)
        if self.loss == "margin":
            return -margin(logits, y) if t is None else logits.gather(1, t[:, None]).squeeze(1) - other_max(logits, t)
        if logits.shape[1] < (3 if t is None else 4):
            raise UserError(f"the DLR loss needs at least {3 if t is None else 4} classes, got {logits.shape[1]}")
        return dlr(logits, y) if t is None else dlr_targeted(logits, y, t)

    # -- search --------------------------------------------------------------------------------
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, rng: SampleRandom | torch.Generator) -> Tensor:
        """Exactly `steps` steps from the start, the last iterate x' (N, C, H, W), detached.

        For training: the model's modules are put in eval mode for the search and their flags
        restored; gradients are taken with respect to the input only (parameters untouched),
        in fp32 (autocast off). No validation, restarts, early stop or final forward. `rng`: the
        batch's random streams (or a generator that keys them)."""
        if self._is_identity():
            return x.detach().clone()
        with frozen(model), torch.autocast(x.device.type, enabled=False), torch.enable_grad():
            out, *_ = self._run(model, x.detach(), y, None, SampleRandom.coerce(rng, x.shape[0], x.device), track=False)
        return out

    def _search(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> SearchOutput:
        best_x, best_logits, best_loss, best_ok, clean = self._run(model, x, y, targets, rng)
        assert best_logits is not None and best_loss is not None and best_ok is not None
        for restart in range(1, self.restarts):
            todo = (~best_ok if self.keep != "max-loss" else torch.ones_like(best_ok)).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            sub_t = targets[todo] if targets is not None else None
            rx, rl, rloss, rok, _ = self._run(model, x[todo], y[todo], sub_t, rng.spawn(restart).subset(todo))
            assert rl is not None and rloss is not None and rok is not None
            better = _better(rok, rloss, best_ok[todo], best_loss[todo], self.keep)
            pick = todo[better]
            best_x[pick] = rx[better]
            best_logits[pick] = rl[better]
            best_loss[pick] = rloss[better]
            best_ok[pick] = rok[better]
        return SearchOutput(best_x, logits=best_logits, clean_logits=clean)

    def _run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        targets: Tensor | None,
        rng: SampleRandom,
        track: bool = True,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """One PGD run. With `track`: best x (N, C, H, W) under the keep rule, its logits (N, K),
        loss (N,), success (N,), and the clean logits when the run started at x. Without: the
        k-th iterate and four Nones."""
        assert self.norm is not None
        threat = get_threat(self.norm)
        aux = self._per_sample(model, x, y, targets)
        x_cur = x  # the clean images of the samples still attacked
        project = threat.projector(x_cur, self.eps)
        x_t = threat.start(self.random_start, x, self.eps, rng, self.start_sigma)
        if not track:
            for _ in range(self.steps):
                x_t.requires_grad_(True)
                (grad,) = torch.autograd.grad(self._objective(model(x_t), aux).sum(), x_t)
                x_t = project(threat.step(x_t.detach(), grad, self.alpha))
            return x_t.detach(), None, None, None, None

        n = x.shape[0]
        active: Tensor | None = None  # positions of the attacked samples; None = all of them
        best_x = x_t.clone()
        best_logits: Tensor | None = None
        best_loss = torch.full((n,), -math.inf, device=x.device)
        best_ok = torch.zeros(n, dtype=torch.bool, device=x.device)
        clean: Tensor | None = aux.get("z")  # the KL loss already ran the clean forward
        for t in range(self.steps + 1):
            last = t == self.steps
            if last:
                with torch.no_grad():
                    logits = model(x_t)
                    loss = self._objective(logits, aux)
            else:
                x_t.requires_grad_(True)
                logits = model(x_t)
                loss_g = self._objective(logits, aux)
                (grad,) = torch.autograd.grad(loss_g.sum(), x_t)
                x_t, logits, loss = x_t.detach(), logits.detach(), loss_g.detach()
            pred = logits.argmax(dim=1)
            ok = pred != aux["y"] if targets is None else pred == aux["t"]
            if t == 0 and self.random_start == "none":
                clean = logits
            if best_logits is None:
                best_logits = logits.new_zeros((n, logits.shape[1]))
            if active is None:
                better = _better(ok, loss, best_ok, best_loss, self.keep)
                b4 = better.view(-1, *([1] * (x.dim() - 1)))
                best_x = torch.where(b4, x_t, best_x)
                best_logits = torch.where(better[:, None], logits, best_logits)
                best_loss = torch.where(better, loss, best_loss)
                best_ok = _kept_ok(ok, better, best_ok, self.keep)
            else:
                better = _better(ok, loss, best_ok[active], best_loss[active], self.keep)
                pick = active[better]
                best_x[pick] = x_t[better]
                best_logits[pick] = logits[better]
                best_loss[pick] = loss[better]
                best_ok[active] = _kept_ok(ok, better, best_ok[active], self.keep)
            if last:
                break
            if self.early_stop and bool(ok.any()):
                stay = (~ok).nonzero().squeeze(1)
                if stay.numel() == 0:
                    break
                active = stay if active is None else active[stay]
                x_t, grad, x_cur = x_t[stay], grad[stay], x_cur[stay]
                aux = {k: v[stay] for k, v in aux.items()}
                project = threat.projector(x_cur, self.eps)
            x_t = project(threat.step(x_t, grad, self.alpha))
        assert best_logits is not None
        return best_x.clone(), best_logits.clone(), best_loss.clone(), best_ok.clone(), clean


def _kept_ok(ok: Tensor, better: Tensor, best_ok: Tensor, keep: str) -> Tensor:
    """Success flags (N,) after a step: ever successful ("best", "first"), of the last iterate
    ("last"), or of the kept iterate ("max-loss")."""
    if keep == "last":
        return ok
    if keep == "max-loss":
        return torch.where(better, ok, best_ok)
    return best_ok | ok


def _better(ok: Tensor, loss: Tensor, best_ok: Tensor, best_loss: Tensor, keep: str) -> Tensor:
    """Which candidates (N,) replace the current best under the keep rule."""
    if keep == "last":
        return torch.ones_like(ok)
    if keep == "max-loss":
        return loss > best_loss
    newly = ok & ~best_ok
    if keep == "first":
        return newly | (~ok & ~best_ok & (loss > best_loss))
    return newly | ((ok == best_ok) & (loss > best_loss))


@variant(norm="linf")
class PGDLinf(PGD):
    """PGD in the L-inf ball (default eps 0.1, k 10, alpha eps/sqrt(k), CE loss, random start)."""


@variant(norm="l2")
class PGDL2(PGD):
    """PGD in the L2 ball (default eps 1.5, k 10, alpha eps/sqrt(k), CE loss, random start)."""


ATTACKS.register("fgsm", "FGSM, one L-inf step of eps (untargeted or targeted)")(FGSM)
ATTACKS.register("pgd-linf", "PGD in the L-inf ball; k steps, alpha eps/sqrt(k) or 2.5eps/k, restarts")(PGDLinf)
ATTACKS.register("pgd-l2", "PGD in the L2 ball; k steps, alpha eps/sqrt(k) or 2.5eps/k, restarts")(PGDL2)
