"""Pushing back (METHODS §6.5, §6.6): back-perturbation toward robust features, test-time
purification with an adaptive (BPDA) attacker, the D_bp success criterion and the reliance shift.

B = brittle units (quadrant NRU), R = robust units (RU) of a reference model, with the
standardisation f = (a − μ) / s of `analysis.features` (a = spatial-mean response):

    x_bp = argmin_{‖δ‖ ≤ ε_bp} Σ_{k∈B} (f_k(x+δ) − b_k)² + λ_R·Σ_{k∈R} (f_k(x+δ) − f_k(x))²

Defaults (§6.5, §8.3 "§6"): ℓ∞, ε_bp = 0.1, 50 steps, α = 0.01, λ_R = 1, b_k = 0. The search is the
package's one PGD loop (`PGD.perturb`, the last iterate, no random start) maximising the negative
objective, read from forward hooks on the analysed layers during PGD's own forward passes.

Purification classifies x′ through x′ → x′_bp → model. The adaptive attacker differentiates
through it with BPDA (Athalye et al. 2018): the forward pass purifies, the backward pass treats the
purification as the identity (`Purified`). End-to-end differentiation through the 50 sign steps
would give zero gradient almost everywhere (sign is piecewise constant), so BPDA is the attack
that counts. A defence that holds only against the non-adaptive attacker is reported as such.

D_bp success criterion (§6.5): on the back-perturbed set, |ρ_k| < τ_ρ for k ∈ B while ρ_k for
k ∈ R keeps ≥ 80% of its value on D (ρ_k = max_c ρ^bal_{k,c}, f standardised with the reference
statistics of D).

Reliance shift (§6.6): RS = Σ_{k∈R} imp_k / Σ_k imp_k with two importances: imp_k = mean |φ_k|
(gradient × activation of the feature dissection) and imp_k = the ablation drop of §4.2 — zero
unit k's whole channel, imp_k = max(0, mean over classes c of BA_c(model) − BA_c(model without k)),
BA_c the balanced accuracy of the one-vs-rest decision "argmax = c" (a unit whose removal helps
gets 0). Both come with percentile bootstrap intervals over the images (`reliance_bootstrap`); with
the same seed and images every model draws the same resamples, so differences are paired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import PGD
from ..errors import UserError
from ..modelutil import eval_mode, model_device
from ..probe import record, spatial_reduce, zero_channels
from ..stats import percentile_interval, resample_indices, wilson_interval
from .concepts import _predict_with
from .features import QUADRANTS, FeatureScores, balanced_usefulness, responses


@dataclass(frozen=True)
class UnitSets:
    """The units the back-perturbation acts on: `layers` with `channels` (U = Σ channels, layers
    concatenated in order), brittle and robust unit indices into U, the reference mean μ (U,) and
    std s (U,) of the standardisation, and the targets b (|B|,) of the brittle units."""

    layers: list[str]
    channels: list[int]
    brittle: Tensor
    robust: Tensor
    mu: Tensor
    sd: Tensor
    b: Tensor

    @classmethod
    def from_scores(cls, scores: FeatureScores, strict: bool = False) -> UnitSets:
        """B = NRU and R = RU units of a feature dissection (strict variant: RU needs r ≥ 0.5)."""
        quads = scores.scores.strict_quadrant if strict else scores.scores.quadrant
        brittle = torch.tensor([i for i, q in enumerate(quads) if q == "NRU"], dtype=torch.long)
        robust = torch.tensor([i for i, q in enumerate(quads) if q == "RU"], dtype=torch.long)
        ref = scores.reference
        return cls(list(scores.layers), list(scores.channels), brittle, robust, ref.mu.float(), ref.sd.float(),
                   torch.zeros(len(brittle)))  # fmt: skip

    def standardise(self, a: Tensor) -> Tensor:
        """f = (a − μ) / s; a (N, U) → (N, U)."""
        return (a - self.mu.to(a)) / self.sd.to(a)


class BackObjective:
    """PGD loss (logits, y) → (N,) to maximise: the negative back-perturbation objective of each
    sample, its features read by `capture` (a forward hook on every layer of `sets`) during the
    forward pass that produced the logits. `clean` (N, |R|) holds f_R(x) of the current batch."""

    __name__ = "back-perturbation"

    def __init__(self, sets: UnitSets, lambda_r: float = 1.0) -> None:
        self.sets = sets
        self.lambda_r = float(lambda_r)
        self.acts: dict[str, Tensor] = {}
        self.clean: Tensor | None = None

    def capture(self, name: str, t: Tensor) -> None:
        self.acts[name] = spatial_reduce(t)

    def features(self) -> Tensor:
        """Standardised responses (N, U) of the last forward pass."""
        return self.sets.standardise(torch.cat([self.acts[n] for n in self.sets.layers], 1))

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        del y
        if self.clean is None or any(n not in self.acts for n in self.sets.layers):
            raise RuntimeError("the back-perturbation hooks did not run in this forward pass")
        f = self.features()
        if f.shape[0] != logits.shape[0]:
            raise RuntimeError("the captured features belong to another batch")
        s = self.sets
        loss = ((f[:, s.brittle] - s.b.to(f)) ** 2).sum(1)
        if len(s.robust):
            loss = loss + self.lambda_r * ((f[:, s.robust] - self.clean.to(f)) ** 2).sum(1)
        return -loss


def back_perturb(
    model: nn.Module,
    x: Tensor,
    sets: UnitSets,
    *,
    eps: float = 0.1,
    steps: int = 50,
    alpha: float = 0.01,
    lambda_r: float = 1.0,
    norm: str = "linf",
    batch_size: int = 250,
) -> Tensor:
    """x_bp (N, C, H, W) for images x (N, C, H, W) in [0, 1]: `steps` PGD steps from x (no random
    start) inside B(x, eps) ∩ [0, 1], minimising Σ_B (f − b)² + λ_R Σ_R (f − f(x))². Deterministic.
    Cost: steps forward+backward passes per image (+ one forward for f_R(x))."""
    if len(sets.brittle) == 0 and len(sets.robust) == 0:
        raise UserError("back-perturbation needs at least one brittle or robust unit")
    device = model_device(model, x.device)
    obj = BackObjective(sets, lambda_r)
    pgd = PGD(eps, norm=norm, steps=steps, alpha=alpha, loss=obj, random_start=False, keep="last")
    gen = torch.Generator(device=device)
    out: list[Tensor] = []
    with eval_mode(model):
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].detach().to(device)
            f0 = sets.standardise(responses(model, xb, sets.layers, batch_size).to(device))
            obj.clean = f0[:, sets.robust]
            dummy = torch.zeros(xb.shape[0], dtype=torch.long, device=device)
            with record(model, sets.layers, obj.capture, keep=False, detach=False):
                out.append(pgd.perturb(model, xb, dummy, gen).to(x.device))
    obj.acts.clear()
    return torch.cat(out) if out else x.clone()


class Purified(nn.Module):
    """model(x_bp(x)) with a BPDA backward: the forward pass back-perturbs its input (no gradient
    through the 50 steps), the backward pass treats the purification as the identity, so a
    gradient attack on this module is the adaptive attacker of Athalye et al. (2018)."""

    def __init__(self, model: nn.Module, sets: UnitSets, **settings: Any) -> None:
        super().__init__()
        self.model = model
        self.sets = sets
        self.settings = settings

    def forward(self, x: Tensor) -> Tensor:
        x_bp = back_perturb(self.model, x.detach(), self.sets, **self.settings)
        out: Tensor = self.model(x + (x_bp - x).detach())
        return out


@dataclass
class PurificationResult:
    """Accuracy (with Wilson 95% intervals) on n images: clean and under the model-level attack
    without purification, with purification, and under the adaptive (BPDA) attack on the purified
    model; `verdict` says whether the defence holds only against the non-adaptive attacker."""

    n: int
    clean: float
    clean_purified: float
    attacked: float
    attacked_purified: float
    adaptive: float
    intervals: dict[str, tuple[float, float]]
    verdict: str

    def rows(self) -> list[dict[str, Any]]:
        names = {
            "clean": "clean, no purification", "clean_purified": "clean, purified",
            "attacked": "PGD on the model, no purification",
            "attacked_purified": "PGD on the model, then purified (non-adaptive)",
            "adaptive": "BPDA PGD through the purification (adaptive)",
        }  # fmt: skip
        return [{"setting": names[k], "accuracy": getattr(self, k), "ci_low": self.intervals[k][0],
                 "ci_high": self.intervals[k][1], "n": self.n} for k in names]  # fmt: skip


def _acc(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with eval_mode(model), torch.no_grad():
        return (model(x.to(model_device(model, x.device))).argmax(1).cpu() == y.cpu())


def purification_verdict(attacked: float, attacked_purified: float, adaptive: float, margin: float) -> str:
    """One line: does purification help against the non-adaptive attacker, and does it survive
    the adaptive one (accuracy gains counted only beyond `margin`, e.g. the interval half-width)."""
    helps = attacked_purified > attacked + margin
    survives = adaptive > attacked + margin
    if helps and survives:
        return "purification raises accuracy against both the non-adaptive and the adaptive (BPDA) attacker"
    if helps:
        return ("purification helps only against the non-adaptive attacker; the adaptive (BPDA) attacker "
                "removes the gain")  # fmt: skip
    return "purification does not raise accuracy under attack"


def evaluate_purification(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_adv: Tensor,
    adaptive_attack: PGD,
    sets: UnitSets,
    **settings: Any,
) -> PurificationResult:
    """Accuracy of `model` on clean x (N, C, H, W) and on x_adv (the model-level attack's
    examples), without and with purification, and of the purified model under `adaptive_attack`
    run through `Purified` (BPDA). `settings` go to `back_perturb`."""
    n = int(y.shape[0])
    pur = Purified(model, sets, **settings)
    x_bp = back_perturb(model, x, sets, **settings)
    xa_bp = back_perturb(model, x_adv, sets, **settings)
    counts = {
        "clean": int(_acc(model, x, y).sum()),
        "clean_purified": int(_acc(model, x_bp, y).sum()),
        "attacked": int(_acc(model, x_adv, y).sum()),
        "attacked_purified": int(_acc(model, xa_bp, y).sum()),
        "adaptive": int(adaptive_attack(pur, x, y).correct.sum()),
    }
    acc = {k: v / n for k, v in counts.items()}
    intervals = {k: wilson_interval(v, n) for k, v in counts.items()}
    half = max((h - lo) / 2 for lo, h in intervals.values())
    verdict = purification_verdict(acc["attacked"], acc["attacked_purified"], acc["adaptive"], half)
    return PurificationResult(n, acc["clean"], acc["clean_purified"], acc["attacked"], acc["attacked_purified"],
                              acc["adaptive"], intervals, verdict)  # fmt: skip


@dataclass
class DbpCriterion:
    """The §6.5 success criterion of a back-perturbed set: ρ_k on D and on D_bp for the brittle
    units (B) and robust units (R), the threshold τ_ρ, the share of B with |ρ_k| < τ_ρ on D_bp, the
    share of R keeping ≥ `keep` of ρ_k, and whether both hold for every unit."""

    tau_rho: float
    keep: float
    rho_b: Tensor
    rho_b_bp: Tensor
    rho_r: Tensor
    rho_r_bp: Tensor
    share_b_ok: float
    share_r_ok: float
    holds: bool

    def summary(self) -> str:
        return (
            f"D_bp criterion: {self.share_b_ok:.0%} of {len(self.rho_b)} brittle units with |rho| < tau_rho = "
            f"{self.tau_rho:.3f} (mean |rho| {float(self.rho_b.abs().mean()) if len(self.rho_b) else math.nan:.3f} -> "
            f"{float(self.rho_b_bp.abs().mean()) if len(self.rho_b) else math.nan:.3f}); {self.share_r_ok:.0%} of "
            f"{len(self.rho_r)} robust units keep >= {self.keep:.0%} of rho; "
            f"{'holds' if self.holds else 'does not hold'}"
        )


def rho_max(f: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """ρ_k = max_c ρ^bal_{k,c}; f (N, U), y (N,) → (U,)."""
    return torch.nan_to_num(balanced_usefulness(f, y, num_classes), nan=-math.inf).max(1).values


def dbp_criterion(
    model: nn.Module,
    x: Tensor,
    x_bp: Tensor,
    y: Tensor,
    sets: UnitSets,
    tau_rho: float,
    num_classes: int,
    keep: float = 0.8,
    batch_size: int = 250,
) -> DbpCriterion:
    """The criterion from clean images x and their back-perturbed x_bp (N, C, H, W), labels y (N,),
    with the reference standardisation of `sets`."""
    f = sets.standardise(responses(model, x, sets.layers, batch_size))
    f_bp = sets.standardise(responses(model, x_bp, sets.layers, batch_size))
    rho, rho_bp = rho_max(f, y, num_classes), rho_max(f_bp, y, num_classes)
    b, r = sets.brittle, sets.robust
    b_ok = rho_bp[b].abs() < tau_rho
    r_ok = rho_bp[r] >= keep * rho[r]
    share_b = float(b_ok.float().mean()) if len(b) else math.nan
    share_r = float(r_ok.float().mean()) if len(r) else math.nan
    return DbpCriterion(float(tau_rho), keep, rho[b], rho_bp[b], rho[r], rho_bp[r], share_b, share_r,
                        bool(b_ok.all()) and bool(r_ok.all()))  # fmt: skip


def reliance_shift(importance: Tensor, quadrants: Sequence[str]) -> float:
    """RS = Σ_{k∈R} imp_k / Σ_k imp_k, importance (U,) ≥ 0, quadrants (U,) with R = "RU"."""
    if importance.shape[0] != len(quadrants):
        raise UserError(f"{importance.shape[0]} importances for {len(quadrants)} units")
    total = float(importance.sum())
    if total <= 0:
        return math.nan
    mask = torch.tensor([q == "RU" for q in quadrants])
    return float(importance[mask].sum()) / total


def ablation_predictions(
    model: nn.Module, x: Tensor, layers: Sequence[str], channels: Sequence[int], batch_size: int = 250
) -> Tensor:
    """Predictions (U + 1, N) int64 on images x (N, C, H, W): row 0 the model as it is, row 1 + u
    with unit u (the units of `layers`, `channels` each, concatenated) zeroed over its whole
    feature map (`probe.zero_channels`, the §4.2 ablation of `concepts.unit_ablation`). U + 1
    forward passes over x."""
    rows = [_predict_with(model, x, [], batch_size)]
    for layer, c in zip(layers, channels, strict=True):
        rows += [_predict_with(model, x, [zero_channels(layer, [u])], batch_size) for u in range(c)]
    return torch.stack(rows)


def ba_drop_importance(preds: Tensor, y: Tensor, num_classes: int, weights: Tensor | None = None) -> Tensor:
    """imp_k = max(0, mean_c BA_c(row 0) − BA_c(row 1 + k)) from ablation predictions (U + 1, N) and
    labels y (N,); with `weights` (B, N) (bootstrap counts) one importance vector per row: (B, U),
    else (U,). BA_c = (recall_c + TNR_c) / 2 of "argmax = c" (as `concepts.balanced_accuracy`);
    classes absent from a resample are left out of the mean."""
    w = torch.ones(1, preds.shape[1], dtype=torch.float64) if weights is None else weights.double()
    p = torch.nn.functional.one_hot(preds.long(), num_classes).double()  # (U+1, N, K)
    t = torch.nn.functional.one_hot(y.long(), num_classes).double()  # (N, K)
    pos = w @ t  # (B, K)
    neg = w.sum(1, keepdim=True) - pos
    tp = torch.einsum("bn,unk->buk", w, p * t[None])
    pp = torch.einsum("bn,unk->buk", w, p)
    tn = neg[:, None, :] - (pp - tp)
    ba = 0.5 * (tp / pos[:, None, :] + tn / neg[:, None, :])  # (B, U+1, K), NaN for an absent class
    drop = (ba[:, :1, :] - ba[:, 1:, :]).nanmean(2).clamp_min(0.0)
    return drop[0] if weights is None else drop


def reliance_bootstrap(
    phi: Tensor,
    preds: Tensor,
    y: Tensor,
    quadrants: Sequence[str],
    num_classes: int,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """RS with imp = mean |φ| (φ (N, U)) and imp = ablation BA drop (predictions (U + 1, N), labels
    y (N,)) for the units' `quadrants` (R = "RU"): point estimates `rs_phi`, `rs_ablation` and the
    bootstrap replicates `boot_phi`, `boot_ablation` (resamples,) over the N images (seeded, so
    paired across models scored on the same images)."""
    n = int(y.shape[0])
    if phi.shape[0] != n or preds.shape[1] != n or phi.shape[1] != len(quadrants) or preds.shape[0] != phi.shape[1] + 1:
        raise UserError(f"reliance: shapes do not agree (phi {tuple(phi.shape)}, predictions {tuple(preds.shape)}, "
                        f"{n} labels, {len(quadrants)} units)")  # fmt: skip
    robust = torch.tensor([q == "RU" for q in quadrants])
    imp_phi = phi.abs().double()

    def rs(imp: Tensor) -> Tensor:  # (B, U) -> (B,)
        total = imp.sum(1)
        return torch.where(total > 0, imp[:, robust].sum(1) / total.clamp_min(1e-300), torch.full_like(total, math.nan))

    out: dict[str, Any] = {
        "rs_phi": float(rs(imp_phi.mean(0, keepdim=True))[0]),
        "rs_ablation": float(rs(ba_drop_importance(preds, y, num_classes)[None])[0]),
        "boot_phi": torch.zeros(0, dtype=torch.float64),
        "boot_ablation": torch.zeros(0, dtype=torch.float64),
    }
    if resamples:
        idx = torch.from_numpy(resample_indices(n, resamples, seed, generator="torch"))
        ones = torch.ones(resamples, n, dtype=torch.float64)
        w = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, idx, ones)  # (B, N) counts
        out["boot_phi"] = rs((w @ imp_phi) / n)
        out["boot_ablation"] = torch.cat([rs(ba_drop_importance(preds, y, num_classes, w[s : s + 100]))
                                          for s in range(0, resamples, 100)])  # fmt: skip
    return out


def reliance_rows(estimates: Sequence[tuple[str, dict[str, Any]]], level: float = 0.95) -> list[dict[str, Any]]:
    """One row per model: RS (both importances) with percentile intervals and the paired
    difference to the first model with its interval (NaN without replicates)."""
    rows = []
    first = estimates[0][1] if estimates else {}
    for i, (name, est) in enumerate(estimates):
        row: dict[str, Any] = {"model": name}
        for imp in ("phi", "ablation"):
            boot = est[f"boot_{imp}"]
            lo, hi = percentile_interval(boot, level)
            row.update({f"rs_{imp}": est[f"rs_{imp}"], f"rs_{imp}_lo": lo, f"rs_{imp}_hi": hi})
            if i and len(boot) and len(boot) == len(first[f"boot_{imp}"]):
                dlo, dhi = percentile_interval(boot - first[f"boot_{imp}"], level)
                row.update({f"rs_{imp}_diff": est[f"rs_{imp}"] - first[f"rs_{imp}"], f"rs_{imp}_diff_lo": dlo,
                            f"rs_{imp}_diff_hi": dhi})  # fmt: skip
            else:
                row.update(dict.fromkeys((f"rs_{imp}_diff", f"rs_{imp}_diff_lo", f"rs_{imp}_diff_hi"), math.nan))
        rows.append(row)
    return rows


def reliance_shift_of(scores: FeatureScores) -> dict[str, float]:
    """RS with imp = mean |φ| of a feature dissection, and the quadrant shares."""
    imp = scores.phi.abs().mean(0)
    return {"rs_phi": reliance_shift(imp, scores.scores.quadrant), **scores.shares()}


def transition_matrix(before: Sequence[str], after: Sequence[str]) -> Tensor:
    """Counts (4, 4) of units moving from quadrant i (rows, RU/NRU/RL/NL) to j (columns); meaningful
    only when unit k is the same unit in both models (a fine-tuned model)."""
    if len(before) != len(after):
        raise UserError(f"the models have {len(before)} and {len(after)} analysed units")
    m = torch.zeros(4, 4, dtype=torch.long)
    for a, b in zip(before, after, strict=True):
        m[QUADRANTS.index(a), QUADRANTS.index(b)] += 1
    return m
