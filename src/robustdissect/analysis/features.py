"""Feature-specific dissection (METHODS §6.1–§6.4, §3.5): per-unit scores, usefulness ρ, robust
usefulness γ, stability s, the four quadrants and the depth-stratified layer selection.

A *feature* is a unit (channel k of layer l); its response a(x) is the spatial mean of the layer
output (fc layers: the value). With μ, s (Welford) and the empirical CDF F̂ of a over a reference
set of clean *training* images:

    f(x) = (a(x) − μ) / s                standardised response (Ilyas normalisation)
    q(x) = F̂(a(x)) ∈ [0, 1]              percentile score (distribution-free, comparable across layers)
    φ(x) = a(x) · ∂Z_y/∂a                gradient × activation; ∂Z_y/∂a = Σ_hw ∂Z_y/∂F[h, w] (a
                                          uniform shift of the map moves a by exactly that shift)
    ρ^bal_{k,c} = ½(E[f | y=c] − E[f | y≠c]),  ρ_k = max_c,  c*_k = argmax_c
    γ_k = ½(E[inf_δ f(x+δ) | y=c*] − E[sup_δ f(x+δ) | y≠c*]),   r_k = γ_k / ρ_k
    s_k = E|f(x + δ*) − f(x)|,  δ* = the model-level PGD

inf / sup are the worst case per sample over an attack set — the clean point (δ = 0), model-level
untargeted PGD on CE, FGSM, and feature-targeted PGD on ±f_k (lower f on class c*, raise it on the
others; one attack per candidate unit, several seeded restarts). γ̂ is therefore an **upper bound**
of the true γ (any δ gives a value ≥ the infimum), and γ̂ ≤ ρ̂ per unit holds exactly because the
clean point is in the set.

Quadrants (§6.3): τ_ρ = the 99th percentile of max_c ρ^bal under label permutation (100 shuffles,
pooled over units; fallback 0.1), τ_s = median s. RU: ρ ≥ τ_ρ, γ > 0; NRU ("dangerous"):
ρ ≥ τ_ρ, γ ≤ 0; RL: ρ < τ_ρ, s ≤ τ_s; NL: ρ < τ_ρ, s > τ_s. Strict variant: RU needs r ≥ 0.5
(else NRU).

Layer selection (§6.4): layers fall in J depth bins by index thirds (smallcnn: {conv1–2},
{conv3–4}, {conv5–6}); each bin gets m units, split over its layers with quotas ∝ √C_l (largest
remainder), and each layer gives its quota of top units by a scale-free score (q, ρ) — never a
raw magnitude, so rescaling one layer changes nothing.

Entry points:

    score_features(model, x, y, x_ref, layers, options, ...) -> FeatureScores
        The dissection of one model on images x (N, C, H, W) with labels y (N,) against clean
        reference images x_ref; `model_attacks` / `run_attack` choose the attacks and how they
        run (the stages' memoized `stages.common.feature_scores(ctx)` routes them through the
        run's evidence store).

`FeatureScores` holds per-unit tensors (layer, unit, ρ, c*, γ, r, s, q̄, φ̄, quadrant, ...),
per-sample tensors (f clean / worst low / worst high / under PGD, q, φ; (N, U)) for bootstraps,
`rows()` (one dict per unit), `layer_rows()` (quadrant shares per layer), `top_units_per_image`
(N, m) and `top_units_per_class` (K, m) (unit indices, by q).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import FGSM, PGD, Attack
from ..config import check_ints, parse_budgets
from ..errors import UserError
from ..evaluation import EvaluateOptions, build_attack
from ..modelutil import eval_mode, model_device
from ..probe import Welford, record, spatial_reduce
from ..stats import percentile_interval, resample_indices

log = logging.getLogger(__name__)

QUADRANTS = ("RU", "NRU", "RL", "NL")
QUADRANT_NAMES = {
    "RU": "robust & useful",
    "NRU": "non-robust & useful (dangerous)",
    "RL": "robust & useless",
    "NL": "non-robust & useless (noise)",
}

# (attack, x (N, C, H, W), y (N,)) -> x_adv (N, C, H, W); the stage routes it through the store
AttackRunner = Callable[[Attack, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class FeatureOptions:
    """Settings of the feature dissection (METHODS §6, §8.3 "§6" row); every one is an option."""

    layers: list[str] | None = None  # default: every conv hook point (BN output)
    n: int | None = None  # analysed images: the first n of the run's images (None: all)
    eps: float = 0.1  # L-inf budget of every attack in the set
    reference_n: int = 2000  # clean training images for μ, s and the CDF
    cdf_capacity: int = 4096  # values kept per unit by the CDF sketch (exact up to this many images)
    feature_steps: int = 50  # feature-targeted PGD
    feature_alpha: float | None = 0.01  # None: 2.5 eps / steps
    restarts: int = 3  # seeded runs of each feature-targeted PGD; the worst per sample is kept
    candidates_per_bin: int = 10  # units per depth bin attacked with feature-targeted PGD (by ρ)
    depth_bins: int = 3
    top_m: int = 10  # top-activated units per depth bin, per image and per class (by q)
    permutations: int = 100  # label shuffles of the τ_ρ null
    null_quantile: float = 0.99
    tau_rho_fallback: float = 0.1
    tau_s: float | None = None  # None: the median s over the analysed units
    strict_r: float = 0.5
    bootstrap: int = 200  # resamples of the images for the quadrant-share intervals
    compare: list[str] | None = None  # other checkpoints (None: PAT and SNS beside a shipped smallcnn)
    batch_size: int = 250

    def __post_init__(self) -> None:
        parse_budgets(self, "eps", stage="features")
        ints = {"reference_n": 1, "cdf_capacity": 2, "feature_steps": 1, "restarts": 1, "depth_bins": 1,
                "top_m": 1, "permutations": 0, "bootstrap": 0, "batch_size": 1, "candidates_per_bin": 0}  # fmt: skip
        check_ints(self, ints, "features")
        if self.n is not None and (not isinstance(self.n, int) or self.n < 2):
            raise UserError(f"features: n must be an integer >= 2 or null, got {self.n!r}")
        if not 0.0 < self.null_quantile < 1.0:
            raise UserError(f"features: null_quantile must lie in (0, 1), got {self.null_quantile}")
        if self.feature_alpha is not None and not self.feature_alpha > 0:
            raise UserError(f"features: feature_alpha must be > 0 or null, got {self.feature_alpha}")


# The default run's budgets; `--full` uses the dataclass defaults.
QUICK_FEATURES: dict[str, Any] = {
    "n": 200,
    "feature_steps": 10,
    "feature_alpha": None,
    "restarts": 1,
    "candidates_per_bin": 1,
    "permutations": 100,
    "bootstrap": 100,
}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run small-tensor statistics on one intra-op thread: on (N, U) tables of a few hundred rows
    the threads' synchronisation costs far more than the arithmetic, badly so on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# streaming reference statistics


class ChannelCDF:
    """Per-channel empirical CDF of (B, C) values in fixed memory.

    The first `capacity` values per channel are kept, and while n ≤ capacity `cdf` is the exact
    empirical CDF #{v ≤ a} / n. Beyond that, the sketch freezes `capacity` edges per channel
    (evenly spaced order statistics of the values kept so far, the largest among them) and counts
    every value, exactly, into the right-closed intervals between consecutive edges, the lower tail
    and the upper tail (with the running min and max). F̂ is then exact at every edge and linear
    inside an interval, so |F̂ − F| ≤ the largest interval's share of the values — `error_bound()`,
    a few times 1 / capacity when the values arrive in random order (a shuffled reference set). Memory:
    capacity edges and capacity + 1 counts per channel, whatever n.
    """

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 2:
            raise UserError(f"the CDF sketch needs capacity >= 2, got {capacity}")
        self.capacity = capacity
        self.n = 0
        self.buffer: Tensor | None = None  # (C, m) the values themselves while m ≤ capacity
        self.edges: Tensor | None = None  # (C, capacity) float32, sorted
        self.counts: Tensor | None = None  # (C, capacity + 1) int64: (−∞, e0], (e0, e1], ..., (e_last, ∞)
        self.lo = torch.zeros(0)
        self.hi = torch.zeros(0)

    def update(self, values: Tensor) -> None:
        """values (B, C)."""
        v = values.detach().to(torch.float32).cpu().t().contiguous()  # (C, B)
        self.n += int(v.shape[1])
        if self.edges is None:
            self.buffer = v if self.buffer is None else torch.cat([self.buffer, v], 1)
            if self.buffer.shape[1] <= self.capacity:
                return
            s = self.buffer.sort(dim=1).values
            m = s.shape[1]
            pick = (torch.arange(1, self.capacity + 1) * m) // self.capacity - 1  # the last pick is the max
            self.edges = s[:, pick].contiguous()
            self.counts = torch.zeros(s.shape[0], self.capacity + 1, dtype=torch.int64)
            self.lo, self.hi = s[:, 0].clone(), s[:, -1].clone()
            self.buffer = None
            self._count(s.contiguous())
            return
        self.lo = torch.minimum(self.lo, v.amin(1))
        self.hi = torch.maximum(self.hi, v.amax(1))
        self._count(v)

    def _count(self, v: Tensor) -> None:
        assert self.edges is not None and self.counts is not None
        c, k = v.shape[0], self.capacity + 1
        j = torch.searchsorted(self.edges, v, right=False)  # v in (e_{j-1}, e_j]; j = capacity above e_last
        flat = (j + torch.arange(c)[:, None] * k).flatten()
        self.counts += torch.bincount(flat, minlength=c * k).view(c, k)

    def error_bound(self) -> Tensor:
        """Largest |F̂ − F| per channel (C,): 0 while exact, else the largest interval's share."""
        if self.counts is None:
            return torch.zeros(0 if self.buffer is None else self.buffer.shape[0])
        return self.counts.amax(1).double() / self.n

    def values_held(self) -> int:
        """Numbers kept per channel (values, or edges + counts): bounded by 2·capacity + 1."""
        if self.edges is None:
            return 0 if self.buffer is None else int(self.buffer.shape[1])
        return 2 * self.capacity + 1

    def cdf(self, a: Tensor) -> Tensor:
        """F̂(a) = share of reference values ≤ a; a (N, C) → (N, C) float32 in [0, 1]."""
        if self.n == 0:
            raise UserError("the CDF sketch has seen no values")
        q = a.detach().to(torch.float32).cpu().t().contiguous()  # (C, N)
        if self.edges is None:
            assert self.buffer is not None
            s = self.buffer.sort(dim=1).values.contiguous()
            count = torch.searchsorted(s, q, right=True).to(torch.float64)
            return (count / self.n).clamp_(0.0, 1.0).t().to(torch.float32)
        assert self.counts is not None
        cap = self.capacity
        j = torch.searchsorted(self.edges, q, right=False)  # q in (e_{j-1}, e_j]
        e = self.edges.double()
        lo, hi = self.lo.double()[:, None].expand_as(q), self.hi.double()[:, None].expand_as(q)
        left = torch.where(j > 0, e.gather(1, (j - 1).clamp_min(0)), lo)
        right = torch.where(j < cap, e.gather(1, j.clamp_max(cap - 1)), hi)
        cum = self.counts.cumsum(1).double()
        below = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0)), torch.zeros_like(left))
        inbin = self.counts.double().gather(1, j)
        qd = q.double()
        width = right - left
        frac = torch.where(width > 0, ((qd - left) / width.clamp_min(1e-300)).clamp(0, 1), (qd >= right).double())
        return ((below + frac * inbin) / self.n).clamp_(0.0, 1.0).t().to(torch.float32)


@dataclass
class Reference:
    """Reference statistics of the analysed units (U = Σ C_l, layers concatenated in order):
    mean μ (U,), std s (U,) over `n` clean training images, and their CDF sketch."""

    layers: list[str]
    channels: list[int]
    mu: Tensor
    sd: Tensor
    cdf: ChannelCDF
    n: int

    def standardise(self, a: Tensor) -> Tensor:
        """f = (a − μ) / s; a (N, U) → (N, U)."""
        return (a - self.mu.to(a)) / self.sd.to(a)

    def percentile(self, a: Tensor) -> Tensor:
        """q = F̂(a) ∈ [0, 1]; a (N, U) → (N, U)."""
        return self.cdf.cdf(a)


def responses(model: nn.Module, x: Tensor, layers: Sequence[str], batch_size: int = 250) -> Tensor:
    """Spatial-mean response of every channel of `layers` on images x (N, C, H, W): (N, U)
    float32 on the CPU, the layers' channels concatenated in the given order."""
    out: list[Tensor] = []
    for xb, acts in _layer_batches(model, x, layers, batch_size):
        del xb
        out.append(torch.cat([acts[name] for name in layers], 1))
    return torch.cat(out) if out else torch.zeros(0, 0)


def _layer_batches(
    model: nn.Module, x: Tensor | Iterable[Tensor], layers: Sequence[str], batch_size: int
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """(batch, {layer: (B, C) spatial means}) over images x (N, C, H, W) or an iterable of batches."""
    device = model_device(model)
    names = list(layers)
    got: dict[str, Tensor] = {}
    batches: Iterable[Tensor] = (
        (x[s : s + batch_size] for s in range(0, x.shape[0], batch_size)) if isinstance(x, Tensor) else x
    )

    def keep(name: str, a: Tensor) -> None:
        got[name] = spatial_reduce(a).float().cpu()

    with eval_mode(model), torch.no_grad(), record(model, names, keep, keep=False):
        for batch in batches:
            xb = batch.to(device)
            got.clear()
            model(xb)
            yield xb, dict(got)


def reference_statistics(
    model: nn.Module,
    x_ref: Tensor | Iterable[Tensor],
    layers: Sequence[str],
    batch_size: int = 250,
    capacity: int = 4096,
) -> Reference:
    """One streaming pass over clean reference images x_ref (N, C, H, W), or an iterable of such
    batches: Welford mean/std and the CDF sketch of every unit's response; memory does not grow
    with N beyond the sketch. A unit with zero spread gets s = 1 (f = a − μ)."""
    names = list(layers)
    moments, cdf = Welford(), ChannelCDF(capacity)
    channels: list[int] = []
    for _xb, acts in _layer_batches(model, x_ref, names, batch_size):
        a = torch.cat([acts[n] for n in names], 1)
        if not channels:
            channels = [int(acts[n].shape[1]) for n in names]
        with one_thread():
            moments.update(a)
            cdf.update(a)
    if moments.n == 0:
        raise UserError("the reference set holds no images")
    sd = moments.std().to(torch.float32)
    sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
    return Reference(names, channels, moments.mean.to(torch.float32).cpu(), sd, cdf, moments.n)


def gradient_x_activation(
    model: nn.Module, x: Tensor, y: Tensor, layers: Sequence[str], batch_size: int = 250
) -> tuple[Tensor, Tensor]:
    """Responses a (N, U) and φ = a · ∂Z_y/∂a (N, U) on images x (N, C, H, W) with labels y (N,),
    where ∂Z_y/∂a = Σ_hw ∂Z_y/∂F[h, w] (the derivative along a uniform shift of the map)."""
    names = list(layers)
    device = model_device(model, x.device)
    maps: dict[str, Tensor] = {}

    def keep(name: str, t: Tensor) -> None:
        maps[name] = t

    a_out: list[Tensor] = []
    phi_out: list[Tensor] = []
    with eval_mode(model), torch.enable_grad(), record(model, names, keep, keep=False, detach=False):
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].to(device).requires_grad_(True)
            yb = y[s : s + batch_size].to(device)
            maps.clear()
            z = model(xb).gather(1, yb[:, None]).sum()
            grads = torch.autograd.grad(z, [maps[n] for n in names])
            a = torch.cat([spatial_reduce(maps[n].detach()) for n in names], 1)
            g = torch.cat([gr.flatten(2).sum(-1) if gr.ndim > 2 else gr for gr in grads], 1)
            a_out.append(a.float().cpu())
            phi_out.append((a * g).float().cpu())
    return torch.cat(a_out), torch.cat(phi_out)


# --------------------------------------------------------------------------------------------
# usefulness, robustness, quadrants


def balanced_usefulness(f: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """ρ^bal_{k,c} = ½(E[f_k | y=c] − E[f_k | y≠c]); f (N, U), y (N,) → (U, K). A class without
    images (or with all of them) gets NaN."""
    onehot = torch.nn.functional.one_hot(y.long(), num_classes).to(f.dtype)  # (N, K)
    n_c = onehot.sum(0)  # (K,)
    sum_c = onehot.t() @ f  # (K, U)
    mean_c = sum_c / n_c[:, None]
    mean_rest = (f.sum(0)[None, :] - sum_c) / (f.shape[0] - n_c)[:, None]
    return (0.5 * (mean_c - mean_rest)).t()


def robust_usefulness(f_low: Tensor, f_high: Tensor, y: Tensor, cls: Tensor) -> Tensor:
    """γ^bal_{k,c} = ½(E[inf f_k | y=c] − E[sup f_k | y≠c]) at c = cls[k]; f_low, f_high (N, U):
    the per-sample worst case (lowest / highest f over the attack set), y (N,), cls (U,) → (U,)."""
    mask = (y.long()[:, None] == cls.long()[None, :]).to(f_low.dtype)  # (N, U)
    n_in = mask.sum(0)
    low_in = (f_low * mask).sum(0) / n_in
    high_out = (f_high * (1 - mask)).sum(0) / (mask.shape[0] - n_in)
    return 0.5 * (low_in - high_out)


def permutation_threshold(
    f: Tensor,
    y: Tensor,
    num_classes: int,
    shuffles: int = 100,
    quantile: float = 0.99,
    seed: int = 0,
    fallback: float = 0.1,
) -> tuple[float, str]:
    """τ_ρ: the `quantile` of max_c ρ^bal under `shuffles` label permutations, pooled over units;
    returns (τ, "permutation") or (fallback, "fallback") when no null can be drawn."""
    if shuffles <= 0 or f.shape[0] < 2 or int(torch.unique(y).numel()) < 2:
        return float(fallback), "fallback"
    g = torch.Generator().manual_seed(seed)
    null = []
    for _ in range(shuffles):
        perm = y[torch.randperm(len(y), generator=g)]
        null.append(torch.nan_to_num(balanced_usefulness(f, perm, num_classes), nan=-math.inf).amax(1))
    values = torch.cat(null)
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return float(fallback), "fallback"
    return float(torch.quantile(values.double(), quantile)), "permutation"


def classify(
    rho: Tensor, gamma: Tensor, s: Tensor, tau_rho: float, tau_s: float, strict_r: float = 0.5
) -> tuple[list[str], list[str]]:
    """Quadrant of every unit (§6.3) and the strict variant (RU only if γ/ρ ≥ strict_r, else NRU)."""
    out, strict = [], []
    for rk, gk, sk in zip(rho.tolist(), gamma.tolist(), s.tolist(), strict=True):
        if rk >= tau_rho:
            quad = "RU" if gk > 0 else "NRU"
            tight = "RU" if quad == "RU" and gk >= strict_r * rk else "NRU"
        else:
            quad = tight = "RL" if sk <= tau_s else "NL"
        out.append(quad)
        strict.append(tight)
    return out, strict


# --------------------------------------------------------------------------------------------
# layer selection (§6.4)


def depth_bins(n_layers: int, bins: int = 3) -> list[int]:
    """Bin of each of `n_layers` layers in depth order, by index thirds (generally J parts):
    layer i goes to bin ⌊i·J/L⌋; 6 layers, J = 3 → [0, 0, 1, 1, 2, 2]."""
    j = max(1, min(bins, n_layers))
    return [i * j // n_layers for i in range(n_layers)]


def layer_quotas(channels: Sequence[int], m: int) -> list[int]:
    """Split m units over layers with quotas ∝ √C_l (largest remainder), none above C_l."""
    caps = [int(c) for c in channels]
    m = min(m, sum(caps))
    quota = [0] * len(caps)
    left = m
    while left > 0:
        open_ = [i for i in range(len(caps)) if quota[i] < caps[i]]
        w = [math.sqrt(caps[i]) for i in open_]
        raw = [left * wi / sum(w) for wi in w]
        add = [min(math.floor(r), caps[i] - quota[i]) for r, i in zip(raw, open_, strict=True)]
        if sum(add) == 0:  # hand out the remainder one by one, largest fractional part first
            order = sorted(range(len(open_)), key=lambda t: (-(raw[t] - math.floor(raw[t])), t))
            add[order[0]] = 1
        for a, i in zip(add, open_, strict=True):
            quota[i] += a
        left = m - sum(quota)
    return quota


def stratified_select(score: Tensor, channels: Sequence[int], m: int, bins: int = 3) -> Tensor:
    """§6.4: unit indices (into the concatenated layers) chosen per depth bin, m per bin, each
    layer's quota (∝ √C_l) of its top units by `score`. score (U,) → (M,), or (N, U) → (N, M)
    (one selection per row, e.g. per image). Ties go to the smaller unit index."""
    one = score.ndim == 1
    sc = score[None, :] if one else score
    offsets = [0]
    for c in channels:
        offsets.append(offsets[-1] + int(c))
    if sc.shape[1] != offsets[-1]:
        raise UserError(f"scores cover {sc.shape[1]} units, the layers have {offsets[-1]}")
    bin_of = depth_bins(len(channels), bins)
    picks: list[Tensor] = []
    for b in sorted(set(bin_of)):
        members = [i for i, bb in enumerate(bin_of) if bb == b]
        quotas = layer_quotas([channels[i] for i in members], m)
        for i, k in zip(members, quotas, strict=True):
            if k == 0:
                continue
            part = torch.nan_to_num(sc[:, offsets[i] : offsets[i + 1]].double(), nan=-math.inf)
            order = torch.sort(part, dim=1, descending=True, stable=True).indices[:, :k]
            picks.append(order + offsets[i])
    out = torch.cat(picks, 1) if picks else sc.new_zeros((sc.shape[0], 0), dtype=torch.long)
    return out[0] if one else out


# --------------------------------------------------------------------------------------------
# scoring


@dataclass
class UnitScores:
    """Per-unit scores from per-sample values (what a bootstrap recomputes): ρ^bal (U, K), ρ, c*,
    γ, r, s (U,), the thresholds and the quadrants."""

    rho_bal: Tensor
    rho: Tensor
    cls: Tensor
    gamma: Tensor
    r: Tensor
    s: Tensor
    tau_rho: float
    tau_s: float
    quadrant: list[str]
    strict_quadrant: list[str]


def score_units(
    f_clean: Tensor,
    f_low: Tensor,
    f_high: Tensor,
    f_adv: Tensor,
    y: Tensor,
    num_classes: int,
    tau_rho: float,
    tau_s: float | None = None,
    strict_r: float = 0.5,
) -> UnitScores:
    """ρ, c*, γ, r, s and the quadrants from per-sample standardised responses (N, U): clean,
    worst low / high over the attack set, and under the model-level attack (for s)."""
    rho_bal = balanced_usefulness(f_clean, y, num_classes)
    rho, cls = torch.nan_to_num(rho_bal, nan=-math.inf).max(1)
    gamma = robust_usefulness(f_low, f_high, y, cls)
    r = torch.where(rho > 0, gamma / rho.clamp_min(1e-12), torch.full_like(rho, math.nan))
    s = (f_adv - f_clean).abs().mean(0)
    ts = float(s.median()) if tau_s is None else float(tau_s)
    quad, strict = classify(rho, gamma, s, tau_rho, ts, strict_r)
    return UnitScores(rho_bal, rho, cls, gamma, r, s, float(tau_rho), ts, quad, strict)


@dataclass
class FeatureScores:
    """Everything the feature dissection computed for one model on one image set.

    Units are the channels of `layers`, concatenated in order (U = Σ channels); `layer_of` (U,)
    and `unit` (U,) locate them. Per-sample tensors are (N, U) on the CPU.
    """

    model_name: str
    layers: list[str]
    channels: list[int]
    bins: list[int]  # depth bin of each layer
    y: Tensor  # (N,)
    num_classes: int
    reference: Reference
    f_clean: Tensor
    f_low: Tensor
    f_high: Tensor
    f_adv: Tensor  # under the model-level PGD (δ*)
    q: Tensor
    phi: Tensor
    scores: UnitScores
    tau_rho_source: str
    candidates: Tensor  # unit indices attacked with feature-targeted PGD
    top_units_per_image: Tensor  # (N, M) by q, stratified
    top_units_per_class: Tensor  # (K, M) by E[q | y = c], stratified
    attacks: list[dict[str, Any]]
    sigma: Tensor | None = None  # (U,) neuron sensitivity σ (Eq. 1) under the model-level PGD
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_of(self) -> Tensor:
        return torch.repeat_interleave(torch.arange(len(self.layers)), torch.tensor(self.channels))

    @property
    def unit(self) -> Tensor:
        return torch.cat([torch.arange(c) for c in self.channels])

    def unit_index(self, layer: str, unit: int) -> int:
        """Position of (layer, unit) in the concatenated unit axis."""
        i = self.layers.index(layer)
        return sum(self.channels[:i]) + int(unit)

    def rows(self) -> list[dict[str, Any]]:
        """One row per unit: layer, unit, bin, ρ, c*, γ, r, s, quadrants, q̄, φ̄, μ, std, σ."""
        sc = self.scores
        layer_of, unit = self.layer_of.tolist(), self.unit.tolist()
        cand = set(self.candidates.tolist())
        q_mean, phi_mean, phi_abs = self.q.mean(0), self.phi.mean(0), self.phi.abs().mean(0)
        out = []
        for i in range(len(layer_of)):
            li = layer_of[i]
            out.append({
                "model": self.model_name, "layer": self.layers[li], "unit": unit[i], "bin": self.bins[li],
                "rho": float(sc.rho[i]), "class": int(sc.cls[i]), "gamma": float(sc.gamma[i]),
                "r": float(sc.r[i]), "s": float(sc.s[i]), "quadrant": sc.quadrant[i],
                "strict_quadrant": sc.strict_quadrant[i], "feature_attacked": i in cand,
                "q_mean": float(q_mean[i]), "phi_mean": float(phi_mean[i]), "phi_abs_mean": float(phi_abs[i]),
                "ref_mean": float(self.reference.mu[i]), "ref_std": float(self.reference.sd[i]),
                "sigma": float(self.sigma[i]) if self.sigma is not None else math.nan,
            })  # fmt: skip
        return out

    def layer_rows(self) -> list[dict[str, Any]]:
        """Per layer: units, quadrant shares (both variants), mean ρ, γ, r, s."""
        sc = self.scores
        layer_of = self.layer_of
        out = []
        for li, name in enumerate(self.layers):
            idx = (layer_of == li).nonzero().squeeze(1)
            row: dict[str, Any] = {"model": self.model_name, "layer": name, "bin": self.bins[li], "units": len(idx)}
            quads = [sc.quadrant[i] for i in idx.tolist()]
            strict = [sc.strict_quadrant[i] for i in idx.tolist()]
            for qd in QUADRANTS:
                row[f"share_{qd}"] = quads.count(qd) / len(quads)
            for qd in ("RU", "NRU"):
                row[f"strict_share_{qd}"] = strict.count(qd) / len(strict)
            r = sc.r[idx]
            row.update(
                rho_mean=float(sc.rho[idx].mean()), gamma_mean=float(sc.gamma[idx].mean()),
                r_median=float(r[torch.isfinite(r)].median()) if bool(torch.isfinite(r).any()) else math.nan,
                s_mean=float(sc.s[idx].mean()),
            )  # fmt: skip
            out.append(row)
        return out

    def reliance(self, strict: bool = False) -> dict[str, float]:
        """Share of the total importance Σ_k E|φ_k| carried by each quadrant's units; the RU entry is
        §6.6's reliance RS with imp_k = E|φ_k|."""
        quads = self.scores.strict_quadrant if strict else self.scores.quadrant
        imp = self.phi.abs().mean(0).double()
        total = float(imp.sum())
        return {qd: float(sum(imp[i] for i, q in enumerate(quads) if q == qd)) / total if total > 0 else math.nan
                for qd in QUADRANTS}  # fmt: skip

    def shares(self, strict: bool = False) -> dict[str, float]:
        """Share of all analysed units in each quadrant."""
        quads = self.scores.strict_quadrant if strict else self.scores.quadrant
        return {qd: quads.count(qd) / len(quads) for qd in QUADRANTS}


class _FeatureObjective:
    """PGD loss for unit k of `layer` aimed at class c: −y_c · a_k(x+δ), y_c = +1 on class c and
    −1 elsewhere (lower the feature on class c, raise it on the others). It reads a_k from a
    forward hook (`capture`) during the same forward that produced the logits. Sign steps are
    invariant to the affine standardisation, so raw a_k serves for f_k."""

    def __init__(self, layer: str, unit: int, cls: int) -> None:
        self.unit, self.cls = int(unit), int(cls)
        self.__name__ = f"feature:{layer}:{self.unit}:class{self.cls}"
        self.value: Tensor | None = None

    def capture(self, _name: str, t: Tensor) -> None:
        self.value = t[:, self.unit].reshape(t.shape[0], -1).mean(1)

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        if self.value is None or self.value.shape[0] != logits.shape[0]:
            raise RuntimeError("the feature hook did not run in this forward pass")
        sign = torch.where(y == self.cls, -1.0, 1.0).to(self.value)
        return sign * self.value


def score_features(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_ref: Tensor,
    layers: Sequence[str],
    options: FeatureOptions | None = None,
    *,
    model_attacks: Sequence[Attack] = (),
    run_attack: AttackRunner | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    model_name: str = "model",
    sigma_fn: Callable[[Tensor], Tensor] | None = None,
) -> FeatureScores:
    """The feature dissection of `model` on images x (N, C, H, W), labels y (N,), reference
    images x_ref (clean training images), the units of `layers`.

    model_attacks: the model-level attacks of the set (the first one is δ* for s; default an
    L-inf PGD-20 and FGSM at options.eps); run_attack(attack, x, y) -> x_adv (default: run the
    attack on `model`); sigma_fn(x_adv of δ*) -> σ (U,) optionally adds σ to the unit table.
    """
    opts = options or FeatureOptions()
    names = list(layers)
    if not names:
        raise UserError("feature scores need at least one layer")
    eps = opts.eps
    runner: AttackRunner = run_attack or (lambda a, xx, yy: a(model, xx, yy).x_adv)
    bs = opts.batch_size
    attacks = list(model_attacks) or [
        PGD(eps, steps=20, step_rule="madry", seed=seed, batch_size=bs),
        FGSM(eps, seed=seed, batch_size=bs),
    ]
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1

    log.info("features: reference statistics on %d training images", x_ref.shape[0])
    ref = reference_statistics(model, x_ref, names, bs, opts.cdf_capacity)
    a_clean, phi = gradient_x_activation(model, x, y, names, bs)
    f_clean = ref.standardise(a_clean)
    with one_thread():
        q = ref.percentile(a_clean)
    f_low, f_high = f_clean.clone(), f_clean.clone()
    described: list[dict[str, Any]] = []
    f_adv = f_clean
    x_star: Tensor | None = None
    for i, attack in enumerate(attacks):
        x_adv = runner(attack, x, y)
        f_a = ref.standardise(responses(model, x_adv, names, bs))
        torch.minimum(f_low, f_a, out=f_low)
        torch.maximum(f_high, f_a, out=f_high)
        if i == 0:
            f_adv, x_star = f_a, x_adv
        described.append({"attack": attack.name, "scope": "model", **_brief(attack)})

    with one_thread():
        tau_rho, source = permutation_threshold(
            f_clean, y, k, opts.permutations, opts.null_quantile, seed, opts.tau_rho_fallback
        )
        pre = score_units(f_clean, f_low, f_high, f_adv, y, k, tau_rho, opts.tau_s, opts.strict_r)
        candidates = stratified_select(pre.rho, ref.channels, opts.candidates_per_bin, opts.depth_bins)
    offsets = [0]
    for c in ref.channels:
        offsets.append(offsets[-1] + c)
    alpha = opts.feature_alpha if opts.feature_alpha is not None else 2.5 * eps / opts.feature_steps
    for u in candidates.tolist():
        li = max(i for i in range(len(names)) if offsets[i] <= u)
        layer, unit, cls = names[li], u - offsets[li], int(pre.cls[u])
        obj = _FeatureObjective(layer, unit, cls)
        for rr in range(opts.restarts):
            attack = PGD(eps, steps=opts.feature_steps, alpha=alpha, loss=obj, keep="last", seed=seed + rr,
                         batch_size=bs)  # fmt: skip
            with record(model, [layer], obj.capture, keep=False, detach=False):
                x_adv = runner(attack, x, y)
            f_u = (responses(model, x_adv, [layer], bs)[:, unit] - ref.mu[u]) / ref.sd[u]
            torch.minimum(f_low[:, u], f_u, out=f_low[:, u])
            torch.maximum(f_high[:, u], f_u, out=f_high[:, u])
        described.append({"attack": obj.__name__, "scope": "unit", "restarts": opts.restarts,
                          **_brief(PGD(eps, steps=opts.feature_steps, alpha=alpha, seed=seed))})  # fmt: skip

    with one_thread():
        scores = score_units(f_clean, f_low, f_high, f_adv, y, k, tau_rho, opts.tau_s, opts.strict_r)
        per_image = stratified_select(q, ref.channels, opts.top_m, opts.depth_bins)
        onehot = torch.nn.functional.one_hot(y.long(), k).to(q.dtype)
        q_class = (onehot.t() @ q) / onehot.sum(0).clamp_min(1)[:, None]  # (K, U)
        per_class = stratified_select(q_class, ref.channels, opts.top_m, opts.depth_bins)
    sigma = sigma_fn(x_star) if sigma_fn is not None and x_star is not None else None
    return FeatureScores(
        model_name=model_name, layers=names, channels=ref.channels,
        bins=depth_bins(len(names), opts.depth_bins), y=y.cpu(), num_classes=k, reference=ref,
        f_clean=f_clean, f_low=f_low, f_high=f_high, f_adv=f_adv, q=q, phi=phi, scores=scores,
        tau_rho_source=source, candidates=candidates, top_units_per_image=per_image,
        top_units_per_class=per_class, attacks=described, sigma=sigma, options=dataclasses.asdict(opts),
    )  # fmt: skip


def _brief(attack: Attack) -> dict[str, Any]:
    d = attack.describe()
    keep = ("eps", "norm", "steps", "alpha", "step_rule", "early_stop", "seed")
    return {k: d[k] for k in keep if k in d}


# --------------------------------------------------------------------------------------------
# bootstrap over images


def bootstrap_shares(
    results: Sequence[FeatureScores],
    resamples: int = 200,
    seed: int = 0,
    strict: bool = False,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """Quadrant shares of each model with percentile intervals from a bootstrap over images
    (the same resampled images for every model, so differences to the first model are paired).
    τ_ρ stays fixed per model; τ_s (median s) is recomputed. One row per model × quadrant."""
    if not results:
        return []
    n = int(results[0].y.shape[0])
    for r in results:
        if r.y.shape[0] != n or not torch.equal(r.y, results[0].y):
            raise UserError("bootstrap_shares needs every model scored on the same images")
    draws = list(torch.from_numpy(resample_indices(n, resamples, seed, generator="torch")))

    def shares(res: FeatureScores, idx: Tensor | None) -> dict[str, float]:
        if idx is None:
            return res.shares(strict)
        sc = score_units(
            res.f_clean[idx], res.f_low[idx], res.f_high[idx], res.f_adv[idx], res.y[idx], res.num_classes,
            res.scores.tau_rho, _fixed_tau_s(res), res.options.get("strict_r", 0.5),
        )  # fmt: skip
        quads = sc.strict_quadrant if strict else sc.quadrant
        return {qd: quads.count(qd) / len(quads) for qd in QUADRANTS}

    with one_thread():
        boot = [[shares(r, d) for d in draws] for r in results]
    rows = []
    for mi, res in enumerate(results):
        point = shares(res, None)
        base = shares(results[0], None)
        for qd in QUADRANTS:
            vals = [b[qd] for b in boot[mi]]
            diff = [b[qd] - b0[qd] for b, b0 in zip(boot[mi], boot[0], strict=True)]
            row: dict[str, Any] = {"model": res.model_name, "quadrant": qd, "share": point[qd],
                                   "importance_share": res.reliance(strict)[qd]}  # fmt: skip
            row.update(dict.fromkeys(("ci_low", "ci_high", "diff_vs_first", "diff_ci_low", "diff_ci_high"), math.nan))
            if resamples:
                row["ci_low"], row["ci_high"] = percentile_interval(vals, level)
                if mi:
                    row["diff_vs_first"] = point[qd] - base[qd]
                    row["diff_ci_low"], row["diff_ci_high"] = percentile_interval(diff, level)
            rows.append(row)
    return rows


def _fixed_tau_s(res: FeatureScores) -> float | None:
    tau = res.options.get("tau_s")
    return None if tau is None else float(tau)


def evaluation_attacks(eopts: EvaluateOptions, eps: float, seed: int) -> list[Attack]:
    """The model-level attack set: the evaluation's L-inf PGD and FGSM under `eopts`, at ε `eps`."""
    if eopts.eps != eps:
        eopts = dataclasses.replace(eopts, eps=eps)
    return [build_attack("pgd-linf", eopts, seed), build_attack("fgsm", eopts, seed)]
