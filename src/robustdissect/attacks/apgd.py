"""Auto-PGD (Croce & Hein 2020), APGD-CE and APGD-DLR, in the L-inf or L2 ball.

Step size starts at 2 * eps and is halved at checkpoints w_j (w_0 = 0, w_1 = 0.22 N_iter, intervals
shrinking by 0.03 N_iter down to 0.06 N_iter) for the samples where (1) the loss increased in at
most rho = 0.75 of the steps since the last checkpoint, or (2) neither the step size nor the best
loss changed since the last checkpoint; those samples restart from their best point. Updates use
momentum alpha = 0.75:
    z = P(x_k + eta * dir(grad)),  x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1})).
Each sample returns its last successful iterate if any, else its highest-loss iterate. Samples
already misclassified (targeted: already on target) at x are not searched (AutoAttack's rule); their
clean point is returned. Restarts run on the samples that are still not successful. Cost: one
forward pass on x, then N_iter + 1 forward+backward passes on the correctly classified samples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UserError
from .base import ATTACKS, Attack, SearchOutput, check_int, check_positive, variant
from .losses import cross_entropy, dlr, dlr_targeted
from .pgd import DEFAULT_EPS
from .rng import SampleRandom
from .threat import get_threat

LOSSES = ("ce", "dlr")


class APGD(Attack):
    """APGD with loss "ce" or "dlr"; norm "linf" or "l2"; steps (N_iter) 100, restarts 1, rho 0.75."""

    supports_targeted = True

    def __init__(
        self,
        eps: float | None = None,
        *,
        norm: str = "linf",
        loss: str = "ce",
        steps: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        momentum: float = 0.75,
        target: str | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        if norm not in DEFAULT_EPS:
            raise UserError(f"unknown norm '{norm}' for APGD; use linf or l2")
        if loss not in LOSSES:
            raise UserError(f"APGD loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        eps = DEFAULT_EPS[norm] if eps is None else eps
        super().__init__(name=f"apgd-{loss}", norm=norm, eps=eps, seed=seed, batch_size=batch_size, target=target)
        check_int("steps", steps)
        check_int("restarts", restarts)
        check_positive("rho", rho)
        check_positive("momentum", momentum)
        self.loss = loss
        self.steps = steps
        self.restarts = restarts
        self.rho = float(rho)
        self.momentum = float(momentum)

    def _objective(self, logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
        if self.loss == "ce":
            return cross_entropy(logits, y) if targets is None else -cross_entropy(logits, targets)
        needed = 3 if targets is None else 4
        if logits.shape[1] < needed:
            raise UserError(f"APGD-DLR needs at least {needed} classes, the model has {logits.shape[1]}")
        return dlr(logits, y) if targets is None else dlr_targeted(logits, y, targets)

    def _search(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> SearchOutput:
        with torch.no_grad():
            clean = model(x)
        # points already misclassified (targeted: already on target) are not searched, as AutoAttack
        ok = self._success(clean, y, targets)
        out_x, out_logits = x.clone(), clean.clone()
        for r in range(self.restarts):
            todo = (~ok).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            sub_t = targets[todo] if targets is not None else None
            rx, rl, rok = self._run(model, x[todo], y[todo], sub_t, rng.spawn(r).subset(todo))
            keep = torch.ones_like(rok) if r == 0 else rok  # the first run's best-loss points stand in
            pick = todo[keep]
            out_x[pick], out_logits[pick] = rx[keep], rl[keep]
            ok[todo] = rok
        return SearchOutput(out_x, logits=out_logits, clean_logits=clean)

    def _loss_grad(
        self, model: nn.Module, x_adv: Tensor, y: Tensor, targets: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        loss = self._objective(logits, y, targets)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        return loss.detach(), grad, logits.detach()

    def _run(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One APGD run: x_adv (N, C, H, W), its logits (N, K), success (N,)."""
        assert self.norm is not None
        threat = get_threat(self.norm)
        project = threat.projector(x, self.eps)
        n, n_iter = x.shape[0], self.steps
        shape = (-1, *([1] * (x.dim() - 1)))
        k = max(int(0.22 * n_iter), 1)
        size_decr = max(int(0.03 * n_iter), 1)
        k_min = max(int(0.06 * n_iter), 1)

        x_adv = threat.boundary_start(x, self.eps, rng)
        loss, grad, logits = self._loss_grad(model, x_adv, y, targets)
        losses = torch.empty((n_iter + 1, n), device=x.device)
        losses[0] = loss
        step = torch.full((n,), 2.0 * self.eps, device=x.device, dtype=x.dtype)
        x_best, grad_best, loss_best, logits_best = x_adv.clone(), grad.clone(), loss.clone(), logits.clone()
        ok = self._success(logits, y, targets)
        x_succ, logits_succ, ever = x_adv.clone(), logits.clone(), ok.clone()
        loss_best_last = loss_best.clone()
        reduced_last = torch.ones(n, dtype=torch.bool, device=x.device)
        x_prev = x_adv.clone()
        since_check = 0
        for i in range(n_iter):
            with torch.no_grad():
                # z = P(x + eta * dir(grad)); x' = P(x + a (z - x) + (1 - a)(x - x_prev)), with as few
                # full-size temporaries as possible (on small models these ops are the overhead)
                z = project(torch.addcmul(x_adv, step.view(shape), threat.direction(grad)))
                if i == 0:
                    x_new = z  # a = 1: the plain step
                else:
                    x_new = project(torch.lerp(x_adv, z, self.momentum).add_(x_adv - x_prev, alpha=1 - self.momentum))
                x_prev, x_adv = x_adv, x_new
            loss, grad, logits = self._loss_grad(model, x_adv, y, targets)
            with torch.no_grad():
                losses[i + 1] = loss
                ok = self._success(logits, y, targets)
                if bool(ok.any()):
                    x_succ[ok] = x_adv[ok]
                    logits_succ[ok] = logits[ok]
                    ever |= ok
                better = loss > loss_best
                if bool(better.any()):
                    x_best[better] = x_adv[better]
                    grad_best[better] = grad[better]
                    logits_best[better] = logits[better]
                    loss_best = torch.where(better, loss, loss_best)
                since_check += 1
                if since_check == k:
                    window = losses[i + 1 - k : i + 2]
                    increases = (window[1:] > window[:-1]).sum(dim=0)
                    oscillating = increases <= k * self.rho
                    stalled = ~reduced_last & (loss_best_last >= loss_best)
                    reduce = oscillating | stalled
                    reduced_last = reduce
                    loss_best_last = loss_best.clone()
                    if bool(reduce.any()):
                        step = torch.where(reduce, step / 2, step)
                        x_adv = torch.where(reduce.view(shape), x_best, x_adv)
                        grad = torch.where(reduce.view(shape), grad_best, grad)
                    k = max(k - size_decr, k_min)
                    since_check = 0
        out_x = torch.where(ever.view(shape), x_succ, x_best)
        out_logits = torch.where(ever[:, None], logits_succ, logits_best)
        return out_x, out_logits, ever

    @staticmethod
    def _success(logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
        pred = logits.argmax(dim=1)
        return pred != y if targets is None else pred == targets


@variant(loss="ce")
class APGDCE(APGD):
    """APGD with the cross-entropy loss."""


@variant(loss="dlr")
class APGDDLR(APGD):
    """APGD with the difference-of-logits-ratio loss (needs >= 3 classes, >= 4 when targeted)."""


ATTACKS.register("apgd-ce", "APGD with cross-entropy (Croce & Hein 2020), L-inf or L2, 100 steps")(APGDCE)
ATTACKS.register("apgd-dlr", "APGD with the DLR loss (Croce & Hein 2020), L-inf or L2, 100 steps")(APGDDLR)
