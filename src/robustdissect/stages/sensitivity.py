"""Stage `sensitivity`: the experiments of the neuron-sensitivity paper (METHODS §5.4, §8.3) on
any model — σ profiles (E6), error amplification (E7), σ_Ratio against ε at both hook points
(E8), sensitive vs. important neurons (E1), cross-target overlap (E3), suppression (E4), regions
of interest (E2) and model comparison (E6/E13)."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from ..analysis import (
    compare_models,
    cross_target_overlap,
    neuron_sensitivity,
    ratio_sweep,
    regions_of_interest,
    sensitive_neurons,
    sensitivity_vs_importance,
    sigma_profiles,
    suppression_experiment,
    targeted_pair_sets,
)
from ..analysis.sensitivity import SensitivityResult
from ..attacks import Attack, make_attack
from ..attacks.corruptions import noise_scale
from ..config import parse_budgets, stage_options
from ..errors import UserError
from ..evaluation import AttackOutcome
from ..models import default_conv_layers, resolve_layer
from ..models.layers import hook_description, reused_layers
from ..report import plots_sensitivity as splots
from ..runs import SectionArtefacts
from .base import STAGES, AnalysisUnavailable, Context, section

log = logging.getLogger(__name__)

EXPERIMENTS = ("profiles", "amplification", "eps_sweep", "importance", "overlap", "suppression", "roi", "compare")


@dataclass(frozen=True)
class SensitivityOptions:
    """Defaults follow METHODS §5.5 item 4 and §8.3 (Fashion-MNIST scale)."""

    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    layers: list[str] | None = None  # default: every conv hook point (BN output)
    eps: float = 0.1  # untargeted L-inf PGD for σ (paper ε = 8/255 on CIFAR)
    steps: int = 10
    step_rule: str = "paper"  # α = ε/√k, the paper's stated rule; the evaluate stage's default too
    fraction: float = 0.1  # top-10% per layer
    reduction: Literal["eq1", "mindarmour"] = "eq1"
    n: int | None = None  # images (default: the run's n)
    eps_sweep: list[float] = field(default_factory=lambda: [0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20])
    noise_severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    noise_scale: str = "auto"
    importance_n: int = 1000  # images for E1 / E3 (targeted attacks, one set per class)
    importance_ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    sub_cost: int = 2
    suppression_betas: list[float] = field(
        default_factory=lambda: [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5]
    )
    suppression_n: int = 500
    suppression_eps: float = 0.025
    suppression_eps_l2: float = 1.5
    suppression_draws: int = 3
    roi_layer: str = "pool1"
    # other checkpoints to overlay (E6/E13); None: the shipped PAT and SNS models when the run
    # analyses a shipped Fashion-MNIST smallcnn, else none
    compare: list[str] | None = None
    batch_size: int = 250

    def __post_init__(self) -> None:
        parse_budgets(self, "eps", stage="sensitivity")
        unknown = [e for e in self.experiments if e not in EXPERIMENTS]
        if unknown:
            raise UserError(f"unknown sensitivity experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")


# The default run's budgets (`quick: true`); `--full` runs every experiment at the paper's settings.
QUICK_SENSITIVITY: dict[str, Any] = {
    "experiments": ["profiles", "amplification", "eps_sweep", "roi", "compare"],
    "n": 300,
    "eps_sweep": [0.05, 0.1, 0.2],
    "noise_severities": [1, 3, 5],
    "importance_n": 300,
    "importance_ks": [10],
    "suppression_betas": [1.0, 0.9, 0.7, 0.5],
    "suppression_n": 200,
    "suppression_draws": 1,
}


def _pgd(eps: float, opts: SensitivityOptions, seed: int, target: str | None = None) -> Attack:
    """Untargeted (or `target`-ed) L-inf PGD of budget `eps` with the stage's steps and step rule."""
    return make_attack(
        "pgd-linf",
        eps=eps,
        steps=opts.steps,
        step_rule=opts.step_rule,
        seed=seed,
        batch_size=opts.batch_size,
        **({"target": target} if target else {}),
    )


# targeted pair sets of E1 / E3: target class -> [(x, x_adv, y)] batches
PairSets = dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class _Analysis:
    """One run of the stage: images x (N, C, H, W), labels y (N,), their positions index (N,) in
    the analysed split, the hooked conv and ReLU layers and the base PGD outcome on x."""

    ctx: Context
    opts: SensitivityOptions
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    conv_layers: list[str]
    relu_layers: list[str]
    base_out: AttackOutcome

    @property
    def seed(self) -> int:
        """The run's seed."""
        return self.ctx.config.seed

    @property
    def hooked(self) -> list[str]:
        """Every hook point: the conv layers, then the ReLUs."""
        return self.conv_layers + self.relu_layers

    def sigma_under(
        self, eps: float, model: torch.nn.Module | None = None, layers: list[str] | None = None
    ) -> SensitivityResult:
        """σ of `layers` (default every hook point) of `model` under the stage's PGD at `eps` (store hits)."""
        opts = self.opts
        out = self.ctx.attack(_pgd(eps, opts, self.seed), self.x, self.y, self.index, model=model)
        return self.ctx.sensitivity(
            out, self.x, layers or self.hooked, opts.reduction, model=model, batch_size=opts.batch_size
        )


def _analysis(ctx: Context, opts: SensitivityOptions, warnings: list[str]) -> _Analysis:
    """The first `n` analysed images, the hook points (reused modules left out, with a warning)
    and the base PGD outcome on them."""
    split, model = ctx.split, ctx.model
    n = len(split) if opts.n is None else min(opts.n, len(split))
    x, y = split.x[:n], split.y[:n]
    index = torch.arange(n)
    reused = reused_layers(model, x[:1])
    conv_layers = opts.layers or default_conv_layers(model, "conv", x[:1])
    relu_layers = [] if opts.layers else default_conv_layers(model, "relu", x[:1])
    if reused:
        warnings.append(
            f"modules called several times per forward are left out of the analysis: {', '.join(reused)}"
        )
    if not conv_layers:
        raise AnalysisUnavailable("the model has no conv layer with channels that can be hooked once per forward")
    base_out = ctx.attack(_pgd(opts.eps, opts, ctx.config.seed), x, y, index)
    return _Analysis(ctx, opts, x, y, index, conv_layers, relu_layers, base_out)


@STAGES.register("sensitivity", "neuron sensitivity: profiles, amplification, ratio vs eps, importance, overlap, ...")
def sensitivity_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """The experiments in `options.experiments` on the first `n` analysed images; every PGD pair
    set comes from the run's evidence store (one attack per model, ε and image set)."""
    opts: SensitivityOptions = stage_options(SensitivityOptions, options, "sensitivity")
    warnings: list[str] = []
    a = _analysis(ctx, opts, warnings)
    art = SectionArtefacts(ctx.run)
    hook = hook_description(ctx.model, a.conv_layers[0])
    summary: dict[str, Any] = {
        "images": len(a.y),
        "attack": f"PGD-L∞ ε={opts.eps:g}, k={opts.steps}",
        "hook": f"conv ({hook})",
    }
    data: dict[str, Any] = {"options": asdict(opts)}
    want = opts.experiments

    log.info("sensitivity: σ under PGD on %d images", len(a.y))
    base = ctx.sensitivity(a.base_out, a.x, a.hooked, opts.reduction, batch_size=opts.batch_size)
    _sigma_tables(a, base, art, summary, data)  # E6
    if "profiles" in want:
        _profiles(a, base, art)
    _ratio_sweep_outputs(a, _ratio_sweep_rows(a), art, data)  # E7 and E8
    if "importance" in want or "overlap" in want:  # E1 and E3
        pair_sets = _targeted_pairs(a)
        if "importance" in want:
            _importance(a, pair_sets, art, data)
        if "overlap" in want:
            _overlap(a, pair_sets, art, data)
    if "suppression" in want:
        _suppression(a, base, art, data)
    if "roi" in want:
        _roi(a, art)
    if "compare" in want:
        warnings += _compare(a, art)

    return section(
        "Neuron sensitivity",
        text=(
            f"Neuron sensitivity σ (Eq. 1) and σ_Ratio (Eq. 11) of every channel of the conv layers ({hook}) "
            f"and their ReLUs between {len(a.y)} clean images and their PGD-L∞ adversarial twins "
            f"(ε = {opts.eps:g}, k = {opts.steps}). Sensitive neurons are the top {opts.fraction:.0%} per layer."
        ),
        summary=summary,
        tables=art.tables,
        figures=art.figures,
        warnings=warnings,
        **data,
    )


def _sigma_tables(
    a: _Analysis, base: SensitivityResult, art: SectionArtefacts, summary: dict[str, Any], data: dict[str, Any]
) -> None:
    """E6: σ of every neuron at every hook point, and the per-layer summary with its median top-10% gap."""
    fraction = a.opts.fraction
    art.table("sigma", base.rows(fraction=fraction), "σ and σ_Ratio per layer × neuron")
    layer_rows = base.summary_rows(fraction=fraction)
    art.table(
        "sigma_layers", layer_rows, "Per-layer summary: mean σ, top-10% gap, mean ratio of sensitive neurons", True
    )
    data["layers"] = layer_rows
    gaps = [r["top_gap"] for r in layer_rows if r["hook"] == "conv"]
    summary["median top-10% gap (σ top / σ rest)"] = float(torch.tensor(gaps).median()) if gaps else None


def _profiles(a: _Analysis, base: SensitivityResult, art: SectionArtefacts) -> None:
    """E6: the sorted σ profile of every conv layer."""
    profiles = sigma_profiles(base, fraction=a.opts.fraction)
    art.figure(
        "sigma_profiles",
        splots.plot_sigma_profiles({k: v for k, v in profiles.items() if k in a.conv_layers}),
        "σ of every neuron, sorted, per conv layer; dashed line: top 10% (Figs. 10–12)",
    )


def _ratio_sweep_rows(a: _Analysis) -> list[dict[str, Any]]:
    """E7 / E8: σ_Ratio rows under PGD at every swept ε (both hooks) and under Gaussian noise (conv)."""
    opts, ctx, seed = a.opts, a.ctx, a.seed
    model, x, y = ctx.model, a.x, a.y
    rows: list[dict[str, Any]] = []
    if "eps_sweep" in opts.experiments or "amplification" in opts.experiments:
        log.info("sensitivity: ratio sweep over ε %s", opts.eps_sweep)
        attacks = {float(e): a.sigma_under(float(e)) for e in opts.eps_sweep}
        rows += ratio_sweep(
            model, x, y, attacks, a.hooked, family="pgd-linf", fraction=opts.fraction,
            batch_size=opts.batch_size, seed=seed,
        ).rows  # fmt: skip
    if "amplification" in opts.experiments:
        scale = noise_scale(opts.noise_scale, ctx.data.image_shape)
        noises = {
            float(s): ctx.attack(make_attack("gaussian-noise", severity=s, scale=scale, seed=seed), x, y, a.index).x_adv
            for s in opts.noise_severities
        }
        rows += ratio_sweep(
            model, x, y, noises, a.conv_layers, family="gaussian-noise", fraction=opts.fraction,
            batch_size=opts.batch_size, seed=seed,
        ).rows  # fmt: skip
    return rows


def _ratio_sweep_outputs(
    a: _Analysis, sweep_rows: list[dict[str, Any]], art: SectionArtefacts, data: dict[str, Any]
) -> None:
    """E7 / E8: the ratio-sweep table, the amplification and ratio-vs-ε figures and Table II."""
    if not sweep_rows:
        return
    art.table("ratio_sweep", sweep_rows, "σ_Ratio of sensitive neurons per layer × strength (Fig. 13, 14; Table II)")
    conv_rows = [r for r in sweep_rows if r["hook"] == "conv"]
    art.figure(
        "amplification",
        splots.plot_mean_ratio(conv_rows, series=("family", "strength")),
        "Mean σ_Ratio of the top-10% neurons per conv layer, PGD at several ε and Gaussian noise (Fig. 13)",
    )
    pgd_rows = [r for r in sweep_rows if r["family"] == "pgd-linf"]
    if pgd_rows:
        art.figure(
            "ratio_vs_eps",
            splots.plot_ratio_vs_strength(pgd_rows, series=("hook",)),
            "σ_Ratio of sensitive neurons against ε at the conv (BN) and ReLU hook points (Fig. 14, Table II)",
        )
        table2 = _table_ii(pgd_rows)
        art.table("table_ii", table2, "Table II layout: mean σ_Ratio of sensitive neurons, layer × ε", True)
        data["table_ii"] = table2


def _targeted_pairs(a: _Analysis) -> PairSets:
    """E1 / E3: targeted PGD towards every class on the first `importance_n` images."""
    opts = a.opts
    ni = min(opts.importance_n, len(a.y))
    log.info("sensitivity: targeted PGD towards each class on %d images", ni)
    return targeted_pair_sets(
        a.ctx.model, a.x[:ni], a.y[:ni], _pgd(opts.eps, opts, a.seed), batch_size=opts.batch_size, seed=a.seed
    )


def _importance(a: _Analysis, pair_sets: PairSets, art: SectionArtefacts, data: dict[str, Any]) -> None:
    """E1: sensitive vs important neurons per target class (Spearman, Levenshtein)."""
    opts, classes = a.opts, a.ctx.data.classes
    imp = sensitivity_vs_importance(
        a.ctx.model, pair_sets, ks=opts.importance_ks, sub_cost=opts.sub_cost, batch_size=opts.batch_size
    )
    art.table(
        "importance_per_class", imp.rows, "Spearman and Levenshtein similarity per target class (Figs. 2–3)", True
    )
    art.table("importance_summary", imp.summary, "E1 summary per k")
    art.figure(
        "spearman_per_class",
        splots.plot_per_class(imp.rows, "spearman", class_names=classes),
        "Spearman correlation between sensitivity and importance rankings, per class (Fig. 2)",
    )
    art.figure(
        "levenshtein_per_class",
        splots.plot_per_class(imp.rows, "levenshtein", class_names=classes),
        "Levenshtein similarity of the top-k sensitive and important neurons, per class (Fig. 3)",
    )
    data["importance"] = imp.summary


def _overlap(a: _Analysis, pair_sets: PairSets, art: SectionArtefacts, data: dict[str, Any]) -> None:
    """E3: cross-target overlap of the sensitive sets per conv layer."""
    opts = a.opts
    ov = cross_target_overlap(
        a.ctx.model, pair_sets, a.conv_layers, fraction=opts.fraction, sub_cost=opts.sub_cost,
        batch_size=opts.batch_size,
    )  # fmt: skip
    art.table("overlap_by_layer", ov.rows, "Cross-target overlap of sensitive sets per layer (Fig. 8)", True)
    art.figure(
        "overlap_by_layer",
        splots.plot_overlap_by_layer(ov.rows),
        "Total Jaccard index and mean pairwise Levenshtein similarity of sensitive sets across targets (Fig. 8)",
    )
    data["overlap"] = ov.rows


def _suppression(a: _Analysis, base: SensitivityResult, art: SectionArtefacts, data: dict[str, Any]) -> None:
    """E4: accuracy with the top-10% sensitive neurons (post-ReLU) scaled by β vs random ones."""
    opts, seed = a.opts, a.seed
    ns = min(opts.suppression_n, len(a.y))
    log.info("sensitivity: suppression on %d images", ns)
    relu_sigma = {layer: base.layers[layer].sigma for layer in a.relu_layers if layer in base.layers}
    selection = sensitive_neurons(relu_sigma, fraction=opts.fraction)
    scale = noise_scale(opts.noise_scale, a.ctx.data.image_shape)
    sup_attacks = {
        "pgd-linf": _pgd(opts.suppression_eps, opts, seed),
        "pgd-l2": make_attack(
            "pgd-l2", eps=opts.suppression_eps_l2, steps=opts.steps, step_rule=opts.step_rule, seed=seed
        ),
        "fgsm": make_attack("fgsm", eps=opts.suppression_eps, seed=seed),
        "noise-s3": make_attack("gaussian-noise", severity=3, scale=scale, seed=seed),
    }
    sup = suppression_experiment(
        a.ctx.model, a.x[:ns], a.y[:ns], selection, attacks=sup_attacks, betas=opts.suppression_betas,
        draws=opts.suppression_draws, seed=seed, batch_size=opts.batch_size,
    )  # fmt: skip
    art.table("suppression", sup.summary, "Accuracy with sensitive vs random neurons scaled by β (Fig. 9)")
    art.figure(
        "suppression",
        splots.plot_suppression(sup.summary),
        "Suppression: top-10% sensitive neurons (post-ReLU, every conv layer) vs the same number of"
        " random ones (Fig. 9)",
    )
    data["suppression"] = sup.summary


def _roi(a: _Analysis, art: SectionArtefacts) -> None:
    """E2: regions of interest of the most and least sensitive neurons of `roi_layer` (default the
    second conv layer), on the base PGD pairs."""
    model, opts, x = a.ctx.model, a.opts, a.x
    try:
        resolve_layer(model, opts.roi_layer)
        roi_layer = opts.roi_layer
    except UserError:
        roi_layer = a.conv_layers[min(1, len(a.conv_layers) - 1)]
    adv = a.base_out.x_adv
    roi_sigma = neuron_sensitivity(model, (x, adv), [roi_layer], batch_size=opts.batch_size)
    roi = regions_of_interest(model, x, adv, roi_layer, roi_sigma.layers[roi_layer].sigma, batch_size=opts.batch_size)
    art.table("regions_of_interest", roi.rows(),
              "regions of interest per neuron × top image: areas and benign/adversarial IoU")  # fmt: skip
    art.figure(
        "regions_of_interest",
        lambda: splots.plot_roi(roi),
        f"{roi_layer}: 3 most and 3 least sensitive neurons, top-5 images, benign row above"
        " adversarial row (Figs. 4–7)",
    )


def _compare(a: _Analysis, art: SectionArtefacts) -> list[str]:
    """E6 / E13: σ profiles of the other checkpoints on the same protocol; returns the warnings
    for those that cannot be used."""
    ctx, opts, model = a.ctx, a.opts, a.ctx.model
    others, missing = ctx.comparison_models(opts.compare)
    models = {ctx.label: model, **others}
    if len(models) <= 1:
        return missing
    # each model on its own conv layers (the same names when the architectures match)
    advs: dict[str, Any] = {}
    for m, mod in models.items():
        if mod is model:
            advs[m] = a.sigma_under(opts.eps, mod).restricted(a.conv_layers)
        else:
            own = _own_layers(mod, a.conv_layers, a.x[:1])
            advs[m] = a.sigma_under(opts.eps, mod, own).restricted(own)
    comp = compare_models(models, a.x, a.y, advs, None, fraction=opts.fraction, batch_size=opts.batch_size,
                          seed=a.seed)  # fmt: skip
    art.table("compare_layers", comp.summary, "Per-layer σ of each model on the same attack protocol", True)
    art.figure(
        "compare_profiles",
        splots.plot_sigma_profiles(comp.profiles(fraction=opts.fraction)),
        "σ profiles of each model, same attack protocol (Figs. 10–12, 17)",
    )
    return missing


def _own_layers(model: torch.nn.Module, wanted: list[str], example: torch.Tensor) -> list[str]:
    """`wanted` when every name exists in `model`, else the model's own default conv layers
    (`example`: one input (1, C, H, W) to trace them)."""
    try:
        for name in wanted:
            resolve_layer(model, name)
        return wanted
    except UserError:
        own = default_conv_layers(model, "conv", example)
        if not own:
            raise AnalysisUnavailable("a compared model has no conv layer to hook") from None
        return own


sensitivity_stage.options_class = SensitivityOptions  # type: ignore[attr-defined]
sensitivity_stage.reduced_options = QUICK_SENSITIVITY  # type: ignore[attr-defined]


def _table_ii(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pivot ratio-sweep rows into Table II: one row per layer (conv and ReLU), one column per ε."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        row = out.setdefault(r["layer"], {"layer": r["layer"], "hook": r["hook"], "depth": r["depth"]})
        row[f"eps={r['strength']:g}"] = r["ratio_mean_sensitive"]

    def order(r: dict[str, Any]) -> tuple[int, str]:
        digits = re.findall(r"\d+", str(r["layer"]))
        return (int(digits[-1]) if digits else r["depth"], r["hook"])

    return sorted(out.values(), key=order)
