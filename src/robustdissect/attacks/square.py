"""Square attack (Andriushchenko, Croce, Flammarion & Hein 2020): score-based random search, L-inf and L2.

Only the model's logits are read (black-box). Each query changes the current perturbation inside
one random square window per image and keeps the change where the margin loss
z_y - max_{j != y} z_j (targeted: max_{j != t} z_j - z_t) decreases; an image leaves the search as
soon as its margin is negative (per-sample early stop), and every query of an iteration is one
batched forward over the images still searched.

Schedule (the paper's, written for 10,000 queries and rescaled to `queries`): the share p of
pixels changed per square starts at `p_init` and is halved after iterations 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000; the square side is s = round(sqrt(p * H * W)) (at least 1 for
L-inf, 3 and odd for L2, at most H - 1).

L-inf: starts from vertical stripes (each column of each channel at x ± eps, sign at random);
a query sets the window of every channel to x ± eps, one random sign per channel.
L2: starts from a grid of "meta-patterns" (two opposite pseudo-Gaussian bumps per tile, random
sign per tile and channel) rescaled to norm eps; a query moves the perturbation mass of a second
random window, plus any unused budget, into the first window, shaped as the old content of the
window plus a new random meta-pattern, and rescales the whole perturbation to norm eps (per channel
for the window's share, as the paper's Algorithm 3).

Cost: 1 + `queries` forward passes at most per image, no gradients.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor, nn

from ..errors import UserError
from .base import ATTACKS, Attack, SearchOutput, check_int, check_positive, variant
from .losses import margin
from .rng import SampleRandom

# iterations (out of 10,000) after which p is halved once more
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, iteration: int, queries: int) -> float:
    """Share of pixels changed at `iteration` (0-based) of a `queries`-long search."""
    it = int(iteration / queries * 10000)
    halvings = sum(1 for b in _HALVINGS if it > b)
    return p_init / 2**halvings


def _loss(logits: Tensor, y: Tensor, targets: Tensor | None) -> Tensor:
    """Margin loss (N,) to minimise; negative means success."""
    if targets is None:
        return margin(logits, y)
    return -margin(logits, targets)


def _bump(h: int, w: int) -> Tensor:
    """Pseudo-Gaussian bump (h, w): concentric rectangles; a pixel at Chebyshev distance d from
    the centre (h // 2, w // 2) gets sum_{m = d+1}^{n+1} 1/m^2, n = max(h, w) // 2; unit L2 norm."""
    n = max(h, w) // 2
    ci, cj = h // 2, w // 2
    i = torch.arange(h).view(-1, 1)
    j = torch.arange(w).view(1, -1)
    d = torch.maximum((i - ci).abs(), (j - cj).abs())
    tail = torch.tensor([sum(1.0 / m**2 for m in range(k + 1, n + 2)) for k in range(max(h, w) + 1)])
    out = tail[d.clamp(max=max(h, w))]
    return out / out.norm().clamp_min(1e-12)


@lru_cache(maxsize=64)
def meta_pattern(s: int) -> Tensor:
    """The L2 search pattern (s, s): a positive bump on the top half and a negative one on the
    bottom half, unit L2 norm (the caller transposes it at random; cached, do not modify)."""
    top = s // 2
    out = torch.zeros(s, s)
    if top:
        out[:top] = _bump(top, s)
    out[top:] = -_bump(s - top, s)
    return out / out.norm().clamp_min(1e-12)


class Square(Attack):
    """Square attack, L-inf or L2, untargeted or targeted.

    eps: radius (default 0.1 L-inf, 1.5 L2); queries: iterations (the paper's 5,000 by default);
    p_init: initial share of pixels per square (0.8 as AutoAttack's L-inf and L2 settings);
    restarts: runs, each after the first only on the images not yet broken.
    """

    white_box = False
    supports_targeted = True

    def __init__(
        self,
        eps: float | None = None,
        *,
        norm: str = "linf",
        queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        target: str | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        if norm not in ("linf", "l2"):
            raise UserError(f"unknown norm '{norm}' for Square; use linf or l2")
        eps = (0.1 if norm == "linf" else 1.5) if eps is None else eps
        super().__init__(name=f"square-{norm}", norm=norm, eps=eps, seed=seed, batch_size=batch_size, target=target)
        check_int("queries", queries)
        check_int("restarts", restarts)
        check_positive("p_init", p_init)
        if p_init > 1:
            raise UserError(f"p_init must be in (0, 1], got {p_init}")
        self.queries = queries
        self.p_init = float(p_init)
        self.restarts = restarts

    def _search(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> SearchOutput:
        if x.shape[-1] < 2 or x.shape[-2] < 2:
            raise UserError(f"the Square attack needs images of at least 2 x 2 pixels, got {tuple(x.shape[-2:])}")
        best_x, best_logits, loss = self._run(model, x, y, targets, rng)
        for restart in range(1, self.restarts):
            todo = (loss >= 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            sub_t = targets[todo] if targets is not None else None
            rx, rl, rloss = self._run(model, x[todo], y[todo], sub_t, rng.spawn(restart).subset(todo))
            better = rloss < loss[todo]
            pick = todo[better]
            best_x[pick], best_logits[pick], loss[pick] = rx[better], rl[better], rloss[better]
        return SearchOutput(best_x, logits=best_logits)

    # -- one run -------------------------------------------------------------------------------
    def _run(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Best x (N, C, H, W), its logits (N, K) and margin loss (N,)."""
        x_best = self._init(x, rng)
        logits = model(x_best)
        loss = _loss(logits, y, targets)
        h, w = x.shape[-2:]
        for i in range(self.queries):
            active = (loss >= 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            p = p_schedule(self.p_init, i, self.queries)
            xa, xb = x[active], x_best[active]
            streams = rng.subset(active)  # the active images' streams, at this query's draw number
            if self.norm == "linf":
                s = min(max(round(math.sqrt(p * h * w)), 1), min(h, w) - 1)
                cand = self._linf_query(xa, xb, s, streams)
            else:
                s = max(round(math.sqrt(p * h * w)), 3)
                s = min(s + (s % 2 == 0), min(h, w) - 1)
                cand = self._l2_query(xa, xb, s, streams)
            rng.draws = streams.draws  # every query makes the same number of draws
            cl = model(cand)
            ta = targets[active] if targets is not None else None
            new_loss = _loss(cl, y[active], ta)
            better = new_loss < loss[active]
            pick = active[better]
            x_best[pick] = cand[better]
            logits[pick] = cl[better]
            loss[pick] = new_loss[better]
        return x_best, logits, loss

    def _init(self, x: Tensor, rng: SampleRandom) -> Tensor:
        _n, c, h, w = x.shape
        if self.norm == "linf":  # vertical stripes: one sign per column and channel
            sign = rng.signs(c, 1, w, dtype=x.dtype)
            return (x + self.eps * sign).clamp(0.0, 1.0)
        tile = max(h // 5, 1)
        delta = torch.zeros_like(x)
        pattern = meta_pattern(tile).to(device=x.device, dtype=x.dtype) if tile > 1 else None
        off_h, off_w = (h - tile * (h // tile)) // 2, (w - tile * (w // tile)) // 2
        for r in range(h // tile):
            for q in range(w // tile):
                sign = rng.signs(c, 1, 1, dtype=x.dtype)
                block = pattern if pattern is not None else torch.ones(1, 1, device=x.device, dtype=x.dtype)
                i0, j0 = off_h + r * tile, off_w + q * tile
                delta[:, :, i0 : i0 + tile, j0 : j0 + tile] += block * sign
        return self._l2_rescale(x, delta)

    def _l2_rescale(self, x: Tensor, delta: Tensor) -> Tensor:
        """clip(x + eps * delta / ||delta||, 0, 1)."""
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + self.eps * delta / norms).clamp(0.0, 1.0)

    @staticmethod
    def _windows(
        h: int, w: int, s: int, rng: SampleRandom
    ) -> tuple[Tensor, Tensor]:
        """Row and column indices (n, s) of one random s x s window per image."""
        top = rng.randint(0, h - s + 1, 1)
        left = rng.randint(0, w - s + 1, 1)
        ar = torch.arange(s, device=rng.device).view(1, -1)
        return top + ar, left + ar

    @staticmethod
    def _index(n: int, c: int, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Advanced indices selecting the (n, c, s, s) windows given by rows / cols (n, s)."""
        dev = rows.device
        return (
            torch.arange(n, device=dev).view(-1, 1, 1, 1),
            torch.arange(c, device=dev).view(1, -1, 1, 1),
            rows.view(n, 1, -1, 1),
            cols.view(n, 1, 1, -1),
        )

    def _linf_query(self, x: Tensor, x_best: Tensor, s: int, rng: SampleRandom) -> Tensor:
        """Candidates (A, C, H, W): x_best with one window per image set to x ± eps per channel."""
        n, c, h, w = x.shape
        rows, cols = self._windows(h, w, s, rng)
        idx = self._index(n, c, rows, cols)
        lo, hi = (x[idx] - self.eps).clamp(min=0.0), (x[idx] + self.eps).clamp(max=1.0)
        current = x_best[idx]
        sign = rng.signs(c, 1, 1, dtype=x.dtype)
        new = torch.where(sign > 0, hi, lo)
        # a window left as it was costs a query for nothing: flip the sign of those images once
        same = (new - current).abs().flatten(1).amax(dim=1) < 1e-7
        if bool(same.any()):
            flipped = torch.where(sign > 0, lo, hi)
            new = torch.where(same.view(-1, 1, 1, 1), flipped, new)
        cand = x_best.clone()
        cand[idx] = new
        return cand

    def _l2_query(self, x: Tensor, x_best: Tensor, s: int, rng: SampleRandom) -> Tensor:
        """Candidates (A, C, H, W) of the L2 search (see the module docstring)."""
        n, c, h, w = x.shape
        delta = x_best - x
        r1, c1 = self._windows(h, w, s, rng)
        r2, c2 = self._windows(h, w, s, rng)
        i1, i2 = self._index(n, c, r1, c1), self._index(n, c, r2, c2)
        in1 = torch.zeros(n, 1, h, w, dtype=torch.bool, device=x.device)
        in1[i1[0], 0, i1[2], i1[3]] = True
        both = in1.clone()
        both[i2[0], 0, i2[2], i2[3]] = True
        # per channel: the mass of the two windows, and the budget not used by the image yet
        mass = (delta * both).pow(2).sum(dim=(2, 3)).view(n, c, 1, 1)
        unused = (self.eps**2 - delta.pow(2).sum(dim=(1, 2, 3))).clamp(min=0.0).view(n, 1, 1, 1) / c
        old = delta[i1]
        old = old / old.pow(2).sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-12)
        pattern = meta_pattern(s).to(device=x.device, dtype=x.dtype)
        flip = rng.rand(1, 1, 1) < 0.5
        pattern = torch.where(flip, pattern.t(), pattern)
        sign = rng.signs(c, 1, 1, dtype=x.dtype)
        new = old + sign * pattern
        new = new / new.pow(2).sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-12) * (mass + unused).sqrt()
        out = delta.clone()
        out[i2] = 0.0
        out[i1] = new
        return self._l2_rescale(x, out)


@variant(norm="linf")
class SquareLinf(Square):
    """Square attack in the L-inf ball (default eps 0.1, 5,000 queries, p_init 0.8)."""


@variant(norm="l2")
class SquareL2(Square):
    """Square attack in the L2 ball (default eps 1.5, 5,000 queries, p_init 0.8)."""


ATTACKS.register("square-linf", "Square attack, black-box random search in the L-inf ball (5,000 queries)")(SquareLinf)
ATTACKS.register("square-l2", "Square attack, black-box random search in the L2 ball (5,000 queries)")(SquareL2)
