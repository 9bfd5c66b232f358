"""Important neurons of the penultimate layer and their relation to sensitive neurons
(METHODS §5.1 Eqs. 3-6, §5.4 E1 and E3).

E1 `sensitivity_vs_importance`: per target class y, σ over the targeted pairs D̄^y gives Ω^y;
the direct contributions φ = F_{L-1}(x')·W_{·,y} give per-image important neurons Π^y(x') and,
by Borda voting, Γ^y; reported are Spearman(σ ranking, importance ranking) over all n neurons and
S_ω(Γ^y, Ω^y). E3 `cross_target_overlap`: per layer, total Jaccard and average pairwise S_ω of
the sensitive sets Ω_l^y across targets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from ..errors import UserError
from ..models.layers import resolve_layer
from ..modelutil import eval_mode, model_device
from ..probe import Pairs, PairStats, gated, iter_pair_batches, record
from .ranking import (
    Encoding,
    average_pairwise_similarity,
    borda_top_k,
    borda_votes,
    jaccard,
    levenshtein_similarity,
    rank_order,
    spearman,
    total_jaccard,
)
from .sensitivity import (
    Hook,
    Reduction,
    SensitivityResult,
    _default_layers,
    neuron_sensitivity,
    penultimate_k,
    sensitive_neurons,
    top_k_count,
    top_k_indices,
)

__all__ = [
    "ImportanceResult",
    "OverlapResult",
    "TargetImportance",
    "class_important_neurons",
    "contributions",
    "cross_target_overlap",
    "final_linear",
    "importance_scores",
    "important_neurons",
    "sensitivity_vs_importance",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
TieBreak = Literal["mean_phi", "none"]


def final_linear(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The final linear layer (by alias/path, default: the last nn.Linear of the model)."""
    modules = dict(model.named_modules())
    if name is not None:
        path = resolve_layer(model, name)
        module = modules[path]
        if not isinstance(module, nn.Linear):
            raise UserError(f"layer '{name}' is a {type(module).__name__}, not a linear layer")
        return name, module
    linears = [(p, m) for p, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("the model has no linear layer; name the final layer with fc=...")
    return linears[-1]


def contributions(features: torch.Tensor, weight: torch.Tensor, targets: int | torch.Tensor) -> torch.Tensor:
    """Eq. 3: φ[i, m] = F_{L-1}^m(x'_i) · W[y_i, m]; features (N, n), weight (K, n) as in
    nn.Linear, targets an int or (N,) → (N, n)."""
    if features.ndim != 2 or weight.ndim != 2 or features.shape[1] != weight.shape[1]:
        raise UserError(
            f"features {tuple(features.shape)} do not match the final layer's weight "
            f"{tuple(weight.shape)}; the penultimate layer must feed the final linear layer"
        )
    w = weight.to(features.device, features.dtype)
    if isinstance(targets, int):
        return features * w[targets]
    return features * w[targets.to(features.device).long()]


def important_neurons(phi: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 4: per image the k neurons with the largest φ, descending; (N, n) → (N, k) long.
    Ties go to the smaller neuron index."""
    n = phi.shape[1]
    k = min(k, n)
    # stable descending sort keeps the smaller index first among ties
    return torch.sort(phi, dim=1, descending=True, stable=True).indices[:, :k]


def importance_scores(votes: NDArray[Any], mean_phi: NDArray[Any], tie_break: TieBreak = "mean_phi") -> FloatArray:
    """Scores whose descending order is the importance ranking: Borda votes, ties broken by
    mean φ (strict ranking), or the raw votes (ties kept, averaged by Spearman)."""
    v = np.asarray(votes, dtype=np.float64)
    if tie_break == "none":
        return v
    if tie_break != "mean_phi":
        raise UserError(f"tie_break must be 'mean_phi' or 'none', got {tie_break!r}")
    order = rank_order(v, mean_phi)
    scores = np.empty(v.size, dtype=np.float64)
    scores[order] = np.arange(v.size, 0, -1, dtype=np.float64)
    return scores


def class_important_neurons(
    phi: torch.Tensor, k: int, tie_break: TieBreak = "mean_phi"
) -> tuple[IntArray, FloatArray, FloatArray]:
    """Eq. 5 over one adversarial set: φ (N, n) → (Γ (k,), votes (n,), mean φ (n,))."""
    n = phi.shape[1]
    ranks = important_neurons(phi, k).cpu().numpy()
    votes = borda_votes(ranks, n)
    mean_phi = phi.double().mean(0).cpu().numpy() if phi.shape[0] else np.zeros(n)
    gamma = borda_top_k(votes, k, mean_phi if tie_break == "mean_phi" else None)
    return gamma, votes, mean_phi


@dataclass(frozen=True)
class TargetImportance:
    """E1 for one target class: σ, votes per k and mean φ over the n penultimate neurons."""

    target: int
    n_pairs: int
    sigma: FloatArray
    mean_phi: FloatArray
    votes: dict[int, FloatArray]
    omega: dict[int, IntArray]
    gamma: dict[int, IntArray]
    spearman: dict[int, float]
    levenshtein: dict[int, float]


@dataclass(frozen=True)
class ImportanceResult:
    """E1: `rows` (one per target × k), `summary` (one per k) and per-target arrays."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    targets: dict[int, TargetImportance]
    layer: str
    fc: str


def sensitivity_vs_importance(
    model: nn.Module,
    pairs_by_target: Mapping[int, Pairs],
    *,
    layer: str | None = None,
    fc: str | None = None,
    ks: Sequence[int] | None = None,
    sub_cost: int = 2,
    encoding: Encoding = "tokens",
    tie_break: TieBreak = "mean_phi",
    only_success: bool = True,
    batch_size: int = 64,
) -> ImportanceResult:
    """E1 (Figs. 2-3) on the penultimate layer.

    `pairs_by_target[y]` = targeted pairs (x, x', label) towards y (see
    `pairs.targeted_pair_sets`). The penultimate representation is the input of the final
    linear layer `fc` (default: the model's last nn.Linear), or the output of `layer` when
    given (it must have one value per neuron feeding `fc`). `ks`: list sizes (default
    `penultimate_k(n)`; the first k drives nothing special, each k gets its own rows).
    With `only_success`, pairs whose x' is not classified as y are dropped.

    Rows: target, k, n_pairs, spearman (σ vs. Borda importance over all n neurons, average
    ranks for ties), levenshtein (S_ω(Γ, Ω)), jaccard(Γ, Ω), omega, gamma (ids, space-joined).
    """
    fc_name, linear = final_linear(model, fc)
    weight = linear.weight.detach()
    n = weight.shape[1]
    k_list = [penultimate_k(n)] if ks is None else [min(int(k), n) for k in ks]
    if any(k < 1 for k in k_list):
        raise UserError(f"k must be at least 1, got {list(ks or [])}")
    name = layer if layer is not None else fc_name
    capture: Literal["output", "input"] = "output" if layer is not None else "input"
    layer_label = layer if layer is not None else f"{fc_name}:input"
    device = model_device(model)

    targets: dict[int, TargetImportance] = {}
    rows: list[dict[str, Any]] = []
    for target, pairs in pairs_by_target.items():
        t = int(target)
        if not 0 <= t < weight.shape[0]:
            raise UserError(f"target {t} is not a class of the final layer ({weight.shape[0]})")
        stats = PairStats()
        phi_sum = torch.zeros(n, dtype=torch.float64)
        votes = {k: np.zeros(n, dtype=np.float64) for k in k_list}
        n_pairs = 0
        with eval_mode(model), torch.no_grad(), record(model, [name], capture=capture) as rec:
            for x, xa, _ in gated(rec, iter_pair_batches(pairs, batch_size)):
                if x.shape[0] == 0:
                    continue
                h = x.shape[0]
                logits = model(torch.cat([x, xa]).to(device))
                feats = rec.outputs[name].flatten(1)
                if feats.shape[1] != n:
                    raise UserError(
                        f"'{layer_label}' has {feats.shape[1]} values per image but "
                        f"'{fc_name}' takes {n}; choose the layer that feeds it"
                    )
                clean, adv = feats[:h], feats[h:]
                if only_success:
                    ok = logits[h:].argmax(1) == t
                    clean, adv = clean[ok], adv[ok]
                if adv.shape[0] == 0:
                    continue
                stats.update(clean, adv)
                phi = contributions(adv, weight, t)
                phi_sum += phi.double().sum(0).cpu()
                for k in k_list:
                    votes[k] += borda_votes(important_neurons(phi, k).cpu().numpy(), n)
                n_pairs += int(adv.shape[0])
        if n_pairs == 0:
            raise UserError(f"no successful adversarial pairs for target {t}; E1 needs some")
        sigma = stats.sigma().numpy()
        mean_phi = (phi_sum / n_pairs).numpy()
        omega, gamma, rs, lev = {}, {}, {}, {}
        for k in k_list:
            omega[k] = top_k_indices(sigma, k)
            gamma[k] = borda_top_k(votes[k], k, mean_phi if tie_break == "mean_phi" else None)
            rs[k] = spearman(sigma, importance_scores(votes[k], mean_phi, tie_break))
            lev[k] = levenshtein_similarity(gamma[k], omega[k], sub_cost, encoding)
            rows.append(
                {
                    "target": t,
                    "k": k,
                    "n_pairs": n_pairs,
                    "spearman": rs[k],
                    "levenshtein": lev[k],
                    "jaccard": jaccard(gamma[k], omega[k]),
                    "omega": " ".join(map(str, omega[k].tolist())),
                    "gamma": " ".join(map(str, gamma[k].tolist())),
                    "layer": layer_label,
                    "sub_cost": sub_cost,
                    "encoding": encoding,
                }
            )
        targets[t] = TargetImportance(t, n_pairs, sigma, mean_phi, votes, omega, gamma, rs, lev)

    summary: list[dict[str, Any]] = []
    for k in k_list:
        sub = [r for r in rows if r["k"] == k]
        sp = np.array([r["spearman"] for r in sub], dtype=np.float64)
        lv = np.array([r["levenshtein"] for r in sub], dtype=np.float64)
        summary.append(
            {
                "k": k,
                "targets": len(sub),
                "layer": layer_label,
                "spearman_mean": float(np.nanmean(sp)) if np.isfinite(sp).any() else math.nan,
                "spearman_min": float(np.nanmin(sp)) if np.isfinite(sp).any() else math.nan,
                "spearman_max": float(np.nanmax(sp)) if np.isfinite(sp).any() else math.nan,
                "levenshtein_mean": float(lv.mean()) if lv.size else math.nan,
                "levenshtein_min": float(lv.min()) if lv.size else math.nan,
                "levenshtein_max": float(lv.max()) if lv.size else math.nan,
            }
        )
    return ImportanceResult(rows, summary, targets, layer_label, fc_name)


@dataclass(frozen=True)
class OverlapResult:
    """E3: `rows` (one per layer), `omega[layer][target]` and σ results per target."""

    rows: list[dict[str, Any]]
    omega: dict[str, dict[int, IntArray]]
    results: dict[int, SensitivityResult]


def cross_target_overlap(
    model: nn.Module,
    pairs_by_target: Mapping[int, Pairs],
    layers: Sequence[str] | None = None,
    *,
    k: int | None = None,
    fraction: float = 0.1,
    sub_cost: int = 2,
    encoding: Encoding = "tokens",
    hook: Hook = "conv",
    reduction: Reduction = "eq1",
    only_success: bool = True,
    batch_size: int = 64,
) -> OverlapResult:
    """E3 (Fig. 8): per layer (default: every conv hook point) the sensitive sets Ω_l^y of each
    target y (top-k, default 10%), their total Jaccard index (Eq. 10) and the mean pairwise S_ω
    over unordered target pairs (Eq. 9).

    Rows: layer, hook, depth, channels, k, total_jaccard, levenshtein_avg, targets, min_pairs.
    """
    names = _default_layers(model, layers, hook, next(iter(pairs_by_target.values()), None))
    if len(pairs_by_target) < 2:
        raise UserError("cross-target overlap needs at least two targets")
    results: dict[int, SensitivityResult] = {}
    for target, pairs in pairs_by_target.items():
        t = int(target)

        def success(_lc: torch.Tensor, la: torch.Tensor, _y: torch.Tensor | None, t: int = t) -> torch.Tensor:
            return la.argmax(1) == t

        results[t] = neuron_sensitivity(
            model,
            pairs,
            names,
            reduction=reduction,
            batch_size=batch_size,
            select=success if only_success else None,
        )
    omega: dict[str, dict[int, IntArray]] = {name: {} for name in names}
    for t, res in results.items():
        for name, idx in sensitive_neurons(res, k, fraction).items():
            omega[name][t] = idx
    rows: list[dict[str, Any]] = []
    first = next(iter(results.values()))
    for depth, name in enumerate(names, start=1):
        ls = first.layers[name]
        seqs = list(omega[name].values())
        rows.append(
            {
                "layer": name,
                "hook": ls.hook,
                "depth": depth,
                "channels": ls.channels,
                "k": top_k_count(ls.channels, k, fraction),
                "total_jaccard": total_jaccard(seqs),
                "levenshtein_avg": average_pairwise_similarity(seqs, sub_cost, encoding),
                "targets": len(seqs),
                "min_pairs": min(r.n for r in results.values()),
                "sub_cost": sub_cost,
                "encoding": encoding,
            }
        )
    return OverlapResult(rows, omega, results)
