"""Stage `explorer`: the unit explorer, `units.html` in the run directory (linked from
report.html) — every unit the features stage analysed as a sortable, filterable row (layer,
concept and IoU, quadrant, ρ, γ̂, r, s, σ), and per unit its top images with their masks, clean
above adversarial.

It computes no attack and no score: the features' scores come from the evidence store's memo
(a hit once the features stage ran in this process), the attacked images from the store (the
model-level PGD the features used), concept labels, IoU and thresholds T_k from the concepts
stage's dissection (memoized too), σ from the sensitivity stage's table. Its own work is one
forward pass over the units' top images, clean and attacked, and a small PNG per unit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..analysis.concepts import ConceptDissection
from ..analysis.features import (
    QUADRANT_NAMES,
    FeatureScores,
)
from ..config import check_ints, stage_options
from ..errors import UserError
from ..report.explorer import (
    PAGE,
    as_number,
    attach_images,
    build_atlas,
    cell_size,
    explorer_rows,
    map_thresholds,
    mask_png,
    png_uri,
    render_explorer,
    top_images,
    unit_images,
)
from ..runs import read_table
from .base import STAGES, AnalysisUnavailable, Context, section
from .common import feature_scores, model_level_attacks, stage_dissection, stage_feature_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplorerOptions:
    top_images: int = 5  # images per unit, by clean response f
    cell: int = 64  # largest side of an image in the strips (larger images are shrunk)
    scale: int | None = None  # on-screen magnification (None: about 90 px per image)
    quantile: float = 0.005  # T_k for units the dissection does not cover: top share of the map values
    batch_size: int = 250

    def __post_init__(self) -> None:
        check_ints(self, {"top_images": 1, "cell": 4, "batch_size": 1}, "explorer")
        if self.scale is not None and (not isinstance(self.scale, int) or isinstance(self.scale, bool)
                                       or not 1 <= self.scale <= 16):  # fmt: skip
            raise UserError(f"explorer: scale must be an integer in 1..16 or null, got {self.scale!r}")
        if not 0.0 < self.quantile < 1.0:
            raise UserError(f"explorer: quantile must lie in (0, 1), got {self.quantile}")


@STAGES.register("explorer", "unit explorer: units.html, every unit sortable and filterable, images clean vs attacked")
def explorer_stage(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    """Write units.html from the features' scores, the concepts' dissection and the sensitivity
    stage's σ of this run; without a features stage there is nothing to explore."""
    opts: ExplorerOptions = stage_options(ExplorerOptions, options, "explorer")
    if "features" not in ctx.config.stages:
        raise AnalysisUnavailable("the unit explorer shows the features stage's units; this run has no features stage")
    warnings: list[str] = []
    fo = stage_feature_options(ctx)
    scores = feature_scores(ctx, options=fo, model_name=ctx.label)  # the features stage's result
    diss = _concepts_dissection(ctx, warnings)
    sigma = _sensitivity_sigma(ctx)
    sigma_layers = [ly for ly in scores.layers if any(key[0] == ly for key in sigma)]
    rows = explorer_rows(scores, diss, sigma, ctx.data.classes)

    n = int(scores.y.shape[0])
    x, y = ctx.split.x[:n], ctx.split.y[:n]
    pgd = model_level_attacks(ctx, fo.eps)[0]
    outcome = ctx.attack(pgd, x, y, torch.arange(n))  # the features' δ*: a store hit
    thresholds, threshold_text = _thresholds(ctx, scores, diss, x, opts)
    for row, t in zip(rows, thresholds.tolist(), strict=True):
        row["threshold"] = as_number(t)
    units, atlas, (ch, cw), k = _units_with_images(ctx, opts, scores, rows, x, outcome.x_adv, y, thresholds, warnings)

    attack_text = _attack_text(pgd.describe(), fo.eps)
    meta = {
        "title": "Unit explorer", "model": ctx.label, "dataset": ctx.data.name,
        "classes": [str(c) for c in ctx.data.classes], "layers": list(scores.layers), "quadrants": QUADRANT_NAMES,
        "threshold": threshold_text, "attack": attack_text, "cell": [ch, cw],
        "scale": opts.scale or max(1, round(90 / max(ch, cw))), "images": n, "top_images": k,
        "text": _intro(ctx, scores, diss, rows, sigma_layers), "caption": _caption(k, n, threshold_text, attack_text),
        "atlas": atlas,
    }  # fmt: skip
    size = ctx.run.write_text(PAGE, render_explorer(units, meta)).stat().st_size
    return section(
        "Unit explorer",
        text=_section_text(len(rows), k, attack_text),
        summary=_summary(rows, size),
        pages=[{"file": PAGE, "title": "Unit explorer", "caption": f"{len(rows)} units, {size / 1024:.0f} KiB"}],
        warnings=warnings,
        options=asdict(opts),
        bytes=size,
        threshold=threshold_text,
        sigma_layers=sigma_layers,
    )


def _concepts_dissection(ctx: Context, warnings: list[str]) -> ConceptDissection | None:
    """The concepts stage's dissection when the run has that stage (None, with a warning, when it
    cannot run on the model)."""
    if "concepts" not in ctx.config.stages:
        return None
    try:
        return stage_dissection(ctx)
    except AnalysisUnavailable as e:
        warnings.append(f"concept columns left blank: {e}")
        return None


def _units_with_images(
    ctx: Context, opts: ExplorerOptions, scores: FeatureScores, rows: list[dict[str, Any]], x: torch.Tensor,
    x_adv: torch.Tensor, y: torch.Tensor, thresholds: torch.Tensor, warnings: list[str],
) -> tuple[list[dict[str, Any]], dict[str, Any], tuple[int, int], int]:  # fmt: skip
    """Every unit's top images (x, x_adv: (N, C, H, W), y: (N,)) with their masks above T_k
    (thresholds: (U,)): (the rows with images attached, the image atlas, the cell size, images per unit)."""
    log.info("explorer: top-%d images of %d units", opts.top_images, len(rows))
    top = top_images(scores.f_clean, opts.top_images)
    images = unit_images(ctx.model, scores.layers, x, x_adv, top, thresholds, opts.cell, opts.batch_size)
    a_top = scores.f_clean.gather(0, top.t()).t() * scores.reference.sd[:, None] + scores.reference.mu[:, None]
    gap = float((images.response - a_top.double()).abs().max()) if top.numel() else 0.0
    if not gap <= 1e-3 * max(1.0, float(a_top.abs().max()) if top.numel() else 1.0):
        warnings.append(f"the maps' spatial means differ from the features' responses by up to {gap:.3g}")
    ch, cw = cell_size(int(x.shape[2]), int(x.shape[3]), opts.cell)
    atlas = build_atlas(x, x_adv, images, (ch, cw), y.tolist())
    strips = [png_uri(mask_png(images.masks[i], images.masks_adv[i])) for i in range(len(rows))]
    units = attach_images(rows, images, strips, atlas["positions"], scores.f_clean, scores.f_adv)
    return units, atlas, (ch, cw), int(top.shape[1])


def _intro(
    ctx: Context, scores: FeatureScores, diss: ConceptDissection | None, rows: list[dict[str, Any]],
    sigma_layers: list[str],
) -> str:  # fmt: skip
    """The page's introduction: what a row shows and where each column comes from."""
    detectors = sum(1 for r in rows if r["detector"])
    return (
        f"Every unit (channel) of {', '.join(scores.layers)} that the features stage scored on "
        f"{int(scores.y.shape[0])} {ctx.data.name} images: its best concept by Network Dissection and the IoU "
        + ("(blank: no concepts stage in this run)" if diss is None else f"({detectors} detectors)")
        + ", its quadrant (RU robust & useful, NRU non-robust & useful — dangerous, RL robust & useless, NL noise), "
        "usefulness ρ for its class c*, robust usefulness γ̂ (an upper bound of γ), retention r = γ̂/ρ, stability "
        f"s, and σ from the sensitivity stage ({'layers ' + ', '.join(sigma_layers) if sigma_layers else 'none'}). "
        "Click a column to sort it, filter with the controls, click a unit for its top images."
    )


def _caption(k: int, n: int, threshold_text: str, attack_text: str) -> str:
    """The caption of a unit's top-k image strips."""
    return (
        f"Top {k} of the {n} analysed images by the unit's clean response f (standardised spatial mean); "
        f"tinted: where its upsampled map exceeds T ({threshold_text}). Second row: the same images after "
        f"{attack_text}, masked with the same T. Under each: f, the prediction (red when it differs from the label), "
        "the image's position and label, and the region's share of the image."
    )


def _section_text(units: int, k: int, attack_text: str) -> str:
    """The report section's text about the page."""
    return (
        f"The unit explorer, {PAGE}: {units} units as rows (layer, unit, concept and IoU, category, "
        "quadrant, preferred class, ρ, γ̂, r, s, σ), sortable by any column and filterable by layer, quadrant and "
        f"concept; a unit opens its top {k} images with their masks, clean above adversarial "
        f"({attack_text}). "
        "One self-contained file: no network, images inline."
    )


def _summary(rows: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """The section's summary: units, dangerous units, units with a concept or σ, the page's size."""
    return {
        "units": len(rows),
        "dangerous (NRU) units": sum(1 for r in rows if r["quadrant"] == "NRU"),
        "units with a concept": len(rows) - sum(1 for r in rows if r["concept"] is None),
        "units with σ": sum(1 for r in rows if r["sigma"] is not None),
        "page": f"{PAGE} ({size / 1024:.0f} KiB)",
    }


def _sensitivity_sigma(ctx: Context) -> dict[tuple[str, int], float]:
    """σ per (layer, neuron) from the sensitivity stage's table of this run (empty without one)."""
    entry = ctx.run.results().get("stages", {}).get("sensitivity")
    if not isinstance(entry, dict):
        return {}
    files = [t.get("file") for t in entry.get("tables") or [] if isinstance(t, dict)]
    if "tables/sigma.csv" not in files or not (ctx.run.path / "tables" / "sigma.csv").is_file():
        return {}
    sigma: dict[tuple[str, int], float] = {}
    for r in read_table(ctx.run.path / "tables" / "sigma.csv"):
        try:
            sigma[(r["layer"], int(r["neuron"]))] = float(r["sigma"])
        except (KeyError, ValueError):
            continue
    return sigma


def _thresholds(
    ctx: Context, scores: FeatureScores, diss: ConceptDissection | None, x: torch.Tensor, opts: ExplorerOptions
) -> tuple[torch.Tensor, str]:
    """T_k of every analysed unit (U,): the dissection's where it covers the layer, else the same
    rule on the analysed clean images (memoized); and a sentence saying which."""
    per_layer: dict[str, torch.Tensor] = {}
    if diss is not None:
        for layer, c in zip(scores.layers, scores.channels, strict=True):
            ld = diss.layers.get(layer)
            if ld is not None and ld.thresholds.numel() == c:
                per_layer[layer] = ld.thresholds.double().cpu()
    missing = [ly for ly in scores.layers if ly not in per_layer]
    texts = []
    if per_layer and diss is not None:
        s = diss.settings
        texts.append(
            f"the concept dissection's T_k, the top {float(s['quantile']):.1%} of the unit's activations over "
            f"{s['images']} concept images"
            + ("" if not missing else f" ({', '.join(ly for ly in scores.layers if ly in per_layer)})")
        )
    if missing:
        parts = {"model": ctx.store.model_hash(ctx.model), "images": ctx.images_id, "n": int(x.shape[0]),
                 "layers": missing, "quantile": opts.quantile}  # fmt: skip
        fallback = ctx.store.memo(
            "unit_thresholds", parts,
            lambda: map_thresholds(ctx.model, missing, x, opts.quantile, batch_size=opts.batch_size),
        )  # fmt: skip
        start = 0
        for layer, c in zip(scores.layers, scores.channels, strict=True):
            if layer in missing:
                per_layer[layer] = fallback[start : start + c]
                start += c
        texts.append(
            f"the top {opts.quantile:.1%} of the unit's activations over the {int(x.shape[0])} analysed clean images"
            + (f" ({', '.join(missing)}: not dissected)" if per_layer and len(missing) < len(scores.layers) else "")
        )
    return torch.cat([per_layer[ly] for ly in scores.layers]), "; ".join(texts)


def _attack_text(d: dict[str, Any], eps: float) -> str:
    """The attack of the adversarial rows in words, from its `describe()` and ε."""
    alpha = d.get("alpha")
    stop = ", stopped per image at its first misclassifying iterate" if d.get("early_stop") else ""
    a = f", α = {alpha:.3g}" if isinstance(alpha, int | float) and math.isfinite(alpha) else ""
    return f"the run's PGD-L∞ (ε = {eps:g}, {d.get('steps', '?')} steps{a}{stop})"


explorer_stage.options_class = ExplorerOptions  # type: ignore[attr-defined]
