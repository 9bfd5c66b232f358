"""Stage `concepts`: Network Dissection of every analysed unit on generated concept sets (or a
Broden directory, or the user's own concept directory), and the attack × concept join with the
feature quadrants (METHODS §4, §6.6)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..analysis.concepts import (
    ConceptDissection,
    ConceptFragility,
    cached_dissection,
    concept_fragility,
    generated_concepts,
    grad_cam,
    unit_masks,
)
from ..analysis.features import responses, stratified_select
from ..attacks import make_attack
from ..config import parse_budgets, stage_options
from ..data.concepts import (
    HIGH_FREQUENCY,
    ConceptSet,
    concept_dir_identity,
    load_broden,
    load_concept_dir,
)
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
from .base import STAGES, AnalysisUnavailable, Context, section, stage_settings
from .common import feature_scores, model_level_attacks, stage_feature_options

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ConceptsOptions:
    """Defaults: METHODS §4.1 (quantile 0.005, IoU 0.04), §4.3 (100-permutation null, 99th
    percentile), §8.3 "§4" row (generated grayscale / RGB concept sets)."""

    layers: list[str] | None = None  # default: the features' layers (every conv hook point)
    n: int = 2000  # generated concept images
    quantile: float = 0.005  # top share of activations (PNAS: 0.01)
    threshold: str = "streaming"  # or "exact" (torch.quantile of every value)
    quantile_on: str = "raw"  # or "upsampled" (PNAS)
    iou_threshold: float = 0.04
    permutations: int = 100
    null_percentile: float = 0.99
    bins: int = 2048
    foreground: float = 0.1  # garment pixels
    natural_textures: bool = True  # scikit-image's brick, grass, gravel
    broden: str | None = None  # a Broden directory instead of the generated set
    broden_max_images: int | None = None
    concept_dir: str | None = None  # the user's images/, masks/ (label PNGs) and labels.txt|csv
    # attack × concept with the feature quadrants; None: when the run has a features stage (its
    # scores are reused), True: always (scores the features if no stage did)
    join: bool | None = None
    compare: list[str] | None = None  # other checkpoints (None: PAT and SNS beside a shipped smallcnn)
    eps: float = 0.1  # L-inf PGD of the adversarial rows
    steps: int = 10
    figure_concepts: int = 4  # concepts shown with their top unit's images
    top_images: int = 5
    gradcam_images: int = 4
    top_units: int = 5  # units listed beside each Grad-CAM
    batch_size: int = 250

    def __post_init__(self) -> None:
        parse_budgets(self, "eps", maximum=1.0, stage="concepts")
        for name, lo in (("n", 1), ("permutations", 0), ("bins", 2), ("figure_concepts", 0), ("top_images", 1),
                         ("gradcam_images", 0), ("top_units", 1), ("batch_size", 1), ("steps", 1)):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise UserError(f"concepts: {name} must be an integer >= {lo}, got {v!r}")
        if not 0.0 < self.quantile < 1.0:
            raise UserError(f"concepts: quantile must lie in (0, 1), got {self.quantile}")
        if not 0.0 < self.null_percentile < 1.0:
            raise UserError(f"concepts: null_percentile must lie in (0, 1), got {self.null_percentile}")
        if self.threshold not in ("streaming", "exact"):
            raise UserError(f"concepts: threshold must be streaming or exact, got {self.threshold!r}")
        if self.quantile_on not in ("raw", "upsampled"):
            raise UserError(f"concepts: quantile_on must be raw or upsampled, got {self.quantile_on!r}")
        if self.broden and self.concept_dir:
            raise UserError("concepts: give a Broden directory or a concept directory, not both")


QUICK_CONCEPTS: dict[str, Any] = {"n": 500, "gradcam_images": 3, "figure_concepts": 3}


def _concept_set(ctx: Context, opts: ConceptsOptions) -> ConceptSet:
    seed = ctx.config.seed
    if opts.concept_dir:
        folder, shape = opts.concept_dir, ctx.data.image_shape
        key: dict[str, Any] = {"concept_dir": folder, "shape": list(shape), "files": concept_dir_identity(folder)}
        return ctx.store.memo("concept_set", key, lambda: load_concept_dir(folder, shape))
    if opts.broden:
        where = {"broden": opts.broden, "max": opts.broden_max_images, "shape": list(ctx.data.image_shape)}
        return ctx.store.memo(
            "concept_set", where, lambda: load_broden(opts.broden or "", ctx.data.image_shape,
                                                      max_images=opts.broden_max_images),
        )  # fmt: skip
    parts: dict[str, Any] = {"n": opts.n, "data": ctx.data.name, "seed": seed, "foreground": opts.foreground,
                             "natural": opts.natural_textures}  # fmt: skip

    def make() -> ConceptSet:
        return generated_concepts(ctx.data, opts.n, foreground=opts.foreground, natural=opts.natural_textures,
                                  seed=seed)  # fmt: skip

    return ctx.store.memo("concept_set", parts, make)


def _settings(opts: ConceptsOptions, seed: int) -> dict[str, Any]:
    return {"quantile": opts.quantile, "threshold": opts.threshold, "quantile_on": opts.quantile_on,
            "iou_threshold": opts.iou_threshold, "permutations": opts.permutations,
            "null_percentile": opts.null_percentile, "bins": opts.bins, "top_k": opts.top_images,
            "batch_size": opts.batch_size, "seed": seed}  # fmt: skip


def _layers(ctx: Context, opts: ConceptsOptions) -> tuple[bool, Any, list[str]]:
    """(join, the features' options when joined, the dissected layers): `opts.layers`, else the
    features' layers when joined, else every conv hook point."""
    join = opts.join if opts.join is not None else "features" in ctx.config.stages
    fopts = None
    if join and not opts.layers:
        fopts = stage_feature_options(ctx)
    layers = list(opts.layers or (fopts.layers if fopts is not None and fopts.layers else [])) or default_conv_layers(
        ctx.model, "conv", ctx.split.x[:1]
    )
    if not layers:
        raise AnalysisUnavailable("the model has no conv layer with channels that can be hooked once per forward")
    return join, fopts, layers


def stage_dissection(ctx: Context) -> ConceptDissection:
    """The dissection of the run's model exactly as the `concepts` stage of this run computes it
    (its options, profile applied): memoized in the evidence store, so a hit once that stage ran
    in this process (the unit explorer reads labels, IoU and thresholds T_k from it)."""
    opts: ConceptsOptions = stage_settings("concepts", ctx.config)
    cset = _concept_set(ctx, opts)
    layers = _layers(ctx, opts)[2]
    return cached_dissection(ctx.store, ctx.model, cset, layers, **_settings(opts, ctx.config.seed))


@STAGES.register("concepts", "Network Dissection: concept labels of every unit, and which concepts are brittle")
def concepts_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Dissect the analysed layers on the concept set; with `join`, relate each concept's units to
    their feature quadrants for the run's model and the comparison checkpoints."""
    opts: ConceptsOptions = stage_options(ConceptsOptions, options, "concepts")
    run, model, seed = ctx.run, ctx.model, ctx.config.seed
    warnings: list[str] = []
    artefacts = SectionArtefacts(run)
    table, figure = artefacts.table, artefacts.figure
    tables, figures = artefacts.tables, artefacts.figures

    cset = _concept_set(ctx, opts)
    if tuple(cset.images.shape[1:]) != tuple(ctx.data.image_shape):
        raise UserError(f"concept images {tuple(cset.images.shape[1:])} do not match the data {ctx.data.image_shape}")
    warnings += cset.warnings
    join, fopts, layers = _layers(ctx, opts)
    settings = _settings(opts, seed)
    log.info("concepts: dissecting %d layers on %d concept images", len(layers), len(cset))
    diss = cached_dissection(ctx.store, model, cset, layers, **settings)

    table("concept_units", diss.unit_rows(), "Per unit: best concept, IoU, null percentile, p, threshold and bound")
    table("concept_labels", [r for r in diss.concept_rows() if r["detectors"]],
          "Per layer and concept: detector units and their mean IoU")  # fmt: skip
    cat_rows = diss.category_rows()
    table("concept_categories", cat_rows, "Per layer and category: detectors and unique detectors", show=True)
    figure(
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
    data: dict[str, Any] = {"options": asdict(opts), "settings": diss.settings, "categories": cat_rows}

    fragility: list[ConceptFragility] = []
    if join:
        try:
            fragility = _join(ctx, opts, cset, layers, settings, fopts, warnings)
        except AnalysisUnavailable as e:
            warnings.append(f"attack × concept not computed: {e}")
    main_frag = fragility[0] if fragility else None

    # units' top images with masks: the most fragile concepts when joined, else the most frequent
    shown = _figure_concepts(diss, main_frag, opts.figure_concepts)
    if shown:
        panels = _unit_panels(ctx, opts, model, cset, diss, shown)
        figure("concept_top_units", plot_unit_images(panels),
               f"Top-{opts.top_images} concept images of one unit per concept, its region above T_k (top "
               f"{opts.quantile:.1%}); adversarial row: the same images under PGD-L∞ ε = {opts.eps:g}, "
               "masked with the same T_k")  # fmt: skip

    text = (
        f"Network Dissection (Bau et al.) of {len(diss.units)} units of {', '.join(layers)} on {len(cset)} "
        f"{_set_kind(opts)} concept images ({len(cset.concepts)} concepts in "
        f"{', '.join(cset.categories)}). A unit's region is its map upsampled bilinearly and thresholded at its top "
        f"{opts.quantile:.1%} level; IoU is summed over the set; a unit is a detector when its best IoU exceeds "
        f"{opts.iou_threshold:g} and the {opts.null_percentile:.0%} percentile of {opts.permutations} shuffles of "
        "the masks across images (the null matters at 7×7 and 3×3 maps). "
    )
    if fragility:
        frag_units = [u for f in fragility for u in f.units]
        table("concept_fragility_units", frag_units, "Per model and unit: concept, IoU, quadrant, ρ, γ̂, r, s, σ")
        frag_concepts = [r for f in fragility for r in f.concepts]
        frag_cats = [r for f in fragility for r in f.categories]
        enrich = [r for f in fragility for r in f.enrichment]
        table("concept_fragility", frag_concepts, "Per model and concept: fragility mean(1 − r) ± SE, share in NRU")
        table("concept_fragility_categories", frag_cats,
              "Per model and category: fragility mean(1 − r) ± SE, share in NRU (95% Wilson)", show=True)  # fmt: skip
        table("concept_enrichment", enrich,
              "Are NRU (dangerous) units enriched for texture / high-frequency concepts? One-sided Fisher exact",
              show=True)  # fmt: skip
        figure("concept_fragility", plot_fragility(frag_cats, frag_concepts, ctx.label),
               "Concept fragility per category and model (γ̂ is an upper bound of γ, so 1 − r is a lower bound), "
               "share of detectors in the dangerous quadrant, and the most fragile concepts")  # fmt: skip
        data.update(fragility_categories=frag_cats, enrichment=enrich)
        assert main_frag is not None
        worst = main_frag.most_fragile(3)
        data["most_fragile"] = worst
        summary["most fragile concepts"] = ", ".join(f"{r['concept']} ({r['fragility']:.2f})" for r in worst) or None
        text += _answers(main_frag, enrich, worst)
        if opts.gradcam_images:
            try:
                panels_gc = _gradcam_panels(ctx, opts, layers, diss, fopts)
                figure(
                    "concept_gradcam",
                    plot_gradcam(panels_gc),
                    "Grad-CAM of the predicted class (captum LayerGradCam at the last analysed layer) beside the "
                    "concepts and quadrants of the image's top units by percentile q, clean and adversarial",
                )
            except (UserError, RuntimeError) as e:
                warnings.append(f"Grad-CAM figure not drawn: {e}")
    return section("Concepts", text=text, summary=summary, tables=tables, figures=figures, warnings=warnings, **data)


def _set_kind(opts: ConceptsOptions) -> str:
    """How the concept set was made, for the section text."""
    if opts.concept_dir:
        return "user-provided (concept directory)"
    return "Broden" if opts.broden else "generated"


def _answers(main: ConceptFragility, enrich: list[dict[str, Any]], worst: list[dict[str, Any]]) -> str:
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
    return "n/a" if not math.isfinite(v) else f"{v:.0%}"


def _join(
    ctx: Context, opts: ConceptsOptions, cset: ConceptSet, layers: list[str], settings: dict[str, Any],
    fopts: Any, warnings: list[str],
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
    ctx: Context, opts: ConceptsOptions, layers: list[str], diss: ConceptDissection, fopts: Any
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
