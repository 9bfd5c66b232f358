"""Carlini & Wagner L2 attack (2017) with a per-sample binary search over the constant c.

Minimise ||x' - x||_2^2 + c * f(x') over w, x' = (tanh(w) + 1) / 2, with Adam, where
f = max(z_y - max_{i != y} z_i, -kappa) (untargeted) or max(max_{i != t} z_i - z_t, -kappa)
(targeted). Each sample keeps its smallest successful perturbation; after each search step c is
bisected between the bounds (success) or multiplied by 10 until an upper bound exists (failure).
Defaults as in the neuron-sensitivity paper: c0 = 0.01, kappa = 0, 3 search steps x 300 Adam
iterations at lr 0.01. Unbounded (eps = inf) unless eps is given; then every iterate is scaled
into the L2 ball of radius eps before the model sees it. Samples without any success return x.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import ATTACKS, Attack, check_int, check_positive
from .losses import other_max
from .rng import SampleRandom
from .threat import get_threat


class CW(Attack):
    """C&W-L2: c0, kappa, search_steps, steps (Adam iterations per search step), lr, abort_early."""

    supports_targeted = True

    def __init__(
        self,
        eps: float = math.inf,
        *,
        c0: float = 0.01,
        kappa: float = 0.0,
        search_steps: int = 3,
        steps: int = 300,
        lr: float = 0.01,
        abort_early: bool = True,
        target: str | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(name="cw-l2", norm="l2", eps=eps, seed=seed, batch_size=batch_size, target=target)
        check_positive("c0", c0)
        check_positive("kappa", kappa, allow_zero=True)
        check_int("search_steps", search_steps)
        check_int("steps", steps)
        check_positive("lr", lr)
        self.c0 = float(c0)
        self.kappa = float(kappa)
        self.search_steps = search_steps
        self.steps = steps
        self.lr = float(lr)
        self.abort_early = bool(abort_early)

    def _search(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> Tensor:
        n = x.shape[0]
        shape = (n, *([1] * (x.dim() - 1)))
        bounded = math.isfinite(self.eps)
        w0 = torch.atanh((2.0 * x - 1.0) * (1.0 - 1e-6))
        lower = torch.zeros(n, device=x.device)
        upper = torch.full((n,), 1e10, device=x.device)
        c = torch.full((n,), self.c0, device=x.device)
        best_l2 = torch.full((n,), math.inf, device=x.device)
        best_x = x.clone()
        label = targets if targets is not None else y
        project = get_threat("l2").projector(x, self.eps if bounded else math.inf)
        b1, b2, adam_eps = 0.9, 0.999, 1e-8
        check_every = max(1, self.steps // 10)
        for _ in range(self.search_steps):
            w = w0.clone()
            m = torch.zeros_like(w)
            v = torch.zeros_like(w)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            previous = math.inf
            for it in range(self.steps):
                w.requires_grad_(True)
                x_new = (torch.tanh(w) + 1.0) / 2.0
                if bounded:
                    x_new = project(x_new)
                logits = model(x_new)
                l2 = (x_new - x).flatten(1).pow(2).sum(dim=1)
                real = logits.gather(1, label[:, None]).squeeze(1)
                other = other_max(logits, label)
                gap = other - real if targets is not None else real - other  # < 0 means success
                f = gap.clamp(min=-self.kappa)
                loss = l2 + c * f
                total = loss.sum()
                (g,) = torch.autograd.grad(total, w)
                with torch.no_grad():
                    ok = -gap > self.kappa if self.kappa > 0 else gap < 0
                    improved = ok & (l2 < best_l2)
                    best_l2 = torch.where(improved, l2.detach(), best_l2)
                    best_x = torch.where(improved.view(shape), x_new.detach(), best_x)
                    found |= ok
                    w = w.detach()
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    step = self.lr * math.sqrt(1 - b2 ** (it + 1)) / (1 - b1 ** (it + 1))
                    w = w - step * m / (v.sqrt() + adam_eps)
                if self.abort_early and (it + 1) % check_every == 0:
                    value = float(total.detach())
                    if value > previous * 0.9999:
                        break
                    previous = value
            upper = torch.where(found, torch.minimum(upper, c), upper)
            lower = torch.where(found, lower, torch.maximum(lower, c))
            bisect = (lower + upper) / 2
            c = torch.where(upper < 1e9, bisect, c * 10)
        if bounded:
            best_x = get_threat("l2").project(best_x, x, self.eps)
        return best_x


ATTACKS.register("cw-l2", "Carlini-Wagner L2, binary search over c (c0 0.01, kappa 0, 3 x 300, Adam lr 0.01)")(CW)
