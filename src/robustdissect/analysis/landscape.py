"""Input-space loss landscapes and decision surfaces (METHODS §2.2, reconstructed from Yu et al.).

    D(x) = Z_y(x) − max_{j≠y} Z_j(x)       (decision surface; D < 0 ⇔ misclassified)
    L(x) = CE(F(x), y)                     (CE surface)
    S(a, b) = D(clip[0,1](x + a·d₁ + b·d₂)),  a, b ∈ [−r, r] on a G×G grid (G odd: (0, 0) is a point)

Directions (per image). d₁, the adversarial direction: `direction="pgd"` takes δ = x_adv − x of a
stored PGD example (ℓ∞: δ/‖δ‖∞, ℓ2: δ/‖δ‖₂; where δ = 0 the gradient direction below is used);
`direction="gradient"` takes g = ∇x CE(F(x), y) (ℓ∞: sign g, ℓ2: g/‖g‖₂). d₂: a Rademacher sign
vector (ℓ∞) or a Gaussian orthogonalised to d₁ and normalised (ℓ2). So a = ε along d₁ is a point
at distance ε in the chosen norm.

Read-outs: boundary distance a* = min{a > 0 : D(x + a·d₁) ≤ 0} on a fine 1-D slice (linear
interpolation between the last point with D > 0 and the first with D ≤ 0; inf when the boundary
is beyond r, 0 when x is already misclassified) and steepness = |∂D/∂a| at 0 (central difference
on the slice).

Cost: the grid's N·G² points (plus N·slice points) are evaluated in chunks of `chunk_size`
points, one forward each: ⌈N·G²/chunk⌉ + ⌈N·slice/chunk⌉ model calls, not N·G².
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import PGD
from ..errors import UserError
from ..modelutil import eval_mode, model_device

__all__ = [
    "DIRECTIONS", "NORMS", "LandscapeResult", "decision_margin", "landscape", "landscape_attack",
    "landscape_directions",
]  # fmt: skip

NORMS = ("linf", "l2")
DIRECTIONS = ("pgd", "gradient")


def decision_margin(logits: Tensor, y: Tensor) -> Tensor:
    """D = Z_y − max_{j≠y} Z_j per row (N,) of logits (N, K), labels y (N,)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -math.inf)
    return z_y - others.amax(dim=1)


def _unit(v: Tensor, norm: str) -> Tensor:
    """v (N, ...) scaled to unit ℓ∞ or ℓ2 norm per row; zero rows stay zero."""
    flat = v.flatten(1)
    n = flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)
    return v / n.clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def landscape_directions(
    model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "linf", direction: str = "pgd",
    x_adv: Tensor | None = None, seed: int = 0,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(d₁, d₂), each (N, C, H, W) of unit norm per image (see the module docstring)."""
    if norm not in NORMS:
        raise UserError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if direction not in DIRECTIONS:
        raise UserError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if direction == "pgd" and x_adv is None:
        raise UserError("direction 'pgd' needs the adversarial examples x_adv")
    device = model_device(model, x.device)
    xd = x.to(device).detach().requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        (g,) = torch.autograd.grad(F.cross_entropy(model(xd).float(), y.to(device), reduction="sum"), xd)
    g = g.detach().cpu()
    grad_dir = g.sign() if norm == "linf" else _unit(g, "l2")
    if direction == "pgd":
        assert x_adv is not None
        delta = (x_adv.cpu() - x.cpu()).float()
        moved = delta.flatten(1).abs().amax(1) > 0
        d1 = torch.where(moved.view(-1, *([1] * (x.dim() - 1))), _unit(delta, norm), grad_dir)
    else:
        d1 = grad_dir
    gen = torch.Generator().manual_seed(seed)
    if norm == "linf":
        d2 = torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1
    else:
        r = torch.randn(x.shape, generator=gen)
        f1, fr = d1.flatten(1), r.flatten(1)
        fr = fr - (fr * f1).sum(1, keepdim=True) * f1  # d1 has unit ℓ2 norm here
        d2 = _unit(fr.view_as(x), "l2")
    return d1, d2


@dataclass(frozen=True)
class LandscapeResult:
    """Surfaces over the (d₁, d₂) plane for N images.

    a, b: (G,) coordinates along d₁ and d₂; decision, loss: (N, G, G) D and CE at
    [image, index of a, index of b]; line_a: (S,) coordinates of the 1-D slice along d₁ (b = 0),
    line_decision: (N, S); margin: (N,) D(x); boundary: (N,) a* (inf beyond the slice); steepness:
    (N,) |∂D/∂a| at 0; model_calls: forwards used; seconds: wall time."""

    a: Tensor
    b: Tensor
    decision: Tensor
    loss: Tensor
    line_a: Tensor
    line_decision: Tensor
    margin: Tensor
    boundary: Tensor
    steepness: Tensor
    eps: float
    radius: float
    norm: str
    direction: str
    model_calls: int
    seconds: float

    @property
    def mean_decision(self) -> Tensor:
        """(G, G) decision surface averaged over the images."""
        return self.decision.mean(dim=0)

    @property
    def mean_loss(self) -> Tensor:
        """(G, G) CE surface averaged over the images."""
        return self.loss.mean(dim=0)

    def summary(self) -> dict[str, float | int | str]:
        """Read-outs over the images correctly classified at x (a* = 0 for the others)."""
        ok = self.margin > 0
        b = self.boundary[ok]
        finite = b[torch.isfinite(b)]
        return {
            "n": int(self.margin.numel()),
            "n_correct": int(ok.sum()),
            "boundary_inside_eps": float((b <= self.eps).float().mean()) if b.numel() else math.nan,
            "boundary_median": float(b.median()) if b.numel() else math.nan,
            "boundary_beyond_radius": float((~torch.isfinite(b)).float().mean()) if b.numel() else math.nan,
            "boundary_mean_finite": float(finite.mean()) if finite.numel() else math.nan,
            "steepness_mean": float(self.steepness[ok].mean()) if b.numel() else math.nan,
            "margin_mean": float(self.margin.mean()),
            "eps": self.eps,
            "radius": self.radius,
            "norm": self.norm,
            "direction": self.direction,
            "model_calls": self.model_calls,
            "seconds": self.seconds,
        }

    def per_image_rows(self, y: Tensor, model: str = "model") -> list[dict[str, float | int | str]]:
        """One row per image (labels y (N,)): margin D(x), boundary distance a*, steepness."""
        return [
            {"model": model, "image": i, "label": int(y[i]), "margin": float(self.margin[i]),
             "boundary_distance": float(self.boundary[i]), "steepness": float(self.steepness[i])}
            for i in range(int(self.margin.numel()))
        ]  # fmt: skip

    def mean_surface_rows(self, model: str = "model") -> list[dict[str, float | str]]:
        """One row per grid point (a, b) of the mean decision and CE surfaces."""
        dec, loss = self.mean_decision, self.mean_loss
        return [
            {"model": model, "a": a, "b": b, "decision": float(dec[i, j]), "loss": float(loss[i, j])}
            for i, a in enumerate(self.a.tolist()) for j, b in enumerate(self.b.tolist())
        ]  # fmt: skip


def landscape_attack(eps: float, norm: str = "linf", steps: int = 20, seed: int = 0) -> PGD:
    """The PGD whose example gives d₁ (`direction="pgd"`): from x itself (no random start) and
    every step run (no early stop), α = 2.5ε/k; a random start or an early stop would make δ
    mostly the start's noise, not the adversarial path."""
    return PGD(eps, norm=norm, steps=steps, step_rule="madry", random_start=False, seed=seed, batch_size=500)


def _evaluate_points(
    model: nn.Module, x: Tensor, y: Tensor, d1: Tensor, d2: Tensor, a: Tensor, b: Tensor, chunk_size: int,
    clip: bool,
) -> tuple[Tensor, Tensor, int]:  # fmt: skip
    """D and CE (N, P) at x_i + a_p·d1_i + b_p·d2_i for P coordinate pairs a, b (P,), built and
    evaluated `chunk_size` points at a time; returns (D, CE, number of model calls)."""
    n, p = len(x), len(a)
    device = model_device(model, x.device)
    total = n * p
    dec = torch.empty(total)
    ce = torch.empty(total)
    calls = 0
    xd, d1d, d2d, yd = x.to(device), d1.to(device), d2.to(device), y.to(device)
    ad, bd = a.to(device), b.to(device)
    with eval_mode(model), torch.no_grad():
        for start in range(0, total, chunk_size):
            flat = torch.arange(start, min(start + chunk_size, total), device=device)
            img, pt = flat // p, flat % p
            shape = (-1, *([1] * (x.dim() - 1)))
            pts = xd[img] + ad[pt].view(shape) * d1d[img] + bd[pt].view(shape) * d2d[img]
            if clip:
                pts = pts.clamp(0.0, 1.0)
            logits = model(pts).float()
            calls += 1
            lab = yd[img]
            dec[start : start + len(flat)] = decision_margin(logits, lab).cpu()
            ce[start : start + len(flat)] = F.cross_entropy(logits, lab, reduction="none").cpu()
    return dec.view(n, p), ce.view(n, p), calls


def _first_crossing(a: Tensor, d: Tensor) -> Tensor:
    """a* per row of d (N, S) over increasing a (S,) with a[0] = 0: linear interpolation to the
    first D ≤ 0; 0 where D(0) ≤ 0; inf where D stays > 0."""
    out = torch.full((d.shape[0],), math.inf)
    below = d <= 0
    has = below.any(dim=1)
    first = torch.where(has, below.float().argmax(dim=1), torch.zeros_like(has, dtype=torch.long))
    for i in torch.nonzero(has).flatten().tolist():
        j = int(first[i])
        if j == 0:
            out[i] = 0.0
            continue
        d0, d1 = float(d[i, j - 1]), float(d[i, j])
        a0, a1 = float(a[j - 1]), float(a[j])
        out[i] = a0 + (a1 - a0) * d0 / (d0 - d1) if d0 != d1 else a1
    return out


def landscape(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 0.1,
    radius: float | None = None,
    grid: int = 41,
    norm: str = "linf",
    direction: str = "pgd",
    x_adv: Tensor | None = None,
    line_points: int = 201,
    chunk_size: int = 4096,
    clip: bool = True,
    seed: int = 0,
    directions: tuple[Tensor, Tensor] | None = None,
) -> LandscapeResult:
    """Decision and CE surfaces of `model` around x (N, C, H, W) with labels y (N,) on a
    `grid`×`grid` plane of half-width `radius` (default 2ε) over (d₁, d₂), and the read-outs a*
    and steepness on a `line_points` slice along d₁ over [0, radius] (METHODS §2.2).

    directions: explicit (d₁, d₂) (N, C, H, W) instead of `landscape_directions(...)`;
    clip: clip the points to [0, 1] (the images' box)."""
    if grid < 3 or grid % 2 == 0:
        raise UserError(f"grid must be an odd integer >= 3 (so that (0, 0) is a grid point), got {grid}")
    if line_points < 3:
        raise UserError(f"line_points must be >= 3, got {line_points}")
    if chunk_size < 1:
        raise UserError(f"chunk_size must be >= 1, got {chunk_size}")
    r = float(radius) if radius is not None else 2.0 * float(eps)
    if not r > 0:
        raise UserError(f"the landscape radius must be > 0, got {r}")
    t0 = time.perf_counter()
    x, y = x.detach().cpu().float(), y.detach().cpu().long()
    if directions is None:
        d1, d2 = landscape_directions(model, x, y, norm=norm, direction=direction, x_adv=x_adv, seed=seed)
    else:
        d1, d2 = (d.detach().cpu().float() for d in directions)
    coords = torch.linspace(-r, r, grid)
    ga, gb = torch.meshgrid(coords, coords, indexing="ij")
    dec, ce, calls = _evaluate_points(model, x, y, d1, d2, ga.flatten(), gb.flatten(), chunk_size, clip)
    line = torch.linspace(0.0, r, line_points)
    h = float(line[1])
    line_all = torch.cat([torch.tensor([-h]), line])  # one point behind 0 for the central difference
    ldec, _, lcalls = _evaluate_points(model, x, y, d1, d2, line_all, torch.zeros_like(line_all), chunk_size, clip)
    steep = ((ldec[:, 2] - ldec[:, 0]) / (2 * h)).abs()
    line_dec = ldec[:, 1:]
    return LandscapeResult(
        a=coords, b=coords, decision=dec.view(len(x), grid, grid), loss=ce.view(len(x), grid, grid),
        line_a=line, line_decision=line_dec, margin=line_dec[:, 0].clone(),
        boundary=_first_crossing(line, line_dec), steepness=steep, eps=float(eps), radius=r, norm=norm,
        direction=direction, model_calls=calls + lcalls, seconds=time.perf_counter() - t0,
    )  # fmt: skip
