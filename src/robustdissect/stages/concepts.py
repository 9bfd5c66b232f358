"""Stage `concepts`: Network Dissection of every analysed unit on generated concept sets (or a
Broden directory, or the user's own concept directory), and the attack × concept join with the
feature quadrants (METHODS §4, §6.6)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ..analysis.concepts import (
    ConceptDissection,
    ConceptFragility,
    cached_dissection,
    concept_fragility,
    grad_cam,
    unit_masks,
)
from ..analysis.features import FeatureOptions, responses, stratified_select
from ..attacks import make_attack
from ..config import stage_options
from ..data.concepts import HIGH_FREQUENCY, ConceptSet
from ..errors import UserError
from ..evaluation import attack_evidence
from ..models import default_conv_layers
from ..modelutil import predict
from ..report.plots_concepts import (
    GradCamPanel,
    UnitPanel,
    plot_fragility,
    plot_gradcam,
    plot_label_counts,
    plot_unit_images,
)
from ..runs import SectionArtefacts
from .base import STAGES, AnalysisUnavailable, Context, section
from .common import (
    ConceptsOptions,
    concept_set,
    dissected_layers,
    dissection_settings,
    feature_scores,
    model_level_attacks,
    stage_feature_options,
)

log = logging.getLogger(__name__)


QUICK_CONCEPTS: dict[str, Any] = {"n": 500, "gradcam_images": 3, "figure_concepts": 3}


@STAGES.register("concepts", "Network Dissection: concept labels of every unit, and which concepts are brittle")
def concepts_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Dissect the analysed layers on the concept set; with `join`, relate each concept's units to
    their feature quadrants for the run's model and the comparison checkpoints."""
    opts: ConceptsOptions = stage_options(ConceptsOptions, options, "concepts")
    warnings: list[str] = []
    art = SectionArtefacts(ctx.run)

    cset = concept_set(ctx, opts)
    if tuple(cset.images.shape[1:]) != tuple(ctx.data.image_shape):
        raise UserError(f"concept images {tuple(cset.images.shape[1:])} do not match the data {ctx.data.image_shape}")
    warnings += cset.warnings
    join, fopts, layers = dissected_layers(ctx, opts)
    settings = dissection_settings(opts, ctx.config.seed)
    log.info("concepts: dissecting %d layers on %d concept images", len(layers), len(cset))
    diss = cached_dissection(ctx.store, ctx.model, cset, layers, **settings)
    summary, cat_rows = _dissection_outputs(ctx, cset, diss, art)
    data: dict[str, Any] = {"options": asdict(opts), "settings": diss.settings, "categories": cat_rows}

    fragility: list[ConceptFragility] = []
    if join:
        try:
            fragility = _join(ctx, opts, cset, layers, settings, fopts, warnings)
        except AnalysisUnavailable as e:
            warnings.append(f"attack × concept not computed: {e}")
    main_frag = fragility[0] if fragility else None
    _top_units_figure(ctx, opts, cset, diss, main_frag, art)

    text = _dissection_text(opts, cset, diss, layers)
    if fragility:
        assert main_frag is not None
        text += _fragility_outputs(ctx, fragility, main_frag, art, summary, data)
        if opts.gradcam_images:
            _gradcam_figure(ctx, opts, layers, diss, fopts, art, warnings)
    return section(
        "Concepts", text=text, summary=summary, tables=art.tables, figures=art.figures, warnings=warnings, **data
    )


def _dissection_outputs(
    ctx: Context, cset: ConceptSet, diss: ConceptDissection, art: SectionArtefacts
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dissection's unit, label and category tables and its detector-count figure; returns the
    section's summary and the category rows."""
    art.table("concept_units", diss.unit_rows(), "Per unit: best concept, IoU, null percentile, p, threshold and bound")
    art.table("concept_labels", [r for r in diss.concept_rows() if r["detectors"]],
              "Per layer and concept: detector units and their mean IoU")  # fmt: skip
    cat_rows = diss.category_rows()
    art.table("concept_categories", cat_rows, "Per layer and category: detectors and unique detectors", show=True)
    art.figure(
        "concept_label_counts",
        plot_label_counts(cat_rows, f"{ctx.label}: concept detectors per layer"),
        "Detector units per layer, stacked by concept category; unique concepts above each bar (NetDissect style)",
    )
    dets = [u for u in diss.units if u.detector]
    summary: dict[str, Any] = {
        "concept images": len(cset),
        "concepts": len(cset.concepts),
        "units": len(diss.units),
        "detectors": len(dets),
        "unique concepts": len({u.label for u in dets}),
    }
    return summary, cat_rows


def _top_units_figure(
    ctx: Context, opts: ConceptsOptions, cset: ConceptSet, diss: ConceptDissection,
    main_frag: ConceptFragility | None, art: SectionArtefacts,
) -> None:  # fmt: skip
    """Units' top images with masks, clean and under PGD: the most fragile concepts when joined,
    else the most frequent."""
    shown = _figure_concepts(diss, main_frag, opts.figure_concepts)
    if not shown:
        return
    panels = _unit_panels(ctx, opts, ctx.model, cset, diss, shown)
    art.figure("concept_top_units", plot_unit_images(panels),
               f"Top-{opts.top_images} concept images of one unit per concept, its region above T_k (top "
               f"{opts.quantile:.1%}); adversarial row: the same images under PGD-L∞ ε = {opts.eps:g}, "
               "masked with the same T_k")  # fmt: skip


def _dissection_text(opts: ConceptsOptions, cset: ConceptSet, diss: ConceptDissection, layers: list[str]) -> str:
    """The section text's account of the dissection: units, concept set, threshold and null."""
    return (
        f"Network Dissection (Bau et al.) of {len(diss.units)} units of {', '.join(layers)} on {len(cset)} "
        f"{_set_kind(opts)} concept images ({len(cset.concepts)} concepts in "
        f"{', '.join(cset.categories)}). A unit's region is its map upsampled bilinearly and thresholded at its top "
        f"{opts.quantile:.1%} level; IoU is summed over the set; a unit is a detector when its best IoU exceeds "
        f"{opts.iou_threshold:g} and the {opts.null_percentile:.0%} percentile of {opts.permutations} shuffles of "
        "the masks across images (the null matters at 7×7 and 3×3 maps). "
    )


def _fragility_outputs(
    ctx: Context, fragility: list[ConceptFragility], main_frag: ConceptFragility, art: SectionArtefacts,
    summary: dict[str, Any], data: dict[str, Any],
) -> str:  # fmt: skip
    """Attack × concept: the fragility and enrichment tables and figure of every joined model; the
    run's model's most fragile concepts into `summary` and `data`; returns the section text's answers."""
    frag_units = [u for f in fragility for u in f.units]
    art.table("concept_fragility_units", frag_units, "Per model and unit: concept, IoU, quadrant, ρ, γ̂, r, s, σ")
    frag_concepts = [r for f in fragility for r in f.concepts]
    frag_cats = [r for f in fragility for r in f.categories]
    enrich = [r for f in fragility for r in f.enrichment]
    art.table("concept_fragility", frag_concepts, "Per model and concept: fragility mean(1 − r) ± SE, share in NRU")
    art.table("concept_fragility_categories", frag_cats,
              "Per model and category: fragility mean(1 − r) ± SE, share in NRU (95% Wilson)", show=True)  # fmt: skip
    art.table("concept_enrichment", enrich,
              "Are NRU (dangerous) units enriched for texture / high-frequency concepts? One-sided Fisher exact",
              show=True)  # fmt: skip
    art.figure("concept_fragility", plot_fragility(frag_cats, frag_concepts, ctx.label),
               "Concept fragility per category and model (γ̂ is an upper bound of γ, so 1 − r is a lower bound), "
               "share of detectors in the dangerous quadrant, and the most fragile concepts")  # fmt: skip
    data.update(fragility_categories=frag_cats, enrichment=enrich)
    worst = main_frag.most_fragile(3)
    data["most_fragile"] = worst
    summary["most fragile concepts"] = ", ".join(f"{r['concept']} ({r['fragility']:.2f})" for r in worst) or None
    return _answers(main_frag, enrich, worst)


def _gradcam_figure(
    ctx: Context, opts: ConceptsOptions, layers: list[str], diss: ConceptDissection, fopts: FeatureOptions | None,
    art: SectionArtefacts, warnings: list[str],
) -> None:  # fmt: skip
    """The Grad-CAM figure of the first analysed images, or a warning why it was not drawn."""
    try:
        panels_gc = _gradcam_panels(ctx, opts, layers, diss, fopts)
        art.figure(
            "concept_gradcam",
            plot_gradcam(panels_gc),
            "Grad-CAM of the predicted class (captum LayerGradCam at the last analysed layer) beside the "
            "concepts and quadrants of the image's top units by percentile q, clean and adversarial",
        )
    except (UserError, RuntimeError) as e:
        warnings.append(f"Grad-CAM figure not drawn: {e}")


def _set_kind(opts: ConceptsOptions) -> str:
    """How the concept set was made, for the section text."""
    if opts.concept_dir:
        return "user-provided (concept directory)"
    return "Broden" if opts.broden else "generated"


def _answers(main: ConceptFragility, enrich: list[dict[str, Any]], worst: list[dict[str, Any]]) -> str:
    """The section text's answers: are the run's model's NRU detectors enriched, which concepts are most fragile."""
    lines = []
    for r in enrich:
        if r["model"] != main.model or r["units"] != "detectors":
            continue
        share_in, share_out = r["nru_share_in_group"], r["nru_share_outside"]
        odds = r["odds_ratio"]
        odds_text = f"odds ratio {odds:.2g}" if math.isfinite(odds) else "odds ratio undefined (an empty cell)"
        lines.append(
            f"{main.model}: {r['nru_in_group']} of {r['nru_in_group'] + r['other_in_group']} {r['concepts']} detectors "
            f"are dangerous (NRU) against {r['nru_outside']} of {r['nru_outside'] + r['other_outside']} other "
            f"detectors ({_pct(share_in)} vs {_pct(share_out)}; {odds_text}, one-sided Fisher "
            f"p = {r['p_value']:.3g})."
        )
    if worst:
        lines.append("Most fragile concepts: " + ", ".join(
            f"{r['concept']} (Frag {r['fragility']:.2f} ± {r['fragility_se']:.2f}, {r['nru']}/{r['units']} in NRU)"
            for r in worst) + ".")  # fmt: skip
    return " ".join(lines)


def _pct(v: float) -> str:
    """A share as a percentage, n/a when undefined."""
    return "n/a" if not math.isfinite(v) else f"{v:.0%}"


def _join(
    ctx: Context, opts: ConceptsOptions, cset: ConceptSet, layers: list[str], settings: dict[str, Any],
    fopts: FeatureOptions | None, warnings: list[str],
) -> list[ConceptFragility]:  # fmt: skip
    """Feature scores (memoized: hits when the features stage ran) and dissection of the run's
    model and the comparison checkpoints, joined per unit."""
    fo = fopts or stage_feature_options(ctx)
    scored = list(fo.layers) if fo.layers else default_conv_layers(ctx.model, "conv", ctx.split.x[:1])
    if scored != layers:
        raise AnalysisUnavailable(f"the features score {', '.join(scored)}, the concepts dissect {', '.join(layers)}")
    models: list[tuple[str, nn.Module]] = [(ctx.label, ctx.model)]
    others, missing = ctx.comparison_models(opts.compare)
    warnings += missing
    models += list(others.items())
    out = []
    for name, m in models:
        log.info("concepts: joining dissection and feature scores of %s", name)
        scores = feature_scores(ctx, model=m, options=fo, model_name=name)
        diss = cached_dissection(ctx.store, m, cset, layers, **settings)
        out.append(concept_fragility(diss, scores.rows(), name, HIGH_FREQUENCY))
    return out


def _figure_concepts(diss: ConceptDissection, frag: ConceptFragility | None, k: int) -> list[tuple[str, int, str]]:
    """(layer, unit, concept) of the highest-IoU detector for up to k concepts."""
    if k == 0:
        return []
    if frag is not None:
        order = [str(r["concept"]) for r in frag.most_fragile(k, min_units=1)]
    else:
        counts: dict[str, int] = {}
        for u in diss.units:
            if u.detector and u.label:
                counts[u.label] = counts.get(u.label, 0) + 1
        order = sorted(counts, key=lambda c: (-counts[c], c))[:k]
    out = []
    for concept in order:
        best = max((u for u in diss.units if u.detector and u.label == concept), key=lambda u: u.iou, default=None)
        if best is not None:
            out.append((best.layer, best.unit, concept))
    return out


def _unit_panels(
    ctx: Context, opts: ConceptsOptions, model: nn.Module, cset: ConceptSet, diss: ConceptDissection,
    shown: list[tuple[str, int, str]],
) -> list[UnitPanel]:  # fmt: skip
    """One panel per shown (layer, unit, concept): its top concept images (K, C, H, W) and masks,
    clean and under PGD-L∞ against the model's own prediction."""
    idx = torch.unique(torch.cat([diss.layers[ly].top_images[u] for ly, u, _ in shown]))
    x = cset.images[idx]
    y = predict(model, x)  # attack the model's own decision (concept images have no class)
    attack = make_attack("pgd-linf", eps=opts.eps, steps=opts.steps, step_rule="paper", seed=ctx.config.seed)
    adv = attack_evidence(ctx.store, model, attack, x, y, idx, split=f"concepts:{cset.identity}").x_adv
    pos = {int(i): k for k, i in enumerate(idx.tolist())}
    panels = []
    for layer, unit, concept in shown:
        ld = diss.layers[layer]
        top = [pos[int(i)] for i in ld.top_images[unit].tolist()]
        thr = float(ld.thresholds[unit])
        _, masks = unit_masks(model, layer, unit, x[top], thr)
        _, masks_adv = unit_masks(model, layer, unit, adv[top], thr)
        c = cset.concepts.index(concept)
        caps = [f"{concept}: {int(cset.concept_mask(c, int(idx[t])).sum())} px" for t in top]
        iou = ld.iou[unit, c].item()
        panels.append(UnitPanel(f"{layer}:{unit} {concept} (IoU {iou:.2f})", x[top], masks, adv[top], masks_adv, caps))
    return panels


def _gradcam_panels(
    ctx: Context, opts: ConceptsOptions, layers: list[str], diss: ConceptDissection, fopts: FeatureOptions | None
) -> list[GradCamPanel]:
    """The first analysed images: Grad-CAM of the predicted class, clean and under the model-level
    PGD the features used (a store hit), with the concepts and quadrants of the top-q units."""

    fo = fopts or stage_feature_options(ctx)
    scores = feature_scores(ctx, options=fo, model_name=ctx.label)
    n = min(opts.gradcam_images, int(scores.y.shape[0]))
    split = ctx.split
    x, y = split.x[: scores.y.shape[0]], split.y[: scores.y.shape[0]]
    pgd = model_level_attacks(ctx, fo.eps)[0]
    x_adv = ctx.attack(pgd, x, y, torch.arange(len(y))).x_adv[:n]
    x, y = x[:n], y[:n]
    model = ctx.model
    pred, pred_adv = predict(model, x), predict(model, x_adv)
    cam, cam_adv = grad_cam(model, layers[-1], x, pred), grad_cam(model, layers[-1], x_adv, pred_adv)
    q_adv = scores.reference.percentile(responses(model, x_adv, scores.layers))
    top_adv = stratified_select(q_adv, scores.channels, max(1, opts.top_units), len(set(scores.bins)))
    top_clean = scores.top_units_per_image[:n]
    quads = scores.scores.quadrant
    layer_of, unit_of = scores.layer_of.tolist(), scores.unit.tolist()
    names = ctx.data.classes

    def lines(units: torch.Tensor, q: torch.Tensor) -> list[str]:
        ranked = sorted(units.tolist(), key=lambda i: -float(q[i]))[: opts.top_units]
        out = []
        for i in ranked:
            layer, unit = scores.layers[layer_of[i]], unit_of[i]
            try:
                u = diss.unit(layer, unit)
                concept = u.label or f"({u.concept})"
            except UserError:
                concept = "?"
            out.append(f"{layer}:{unit} q={float(q[i]):.2f} {concept} {quads[i]}")
        return out

    panels = []
    for i in range(n):
        panels.append(GradCamPanel(
            image=x[i], cam=cam[i], pred=names[int(pred[i])], units=lines(top_clean[i], scores.q[i]),
            image_adv=x_adv[i], cam_adv=cam_adv[i], pred_adv=names[int(pred_adv[i])],
            units_adv=lines(top_adv[i], q_adv[i]), label=names[int(y[i])],
        ))  # fmt: skip
    return panels


concepts_stage.options_class = ConceptsOptions  # type: ignore[attr-defined]
concepts_stage.reduced_options = QUICK_CONCEPTS  # type: ignore[attr-defined]
