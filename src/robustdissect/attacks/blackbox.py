"""Black-box attacks that only read the model's outputs: SPSA and NAttack (both L-inf).

Both run under torch.no_grad (the base class enforces it), are batched over images (all active
images x perturbation samples go through the model together, in chunks of at most `max_batch`
images to bound memory), and stop working on an image once it is adversarial.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import ATTACKS, Attack, check_int, check_positive
from .losses import margin
from .rng import SampleRandom
from .threat import get_threat

_DEFAULT_MAX_BATCH = 4096


def _forward_chunked(model: nn.Module, x: Tensor, max_batch: int) -> Tensor:
    """Logits (M, K) of x (M, C, H, W), max_batch images per forward."""
    return torch.cat([model(x[i : i + max_batch]) for i in range(0, x.shape[0], max_batch)])


def _attack_margin(logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
    """Loss to minimise, (M,): z_y - max_{i != y} z_i, or max_{i != t} z_i - z_t when targeted.
    Negative means success."""
    if targets is None:
        return margin(logits, y)
    return -margin(logits, targets)


class SPSA(Attack):
    """SPSA (Uesato et al. 2018): finite-difference gradient estimates + Adam, projected to L-inf.

    Per iteration and image, n_samples model evaluations at x' ± delta * v (v Rademacher, n_samples/2
    antithetic pairs) estimate the gradient of the margin loss; Adam (lr) takes a step, then the
    point is projected onto B_inf(x, eps) ∩ [0, 1]. Starts uniformly in the ball.
    """

    white_box = False
    supports_targeted = True

    def __init__(
        self,
        eps: float = 0.1,
        *,
        n_samples: int = 512,
        lr: float = 0.01,
        iterations: int = 100,
        delta: float = 0.01,
        max_batch: int = _DEFAULT_MAX_BATCH,
        target: str | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(name="spsa", norm="linf", eps=eps, seed=seed, batch_size=batch_size, target=target)
        check_int("n_samples", n_samples, minimum=2)
        check_positive("lr", lr)
        check_int("iterations", iterations)
        check_positive("delta", delta)
        check_int("max_batch", max_batch)
        self.n_samples = n_samples
        self.lr = float(lr)
        self.iterations = iterations
        self.delta = float(delta)
        self.max_batch = max_batch

    def _search(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> Tensor:
        n = x.shape[0]
        threat = get_threat("linf")
        x_adv = threat.random_start(x, self.eps, rng)
        m = torch.zeros_like(x)
        v = torch.zeros_like(x)
        active = torch.arange(n, device=x.device)
        b1, b2, adam_eps = 0.9, 0.999, 1e-9
        for it in range(self.iterations):
            xa = x_adv[active]
            ya = y[active]
            ta = targets[active] if targets is not None else None
            done = _attack_margin(_forward_chunked(model, xa, self.max_batch), ya, ta) < 0
            if bool(done.any()):
                keep = ~done
                active, xa, ya = active[keep], xa[keep], ya[keep]
                ta = ta[keep] if ta is not None else None
            if active.numel() == 0:
                break
            g = self._gradient(model, xa, ya, ta, rng.subset(active))
            rng.draws += self._draws_per_gradient()
            ma = m[active].mul_(b1).add_(g, alpha=1 - b1)
            va = v[active].mul_(b2).addcmul_(g, g, value=1 - b2)
            m[active], v[active] = ma, va
            step = self.lr * math.sqrt(1 - b2 ** (it + 1)) / (1 - b1 ** (it + 1))
            x_adv[active] = threat.project(xa - step * ma / (va.sqrt() + adam_eps), x[active], self.eps)
        return x_adv

    def _gradient(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> Tensor:
        """SPSA estimate of grad_x of the margin loss, (A, C, H, W), for the active images x
        with their streams `rng` (draw number d + j for the j-th chunk of directions)."""
        pairs, img_chunk, pair_chunk = self._chunks()
        first = rng.draws
        grads = []
        for i in range(0, x.shape[0], img_chunk):
            xi = x[i : i + img_chunk]
            b = xi.shape[0]
            acc = torch.zeros_like(xi)
            for j in range(0, pairs, pair_chunk):
                p = min(pair_chunk, pairs - j)
                streams = rng.subset(slice(i, i + b))
                streams.draws = first + j // pair_chunk
                signs = streams.signs(p, *xi.shape[1:], dtype=x.dtype)
                probe = torch.stack([xi[:, None] + self.delta * signs, xi[:, None] - self.delta * signs], dim=2)
                logits = model(probe.reshape(-1, *xi.shape[1:]))
                yi = y[i : i + b].repeat_interleave(2 * p)
                ti = targets[i : i + b].repeat_interleave(2 * p) if targets is not None else None
                loss = _attack_margin(logits, yi, ti).view(b, p, 2)
                diff = (loss[:, :, 0] - loss[:, :, 1]) / (2 * self.delta)
                acc += (diff.view(b, p, *([1] * (xi.dim() - 1))) * signs).sum(dim=1)
            grads.append(acc / pairs)
        return torch.cat(grads)

    def _chunks(self) -> tuple[int, int, int]:
        """(direction pairs, images per forward chunk, pairs per chunk) under `max_batch`."""
        pairs = max(1, self.n_samples // 2)
        if 2 * pairs <= self.max_batch:
            return pairs, max(1, self.max_batch // (2 * pairs)), pairs
        return pairs, 1, max(1, self.max_batch // 2)

    def _draws_per_gradient(self) -> int:
        pairs, _img, pair_chunk = self._chunks()
        return -(-pairs // pair_chunk)


class NAttack(Attack):
    """NAttack (Li et al. 2019): natural evolution strategy over a Gaussian in tanh space, L-inf.

    Search distribution N(mu, sigma^2 I) over z; a sample maps to
    clip(x + clip(g(atanh(2x - 1) + z) - g(atanh(2x - 1)), -eps, eps), 0, 1), g(w) = (tanh(w) + 1) / 2.
    Loss per sample: clamp(log p_y - max_{i != y} log p_i, 0, 1000); normalised losses weight the
    update mu <- mu + lr / (population * sigma) * sum_j A_j eps_j. Defaults: population 300,
    sigma 0.1, lr 0.008, 100 iterations, mu0 = 0.
    """

    white_box = False
    supports_targeted = True

    def __init__(
        self,
        eps: float = 0.1,
        *,
        population: int = 300,
        sigma: float = 0.1,
        lr: float = 0.008,
        iterations: int = 100,
        max_batch: int = _DEFAULT_MAX_BATCH,
        target: str | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(name="nattack", norm="linf", eps=eps, seed=seed, batch_size=batch_size, target=target)
        check_int("population", population, minimum=2)
        check_positive("sigma", sigma)
        check_positive("lr", lr)
        check_int("iterations", iterations)
        check_int("max_batch", max_batch)
        self.population = population
        self.sigma = float(sigma)
        self.lr = float(lr)
        self.iterations = iterations
        self.max_batch = max_batch

    def _candidate(self, x: Tensor, w: Tensor, base: Tensor, z: Tensor) -> Tensor:
        """Images for perturbations z (..., C, H, W) of clean x with tanh-space w and base g(w)."""
        moved = (torch.tanh(w + z) + 1.0) / 2.0
        return get_threat("linf").project(x + (moved - base), x, self.eps)

    def _search(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> Tensor:
        n = x.shape[0]
        w = torch.atanh((2.0 * x - 1.0) * (1.0 - 1e-6))
        base = (torch.tanh(w) + 1.0) / 2.0
        mu = torch.zeros_like(x)
        x_adv = self._candidate(x, w, base, mu)
        active = torch.arange(n, device=x.device)
        pop = self.population
        img_chunk = max(1, self.max_batch // pop)
        for it in range(self.iterations + 1):
            xa = self._candidate(x[active], w[active], base[active], mu[active])
            x_adv[active] = xa
            ta = targets[active] if targets is not None else None
            done = _attack_margin(_forward_chunked(model, xa, self.max_batch), y[active], ta) < 0
            active = active[~done]
            if active.numel() == 0 or it == self.iterations:
                break
            for s in range(0, active.numel(), img_chunk):
                idx = active[s : s + img_chunk]
                b = idx.numel()
                streams = rng.subset(idx)  # every image's draw number is the iteration's
                noise = streams.randn(pop, *x.shape[1:], dtype=x.dtype)
                z = mu[idx][:, None] + self.sigma * noise
                cand = self._candidate(x[idx][:, None], w[idx][:, None], base[idx][:, None], z)
                logits = model(cand.reshape(-1, *x.shape[1:]))
                labels = y[idx].repeat_interleave(pop)
                tl = targets[idx].repeat_interleave(pop) if targets is not None else None
                loss = _attack_margin(logits, labels, tl).clamp(0.0, 1000.0).view(b, pop)
                score = -(loss - loss.mean(dim=1, keepdim=True)) / (loss.std(dim=1, keepdim=True, correction=0) + 1e-7)
                update = (score.view(b, pop, *([1] * (x.dim() - 1))) * noise).sum(dim=1)
                mu[idx] = mu[idx] + self.lr / (pop * self.sigma) * update
            rng.draws += 1
        return x_adv


ATTACKS.register("spsa", "SPSA black-box attack, L-inf (samples 512, lr 0.01, 100 iterations, delta 0.01)")(SPSA)
ATTACKS.register("nattack", "NAttack black-box attack, L-inf (population 300, sigma 0.1, lr 0.008, 100 iterations)")(
    NAttack
)
