"""Stage `features`: feature-specific dissection (METHODS §6.1–§6.4) — per unit of every analysed
layer the balanced usefulness ρ, the worst-case robust usefulness γ̂ (an upper bound), retention
r, stability s and the four quadrants; quadrant shares per layer and per model (the run's model
beside PAT and SNS for a shipped Fashion-MNIST smallcnn) with bootstrap intervals over images."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

from ..analysis.features import (
    QUADRANT_NAMES,
    QUADRANTS,
    QUICK_FEATURES,
    FeatureOptions,
    FeatureScores,
    bootstrap_shares,
)
from ..config import stage_options
from ..report import plots_features as fplots
from ..runs import SectionArtefacts
from .base import STAGES, Context, section
from .common import feature_scores

log = logging.getLogger(__name__)

IMAGE_ROWS = 20  # images listed in the per-image top-unit table (every image's list is in FeatureScores)


@STAGES.register("features", "feature dissection: usefulness, robust usefulness, stability, four quadrants per unit")
def features_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Scores of every unit of the run's model (and of the comparison checkpoints, on the same
    images and protocol), their tables, figures and the quadrant shift between models."""
    opts: FeatureOptions = stage_options(FeatureOptions, options, "features")
    results, warnings = _score_models(ctx, opts)
    main = results[0]
    artefacts = SectionArtefacts(ctx.run)
    layer_rows = [row for r in results for row in r.layer_rows()]
    boot, boot_strict = _write_tables(ctx, artefacts, results, layer_rows, opts)
    _draw_figures(ctx, artefacts, results, layer_rows, boot)
    shift = _shift_sentences(boot)
    text = _section_text(ctx, main, opts)
    if shift:
        text += " Quadrant shift against " + ctx.label + ": " + "; ".join(shift) + "."
    sc = main.scores
    return section(
        "Features: useful and robust units",
        text=text,
        summary=_summary(main, results, shift),
        tables=artefacts.tables,
        figures=artefacts.figures,
        warnings=warnings,
        options=asdict(opts),
        quadrants=boot,
        quadrants_strict=boot_strict,
        layers=layer_rows,
        tau_rho=sc.tau_rho,
        tau_s=sc.tau_s,
        models=[r.model_name for r in results],
        quadrant_names=QUADRANT_NAMES,
    )


def _score_models(ctx: Context, opts: FeatureOptions) -> tuple[list[FeatureScores], list[str]]:
    """The dissection of the run's model first, then of each comparison model; warnings for
    the comparison models that cannot be used."""
    log.info("features: scoring the units of %s", ctx.label)
    results = [feature_scores(ctx, options=opts, model_name=ctx.label)]
    others, warnings = ctx.comparison_models(opts.compare)
    for name, other in others.items():
        log.info("features: scoring the units of %s", name)
        results.append(feature_scores(ctx, model=other, options=opts, model_name=name))
    return results, list(warnings)


def _write_tables(
    ctx: Context, artefacts: SectionArtefacts, results: list[FeatureScores], layer_rows: list[dict[str, Any]],
    opts: FeatureOptions,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The section's tables; returns the bootstrap quadrant shares per model (plain, strict)."""
    table, main = artefacts.table, results[0]
    unit_rows = [row for r in results for row in r.rows()]
    table("feature_units", unit_rows, "Per unit: ρ, preferred class, γ̂ (upper bound), r, s, quadrant, q̄, φ̄, σ")
    table("feature_layers", layer_rows, "Quadrant shares and mean scores per layer and model", show=True)
    boot = bootstrap_shares(results, opts.bootstrap, seed=ctx.config.seed)
    boot_strict = bootstrap_shares(results, opts.bootstrap, seed=ctx.config.seed, strict=True)
    table("feature_quadrants", boot, "Quadrant shares per model, 95% bootstrap intervals over images", show=True)
    table("feature_quadrants_strict", boot_strict, "The same, strict variant (RU needs r ≥ 0.5)")
    table("feature_top_units_per_class", _top_class_rows(main, ctx.data.classes),
          "Top-activated units per class by mean percentile q (depth-stratified), with their quadrant")  # fmt: skip
    table(
        "feature_top_units_per_image",
        _top_image_rows(main, ctx.data.classes, IMAGE_ROWS),
        f"Top-activated units of the first {IMAGE_ROWS} images by percentile q (depth-stratified), with quadrant",
    )
    return boot, boot_strict


def _draw_figures(
    ctx: Context, artefacts: SectionArtefacts, results: list[FeatureScores], layer_rows: list[dict[str, Any]],
    boot: list[dict[str, Any]],
) -> None:
    """γ̂ against ρ per model, quadrant shares per layer and (with several models) per model."""
    figure, main = artefacts.figure, results[0]
    figure(
        "feature_rho_gamma",
        fplots.plot_rho_gamma(main),
        f"{ctx.label}: γ̂ against ρ per layer; dashed: τ_ρ = {main.scores.tau_rho:.3f} and γ = 0, dotted: "
        "the strict boundary γ = 0.5ρ; ringed: units attacked with feature-targeted PGD",
    )
    for r in results[1:]:
        figure(f"feature_rho_gamma_{_slug(r.model_name)}", fplots.plot_rho_gamma(r), f"{r.model_name}: γ̂ against ρ")
    figure(
        "feature_quadrant_shares",
        fplots.plot_quadrant_shares(layer_rows),
        "Share of each layer's units in each quadrant, per model (RU robust & useful, NRU non-robust & useful, "
        "RL robust & useless, NL non-robust & useless)",
    )
    if len(results) > 1:
        figure(
            "feature_model_shares",
            fplots.plot_model_shares(boot),
            "Share of all analysed units per quadrant and model, 95% bootstrap intervals over images",
        )


def _summary(main: FeatureScores, results: list[FeatureScores], shift: list[str]) -> dict[str, Any]:
    """The section's summary: images, units, thresholds, quadrant shares, reliance on RU units."""
    sc = main.scores
    shares = main.shares()
    summary: dict[str, Any] = {
        "images": int(main.y.shape[0]),
        "units": len(sc.quadrant),
        "τ_ρ": f"{sc.tau_rho:.3f} ({main.tau_rho_source})",
        "τ_s (median s)": round(sc.tau_s, 3),
        **{f"share {q}": round(shares[q], 3) for q in QUADRANTS},
        "feature-attacked units": int(main.candidates.numel()),
    }
    for r in results:
        summary[f"reliance on RU units ({r.model_name})"] = round(r.reliance()["RU"], 3)
    if shift:
        summary["quadrant shift"] = "; ".join(shift)
    return summary


def _section_text(ctx: Context, main: FeatureScores, opts: FeatureOptions) -> str:
    """The section's explanation of the protocol, with this run's settings."""
    eps = opts.eps
    n = int(main.y.shape[0])
    return (
        f"Each unit (channel) of {', '.join(main.layers)} is a feature: its response is the spatial mean of the "
        f"layer output, standardised with μ and s of {main.reference.n} clean training images (f) and ranked by "
        f"its percentile q on the same images. On {n} images: usefulness ρ = max over classes "
        "of the balanced one-vs-rest correlation ½(E[f | y=c] − E[f | y≠c]), preferred class c*; robust "
        "usefulness γ̂ = the same with f replaced per sample by its worst case over the attack set (the clean "
        f"point, model-level PGD-L∞ and FGSM at ε = {eps:g}, and for {int(main.candidates.numel())} candidate "
        f"units chosen by ρ per depth bin a feature-targeted PGD ({opts.feature_steps} steps, {opts.restarts} "
        "restart(s)) that lowers f on class c* and raises it elsewhere). **γ̂ is an upper bound of the true γ**: "
        "a stronger attack can only lower it, so units called robust here may still be brittle. Retention "
        f"r = γ̂/ρ; stability s = E|f(x+δ*) − f(x)| under the model-level PGD ({_pgd_text(main)}). "
        "Quadrants: ρ ≥ τ_ρ (99th "
        f"percentile of max_c ρ under {opts.permutations} label permutations) is useful; useful units are robust "
        "(RU) when γ̂ > 0, else non-robust (NRU, dangerous); useless ones are robust (RL) when s ≤ τ_s (median s), "
        "else noise (NL). Strict variant: RU needs r ≥ 0.5. Intervals: percentile bootstrap over images "
        f"({opts.bootstrap} resamples, the same resamples for every model, so differences are paired; τ_ρ fixed). "
        "Reliance (§6.6): the share of the total importance Σ_k E|φ_k| (gradient × activation of the true "
        "class's logit) carried by each quadrant's units (column importance_share)."
    )


def _top_class_rows(res: FeatureScores, classes: Any) -> list[dict[str, Any]]:
    """Per class, its top-activated units (rank, layer, unit, mean q over the class's images, quadrant)."""
    layer_of, unit = res.layer_of.tolist(), res.unit.tolist()
    onehot_mean = []
    for c in range(res.num_classes):
        mask = res.y == c
        onehot_mean.append(res.q[mask].mean(0) if bool(mask.any()) else res.q.new_full((res.q.shape[1],), math.nan))
    rows = []
    for c in range(res.top_units_per_class.shape[0]):
        for rank, u in enumerate(res.top_units_per_class[c].tolist(), 1):
            rows.append({
                "class": classes[c] if c < len(classes) else c, "rank": rank, "layer": res.layers[layer_of[u]],
                "unit": unit[u], "mean_q": float(onehot_mean[c][u]), "quadrant": res.scores.quadrant[u],
                "preferred_class": int(res.scores.cls[u]),
            })  # fmt: skip
    return rows


def _top_image_rows(res: FeatureScores, classes: Any, images: int) -> list[dict[str, Any]]:
    """Per image of the first `images`, its top-activated units (rank, layer, unit, q, quadrant)."""
    layer_of, unit = res.layer_of.tolist(), res.unit.tolist()
    rows = []
    for i in range(min(images, res.top_units_per_image.shape[0])):
        label = int(res.y[i])
        for rank, u in enumerate(res.top_units_per_image[i].tolist(), 1):
            rows.append({
                "image": i, "label": classes[label] if label < len(classes) else label, "rank": rank,
                "layer": res.layers[layer_of[u]], "unit": unit[u], "q": float(res.q[i, u]),
                "quadrant": res.scores.quadrant[u],
            })  # fmt: skip
    return rows


def _shift_sentences(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per model and quadrant (RU, NRU) with its share and paired difference to the first."""
    out = []
    for r in rows:
        if r["quadrant"] not in ("NRU", "RU") or math.isnan(r["diff_ci_low"]):
            continue
        out.append(
            f"{r['model']} {r['quadrant']} {r['share']:.0%} ({100 * r['diff_vs_first']:+.0f} points, 95% interval "
            f"[{100 * r['diff_ci_low']:+.0f}, {100 * r['diff_ci_high']:+.0f}])"
        )
    return out


def _pgd_text(res: FeatureScores) -> str:
    """The model-level PGD's settings, as the evaluate stage runs it."""
    a = res.attacks[0] if res.attacks else {}
    stop = ", stopped per image at its first misclassifying iterate" if a.get("early_stop") else ""
    return f"{a.get('steps', '?')} steps, α = {a.get('alpha', math.nan):.3g}{stop}; the evaluate stage's settings"


def _slug(name: str) -> str:
    """`name` with every character but letters, digits, '-' and '_' replaced by '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


features_stage.options_class = FeatureOptions  # type: ignore[attr-defined]
features_stage.reduced_options = QUICK_FEATURES  # type: ignore[attr-defined]
