"""Neuron sensitivity σ (Eq. 1), sensitivity ratio σ_Ratio (Eq. 11) and the per-layer views of
the neuron-sensitivity paper: sorted profiles with the top-10% line (E6, Figs. 10-12, E13),
mean ratio of the sensitive neurons per layer (E7, Fig. 13), ratio against attack strength
(E8, Fig. 14, Table II) and model comparison (METHODS §5.1, §5.4, §5.5).

Every function returns arrays for figures and `rows()` / `summary_rows()` as lists of dicts
(one CSV row each).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from ..errors import UserError
from ..models.layers import default_conv_layers, resolve_layer
from ..modelutil import predict
from ..parallel import gather_objects, shard, world
from ..probe import Pairs, PairStats, SelectFn, forward_order, probe_pairs
from .pairs import AttackFn, attack_pairs

__all__ = [
    "ComparisonResult",
    "LayerProfile",
    "LayerSensitivity",
    "SensitivityResult",
    "SweepResult",
    "compare_models",
    "hook_kind",
    "mean_ratio_sensitive",
    "neuron_sensitivity",
    "penultimate_k",
    "ratio_sweep",
    "sensitive_neurons",
    "sensitivity_from_stats",
    "sensitivity_under_attack",
    "sigma_profiles",
    "top_k_count",
    "top_k_indices",
]

Reduction = Literal["eq1", "mindarmour"]
Hook = Literal["conv", "relu"]
FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

log = logging.getLogger(__name__)

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.PReLU)
_CONVLIKE = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
)


def _first_images(pairs: Pairs | torch.Tensor | None) -> torch.Tensor | None:
    """The clean images of the first batch of `pairs`, when they can be read without consuming
    an iterator (full tensors or a list of batches); None otherwise."""
    first: object = pairs
    if isinstance(first, (tuple, list)) and first:
        first = first[0]
        if isinstance(first, (tuple, list)) and first:
            first = first[0]
    if isinstance(first, torch.Tensor) and first.ndim > 0 and first.shape[0] > 0:
        return first
    return None


def _default_layers(
    model: nn.Module,
    layers: Sequence[str] | None,
    hook: Hook,
    pairs: Pairs | torch.Tensor | None = None,
) -> list[str]:
    """`layers`, or every conv hook point; layers whose module runs more than once per forward
    pass are left out (with a warning) when `pairs` give an example input to find them."""
    if layers is not None:
        return list(layers)
    if hook not in ("conv", "relu"):
        raise UserError(f"hook must be 'conv' or 'relu', got {hook!r}")
    example = _first_images(pairs)
    names = default_conv_layers(model, hook, example)
    dropped = [] if example is None else [n for n in default_conv_layers(model, hook) if n not in names]
    if dropped:
        log.warning("left out layers whose module runs more than once per forward pass: %s", ", ".join(dropped))
    if not names:
        if dropped:
            raise UserError(
                f"every conv layer of the model runs more than once per forward pass ({', '.join(dropped)}); "
                "name the layers explicitly"
            )
        raise UserError("the model has no conv layers to probe; name the layers explicitly")
    return names


def hook_kind(model: nn.Module, layer: str) -> str:
    """'relu' for activation modules, 'conv' for conv/BN outputs, else the module type in
    lower case (e.g. 'maxpool2d', 'linear')."""
    module = dict(model.named_modules())[resolve_layer(model, layer)]
    if isinstance(module, _ACTIVATIONS):
        return "relu"
    if isinstance(module, _CONVLIKE):
        return "conv"
    return type(module).__name__.lower()


def top_k_count(channels: int, k: int | None = None, fraction: float = 0.1) -> int:
    """k_l: `k` (capped at the channel count) or max(1, round(fraction·C)), rounding halves up."""
    if channels <= 0:
        return 0
    if k is not None:
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        return min(int(k), channels)
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"fraction must lie in (0, 1], got {fraction}")
    return min(channels, max(1, math.floor(fraction * channels + 0.5)))


def penultimate_k(n: int) -> int:
    """k for the penultimate layer scaled from the paper's 20 of 512: max(10, round(20·n/512))."""
    return min(n, max(10, math.floor(20 * n / 512 + 0.5)))


def top_k_indices(values: NDArray[Any], k: int) -> IntArray:
    """Indices of the k largest values, largest first; ties by the smaller index."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.lexsort((np.arange(v.size), -v))
    return order[: max(0, min(k, v.size))].astype(np.int64)


@dataclass(frozen=True)
class LayerSensitivity:
    """σ and σ_Ratio of every neuron (channel) of one layer; arrays are (C,)."""

    layer: str
    path: str
    hook: str
    sigma: FloatArray
    ratio_mean: FloatArray
    ratio_of_sums: FloatArray
    ratio_count: IntArray
    n: int
    dim: int

    @property
    def channels(self) -> int:
        return int(self.sigma.shape[0])


@dataclass(frozen=True)
class SensitivityResult:
    """Per-layer sensitivities over one pair set of `n` pairs."""

    layers: dict[str, LayerSensitivity]
    reduction: str
    n: int
    order: dict[str, int] = field(default_factory=dict)  # module path -> first call in a forward pass

    def sigma(self) -> dict[str, FloatArray]:
        return {name: ls.sigma for name, ls in self.layers.items()}

    def restricted(self, layers: Sequence[str]) -> SensitivityResult:
        """The same result on `layers` only (each must be present)."""
        missing = [name for name in layers if name not in self.layers]
        if missing:
            raise UserError(f"the sensitivities lack the layers {missing}")
        return SensitivityResult({name: self.layers[name] for name in layers}, self.reduction, self.n, self.order)

    def depths(self) -> dict[str, int]:
        """Per layer its depth: rank by the first call in a forward pass among the layers of the
        same hook kind (conv1..conv6 -> 1..6, relu1..relu6 -> 1..6); listing order when the
        forward order is unknown."""
        names = list(self.layers)
        if not all(self.layers[n].path in self.order for n in names):
            return {name: i for i, name in enumerate(names, start=1)}
        out: dict[str, int] = {}
        for hook in dict.fromkeys(ls.hook for ls in self.layers.values()):
            same = [n for n in names if self.layers[n].hook == hook]
            same.sort(key=lambda n: self.order[self.layers[n].path])
            out.update({name: i for i, name in enumerate(same, start=1)})
        return out

    def rows(self, k: int | None = None, fraction: float = 0.1) -> list[dict[str, Any]]:
        """One row per layer × neuron: sigma, ratios, rank by σ (1 = most sensitive), sensitive."""
        out: list[dict[str, Any]] = []
        for name, ls in self.layers.items():
            kk = top_k_count(ls.channels, k, fraction)
            order = top_k_indices(ls.sigma, ls.channels)
            rank = np.empty(ls.channels, dtype=np.int64)
            rank[order] = np.arange(1, ls.channels + 1)
            for m in range(ls.channels):
                out.append(
                    {
                        "layer": name,
                        "hook": ls.hook,
                        "neuron": m,
                        "sigma": float(ls.sigma[m]),
                        "ratio_mean": float(ls.ratio_mean[m]),
                        "ratio_of_sums": float(ls.ratio_of_sums[m]),
                        "ratio_images": int(ls.ratio_count[m]),
                        "rank": int(rank[m]),
                        "sensitive": bool(rank[m] <= kk),
                        "n": ls.n,
                        "reduction": self.reduction,
                    }
                )
        return out

    def summary_rows(self, k: int | None = None, fraction: float = 0.1) -> list[dict[str, Any]]:
        """One row per layer: mean σ overall / of the top-k / of the rest, their ratio (the
        top-10% gap), and the mean σ_Ratio of the sensitive neurons (Fig. 13, Table II)."""
        out: list[dict[str, Any]] = []
        depths = self.depths()
        for name, ls in self.layers.items():
            depth = depths[name]
            kk = top_k_count(ls.channels, k, fraction)
            top = top_k_indices(ls.sigma, kk)
            rest = np.setdiff1d(np.arange(ls.channels), top)
            s_top = float(ls.sigma[top].mean()) if kk else math.nan
            s_rest = float(ls.sigma[rest].mean()) if rest.size else math.nan
            gap = s_top / s_rest if rest.size and s_rest > 0 else math.nan
            out.append(
                {
                    "layer": name,
                    "path": ls.path,
                    "hook": ls.hook,
                    "depth": depth,
                    "channels": ls.channels,
                    "dim": ls.dim,
                    "n": ls.n,
                    "k": kk,
                    "sigma_mean": float(ls.sigma.mean()) if ls.channels else math.nan,
                    "sigma_top_mean": s_top,
                    "sigma_rest_mean": s_rest,
                    "top_gap": gap,
                    "sigma_threshold": float(ls.sigma[top[-1]]) if kk else math.nan,
                    "ratio_mean_sensitive": float(ls.ratio_mean[top].mean()) if kk else math.nan,
                    "ratio_of_sums_sensitive": float(ls.ratio_of_sums[top].mean()) if kk else math.nan,
                    "ratio_mean_all": float(ls.ratio_mean.mean()) if ls.channels else math.nan,
                    "reduction": self.reduction,
                }
            )
        return out


def sensitivity_from_stats(
    model: nn.Module, stats: Mapping[str, PairStats], reduction: Reduction = "eq1"
) -> SensitivityResult:
    """Build the result from (possibly merged, sharded) per-layer `PairStats`."""
    if reduction not in ("eq1", "mindarmour"):
        raise UserError(f"reduction must be 'eq1' or 'mindarmour', got {reduction!r}")
    layers: dict[str, LayerSensitivity] = {}
    n = 0
    for name, st in stats.items():
        sigma = st.sigma() if reduction == "eq1" else st.sigma_mindarmour()
        layers[name] = LayerSensitivity(
            layer=name,
            path=resolve_layer(model, name),
            hook=hook_kind(model, name),
            sigma=sigma.numpy().astype(np.float64),
            ratio_mean=st.ratio_mean().numpy().astype(np.float64),
            ratio_of_sums=st.ratio_of_sums().numpy().astype(np.float64),
            ratio_count=st.ratio_count().numpy().astype(np.int64),
            n=st.n,
            dim=st.dim,
        )
        n = max(n, st.n)
    return SensitivityResult(layers, reduction, n)


def neuron_sensitivity(
    model: nn.Module,
    pairs: Pairs,
    layers: Sequence[str] | None = None,
    *,
    hook: Hook = "conv",
    reduction: Reduction = "eq1",
    batch_size: int = 64,
    select: SelectFn | None = None,
    eps: float = 1e-12,
) -> SensitivityResult:
    """σ (Eq. 1, or MindArmour's |mean difference| with `reduction="mindarmour"`) and σ_Ratio
    (Eq. 11: mean of zero-safe per-image ratios, and ratio of sums) of every neuron of `layers`
    (default: every conv layer at hook point `hook`: "conv" = BN output, "relu" = ReLU output)
    over the dual pairs.

    `pairs`: (x, x_adv[, y]) tensors (N, C, H, W) or an iterable of such batches. All layers are
    reduced during one pass (see `probe.probe_pairs` for `select`); memory does not
    grow with N.
    """
    if reduction not in ("eq1", "mindarmour"):
        raise UserError(f"reduction must be 'eq1' or 'mindarmour', got {reduction!r}")
    names = _default_layers(model, layers, hook, pairs)
    rank, size = world()
    if size > 1 and isinstance(pairs, tuple | list) and all(isinstance(t, torch.Tensor) for t in pairs):
        # under torchrun: each rank reduces its share of the pairs, the sums are merged in rank order
        part = shard(int(pairs[0].shape[0]), rank, size)
        mine = probe_pairs(model, tuple(t[part] for t in pairs), names, batch_size=batch_size, select=select, eps=eps)
        shares = gather_objects(mine)
        stats = {name: PairStats(eps) for name in names}
        for share in shares:
            stats = {name: stats[name].merge(share[name]) for name in names}
    else:
        stats = probe_pairs(model, pairs, names, batch_size=batch_size, select=select, eps=eps)
    result = sensitivity_from_stats(model, stats, reduction)
    if result.n == 0:
        raise UserError("no pairs were given (or none was kept); σ is undefined")
    first = _first_images(pairs)
    if first is not None:
        result = dataclasses.replace(result, order=forward_order(model, first))
    return result


def sensitivity_under_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackFn,
    layers: Sequence[str] | None = None,
    *,
    hook: Hook = "conv",
    reduction: Reduction = "eq1",
    only_success: bool = False,
    batch_size: int = 64,
    seed: int | None = 0,
) -> SensitivityResult:
    """σ over pairs generated on the fly by an untargeted `attack` (streamed batch by batch;
    `only_success` keeps the pairs whose prediction changed)."""
    names = _default_layers(model, layers, hook, x)
    keep: Literal["all", "success"] = "success" if only_success else "all"
    pairs = attack_pairs(model, x, y, attack, keep=keep, batch_size=batch_size, seed=seed)
    return neuron_sensitivity(model, pairs, names, reduction=reduction, batch_size=batch_size)


def sensitivity_of(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackFn | torch.Tensor | SensitivityResult,
    layers: Sequence[str] | None = None,
    *,
    reduction: Reduction = "eq1",
    only_success: bool = False,
    batch_size: int = 64,
    seed: int | None = 0,
) -> SensitivityResult:
    """σ on pairs (x, x'): x' given (a tensor (N, C, H, W), e.g. stored evidence) or generated by
    `attack` on the fly (`sensitivity_under_attack`); an already computed `SensitivityResult` is
    returned restricted to `layers`."""
    if isinstance(attack, SensitivityResult):
        return attack if layers is None else attack.restricted(layers)
    if not isinstance(attack, torch.Tensor):
        return sensitivity_under_attack(
            model, x, y, attack, layers, reduction=reduction, only_success=only_success,
            batch_size=batch_size, seed=seed,
        )  # fmt: skip
    if attack.shape != x.shape:
        raise UserError(f"adversarial images {tuple(attack.shape)} do not match the images {tuple(x.shape)}")
    x_adv = attack
    if only_success:
        keep = predict(model, x_adv, batch_size) != y
        x, x_adv = x[keep], x_adv[keep]
    names = _default_layers(model, layers, "conv", x)
    return neuron_sensitivity(model, (x, x_adv), names, reduction=reduction, batch_size=batch_size)


def sensitive_neurons(
    sigma: SensitivityResult | Mapping[str, NDArray[Any]],
    k: int | None = None,
    fraction: float = 0.1,
) -> dict[str, IntArray]:
    """Eq. 2: per layer the top-k neurons by σ, most sensitive first (ties by smaller index);
    k_l = `k` or max(1, round(fraction·C_l))."""
    values = sigma.sigma() if isinstance(sigma, SensitivityResult) else dict(sigma)
    out: dict[str, IntArray] = {}
    for name, s in values.items():
        arr = np.asarray(s, dtype=np.float64).ravel()
        out[name] = top_k_indices(arr, top_k_count(arr.size, k, fraction))
    return out


@dataclass(frozen=True)
class LayerProfile:
    """σ of every neuron sorted descending (Figs. 10-12): `order` gives the neuron ids,
    `k` the size of the sensitive set and `threshold` the σ at the top-k line."""

    layer: str
    sorted_sigma: FloatArray
    order: IntArray
    k: int
    threshold: float


def sigma_profiles(result: SensitivityResult, k: int | None = None, fraction: float = 0.1) -> dict[str, LayerProfile]:
    """Sorted σ per layer with the top-k (default 10%) line."""
    out: dict[str, LayerProfile] = {}
    for name, ls in result.layers.items():
        order = top_k_indices(ls.sigma, ls.channels)
        kk = top_k_count(ls.channels, k, fraction)
        srt = ls.sigma[order]
        out[name] = LayerProfile(name, srt, order, kk, float(srt[kk - 1]) if kk else math.nan)
    return out


def mean_ratio_sensitive(
    result: SensitivityResult,
    k: int | None = None,
    fraction: float = 0.1,
    sensitive: Mapping[str, Sequence[int] | NDArray[Any]] | None = None,
    which: Literal["mean", "sums"] = "mean",
) -> dict[str, float]:
    """Per layer, the mean σ_Ratio over its sensitive neurons (Fig. 13, Table II). The
    sensitive set is the top-k by this result's σ unless `sensitive` gives it per layer.
    `which="sums"` averages the ratio of sums instead of the mean of per-image ratios."""
    out: dict[str, float] = {}
    sets = sensitive_neurons(result, k, fraction) if sensitive is None else sensitive
    for name, ls in result.layers.items():
        if name not in sets:
            raise UserError(f"no sensitive set given for layer '{name}'")
        idx = np.asarray(sets[name], dtype=np.int64)
        ratio = ls.ratio_mean if which == "mean" else ls.ratio_of_sums
        out[name] = float(ratio[idx].mean()) if idx.size else math.nan
    return out


@dataclass(frozen=True)
class SweepResult:
    """σ_Ratio against perturbation strength: `rows` (one per strength × layer) and the full
    `results` per strength."""

    rows: list[dict[str, Any]]
    results: dict[float, SensitivityResult] = field(default_factory=dict)


def ratio_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Mapping[float, AttackFn | torch.Tensor | SensitivityResult],
    layers: Sequence[str] | None = None,
    *,
    family: str = "",
    k: int | None = None,
    fraction: float = 0.1,
    sensitive: Mapping[str, Sequence[int] | NDArray[Any]] | None = None,
    reduction: Reduction = "eq1",
    batch_size: int = 64,
    seed: int | None = 0,
) -> SweepResult:
    """E7/E8: for each strength (ε, or noise severity) → attack, σ and σ_Ratio of all `layers`
    (name both hook points, e.g. conv10 and relu10, for Table II) and per layer the mean ratio
    over the sensitive neurons (top-k by σ at that strength unless `sensitive` fixes them).
    An attack may be given as its adversarial images (N, C, H, W) or its σ (stored evidence).

    Rows: family, strength, layer, hook, k, ratio_mean_sensitive, ratio_of_sums_sensitive,
    sigma_mean, sigma_top_mean, ... (see `SensitivityResult.summary_rows`).
    """
    rows: list[dict[str, Any]] = []
    results: dict[float, SensitivityResult] = {}
    for strength, attack in attacks.items():
        res = sensitivity_of(model, x, y, attack, layers, reduction=reduction, batch_size=batch_size, seed=seed)
        results[float(strength)] = res
        summary = res.summary_rows(k, fraction)
        if sensitive is not None:
            fixed = mean_ratio_sensitive(res, sensitive=sensitive)
            fixed_sums = mean_ratio_sensitive(res, sensitive=sensitive, which="sums")
            for r in summary:
                r["ratio_mean_sensitive"] = fixed[r["layer"]]
                r["ratio_of_sums_sensitive"] = fixed_sums[r["layer"]]
        for r in summary:
            fixed_set = "given" if sensitive is not None else "top-k"
            rows.append({"family": family, "strength": float(strength), **r,
                         "sensitive_set": fixed_set})  # fmt: skip
    return SweepResult(rows, results)


@dataclass(frozen=True)
class ComparisonResult:
    """Several models under the same attack protocol: neuron rows and layer summary rows with a
    `model` column, and each model's `SensitivityResult`."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    results: dict[str, SensitivityResult]

    def profiles(self, k: int | None = None, fraction: float = 0.1) -> dict[str, dict[str, LayerProfile]]:
        return {m: sigma_profiles(r, k, fraction) for m, r in self.results.items()}


def compare_models(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    attack: AttackFn | Mapping[str, torch.Tensor | SensitivityResult],
    layers: Sequence[str] | None = None,
    *,
    hook: Hook = "conv",
    k: int | None = None,
    fraction: float = 0.1,
    reduction: Reduction = "eq1",
    only_success: bool = False,
    batch_size: int = 64,
    seed: int | None = 0,
) -> ComparisonResult:
    """E6/E13: σ of every neuron of `layers` for each model, each attacked white-box with the
    same `attack` on the same images (e.g. vanilla vs. adversarially trained); `attack` may be
    each model's adversarial images {name: (N, C, H, W)} or σ (stored evidence)."""
    if not models:
        raise UserError("no models given to compare")
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    results: dict[str, SensitivityResult] = {}
    for name, model in models.items():
        res = sensitivity_of(
            model,
            x,
            y,
            attack[name] if isinstance(attack, Mapping) else attack,
            layers,
            reduction=reduction,
            only_success=only_success,
            batch_size=batch_size,
            seed=seed,
        )
        results[name] = res
        rows += [{"model": name, **r} for r in res.rows(k, fraction)]
        summary += [{"model": name, **r} for r in res.summary_rows(k, fraction)]
    return ComparisonResult(rows, summary, results)
