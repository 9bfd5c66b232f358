"""Figures of the concept dissection (object-oriented matplotlib; each returns a Figure): label
counts per category and layer (NetDissect style), units' top images with their masks (clean row
above adversarial row), concept fragility bars per model, Grad-CAM beside the concepts and
quadrants of an image's top units."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["GradCamPanel", "UnitPanel", "plot_fragility", "plot_gradcam", "plot_label_counts", "plot_unit_images"]

Rows = Sequence[Mapping[str, Any]]
_QUAD_COLOURS = {"RU": "#2a9d8f", "NRU": "#e63946", "RL": "#8d99ae", "NL": "#f4a261"}


def _rgb(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) array for imshow."""
    a = img.detach().float().cpu().clamp(0, 1)
    a = a.expand(3, -1, -1) if a.shape[0] == 1 else a[:3]
    out: np.ndarray = a.permute(1, 2, 0).numpy()
    return out


def plot_label_counts(category_rows: Rows, title: str = "") -> Figure:
    """Detectors per layer, stacked by concept category; unique detectors printed above each bar."""
    layers = list(dict.fromkeys(str(r["layer"]) for r in category_rows))
    cats = list(dict.fromkeys(str(r["category"]) for r in category_rows))
    fig = Figure(figsize=(max(5.0, 1.0 * len(layers) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(layers))
    for cat in cats:
        vals = np.array([
            sum(int(r["detectors"]) for r in category_rows if r["layer"] == ly and r["category"] == cat)
            for ly in layers
        ])  # fmt: skip
        ax.bar(layers, vals, bottom=bottom, label=cat)
        bottom += vals
    for i, ly in enumerate(layers):
        uniq = sum(int(r["unique_detectors"]) for r in category_rows if r["layer"] == ly)
        units = max((int(r["units"]) for r in category_rows if r["layer"] == ly), default=0)
        ax.text(i, bottom[i], f"{uniq} unique\nof {units}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("detector units (IoU > 0.04, above null)")
    ax.set_ylim(0, max(1.0, float(bottom.max()) * 1.3))
    ax.legend(fontsize=8, ncols=2)
    ax.set_title(title or "Concept detectors per layer and category", fontsize=10)
    return fig


@dataclass(frozen=True)
class UnitPanel:
    """One unit's row(s): images (T, C, H, W) and masks (T, H, W); optional adversarial ones."""

    title: str
    images: torch.Tensor
    masks: torch.Tensor
    images_adv: torch.Tensor | None = None
    masks_adv: torch.Tensor | None = None
    captions: Sequence[str] = ()
    captions_adv: Sequence[str] = ()


def _overlay(ax: Any, img: torch.Tensor, mask: torch.Tensor) -> None:
    ax.imshow(_rgb(img), interpolation="nearest")
    m = mask.detach().cpu().numpy().astype(float)
    ax.imshow(np.ma.masked_where(m == 0, m), cmap="autumn", alpha=0.55, vmin=0, vmax=1, interpolation="nearest")
    if m.any():
        ax.contour(m, levels=[0.5], colors="yellow", linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_unit_images(panels: Sequence[UnitPanel]) -> Figure:
    """Per unit, its top images with the thresholded region; the adversarial row under the clean one."""
    rows: list[tuple[str, torch.Tensor, torch.Tensor, Sequence[str]]] = []
    for p in panels:
        rows.append((f"{p.title} (clean)", p.images, p.masks, p.captions))
        if p.images_adv is not None and p.masks_adv is not None:
            rows.append((f"{p.title} (adversarial)", p.images_adv, p.masks_adv, p.captions_adv))
    ncols = max((int(r[1].shape[0]) for r in rows), default=1)
    fig = Figure(figsize=(1.6 * ncols + 0.4, 1.75 * max(1, len(rows))), layout="constrained")
    axes = np.asarray(fig.subplots(max(1, len(rows)), ncols, squeeze=False))
    for i, (title, imgs, masks, caps) in enumerate(rows):
        for j in range(ncols):
            ax = axes[i, j]
            if j >= imgs.shape[0]:
                ax.set_visible(False)
                continue
            _overlay(ax, imgs[j], masks[j])
            if j < len(caps):
                ax.set_xlabel(caps[j], fontsize=6)
        axes[i, 0].set_title(title, fontsize=7, loc="left")
    return fig


def plot_fragility(category_rows: Rows, concept_rows: Rows, main_model: str, top: int = 12) -> Figure:
    """Left: Frag = mean(1 − r) per concept category and model (± SE); middle: the share of the
    category's detectors in NRU (95% Wilson); right: the `top` most fragile concepts of the main model."""
    models = list(dict.fromkeys(str(r["model"]) for r in category_rows))
    cats = sorted({str(r["category"]) for r in category_rows})
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_f, ax_n, ax_c = fig.subplots(1, 3)
    width = 0.8 / max(1, len(models))
    x = np.arange(len(cats))
    for i, m in enumerate(models):
        by = {str(r["category"]): r for r in category_rows if r["model"] == m}
        frag = [float(by[c]["fragility"]) if c in by else np.nan for c in cats]
        se = [float(by[c]["fragility_se"]) if c in by else np.nan for c in cats]
        share = [float(by[c]["nru_share"]) if c in by else np.nan for c in cats]
        # Wilson bounds rounded at 0 / 1 can sit a hair inside the share: clamp the bar lengths
        lo = [max(0.0, share[k] - float(by[c]["nru_low"])) if c in by else 0.0 for k, c in enumerate(cats)]
        hi = [max(0.0, float(by[c]["nru_high"]) - share[k]) if c in by else 0.0 for k, c in enumerate(cats)]
        ax_f.bar(x + i * width, frag, width, yerr=np.abs(np.nan_to_num(se)), label=m, capsize=2)
        ax_n.bar(x + i * width, share, width, yerr=[lo, hi], label=m, capsize=2)
    for ax, lab in ((ax_f, "fragility: mean (1 − r) of detectors"), (ax_n, "share of detectors in NRU")):
        ax.set_xticks(x + width * (len(models) - 1) / 2, cats, fontsize=8)
        ax.set_ylabel(lab, fontsize=8)
        ax.legend(fontsize=7)
    ax_n.set_ylim(0, 1)
    main = [r for r in concept_rows if r["model"] == main_model and r["fragility"] == r["fragility"]]
    main = sorted(main, key=lambda r: -float(r["fragility"]))[:top][::-1]
    ax_c.barh(
        [f"{r['concept']} ({r['units']})" for r in main],
        [float(r["fragility"]) for r in main],
        xerr=[abs(float(np.nan_to_num(r["fragility_se"]))) for r in main],
        color=["#e63946" if float(r["nru_share"]) >= 0.5 else "#457b9d" for r in main],
    )
    ax_c.tick_params(axis="y", labelsize=7)
    ax_c.set_xlabel(f"{main_model}: fragility per concept (units); red: ≥ half in NRU", fontsize=8)
    return fig


@dataclass(frozen=True)
class GradCamPanel:
    """One analysed image: clean / adversarial image (C, H, W), Grad-CAM maps (H, W), predicted
    class names and the lines describing the top units (concept, quadrant)."""

    image: torch.Tensor
    cam: torch.Tensor
    pred: str
    units: Sequence[str]
    image_adv: torch.Tensor
    cam_adv: torch.Tensor
    pred_adv: str
    units_adv: Sequence[str]
    label: str


def plot_gradcam(panels: Sequence[GradCamPanel]) -> Figure:
    """Per image: Grad-CAM of the predicted class over the clean image beside its top units'
    concepts and quadrants, then the same for the adversarial image."""
    n = max(1, len(panels))
    fig = Figure(figsize=(12, 2.3 * n), layout="constrained")
    axes = np.asarray(fig.subplots(n, 4, squeeze=False, gridspec_kw={"width_ratios": [1, 1.6, 1, 1.6]}))
    for i, p in enumerate(panels):
        for j, (img, cam, pred, units, tag) in enumerate((
            (p.image, p.cam, p.pred, p.units, "clean"),
            (p.image_adv, p.cam_adv, p.pred_adv, p.units_adv, "adversarial"),
        )):  # fmt: skip
            ax, ax_t = axes[i, 2 * j], axes[i, 2 * j + 1]
            ax.imshow(_rgb(img), interpolation="nearest")
            c = cam.detach().float().cpu().numpy()
            ax.imshow(c / (np.abs(c).max() + 1e-12), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{tag}: predicted {pred}" + (f" (true {p.label})" if j == 0 else ""), fontsize=7)
            ax_t.axis("off")
            ax_t.text(0, 1, "top units by q:", fontsize=7, va="top", weight="bold")
            for k, line in enumerate(units):
                quad = line.rsplit(" ", 1)[-1]
                ax_t.text(0, 0.88 - 0.11 * k, line, fontsize=6.5, va="top", color=_QUAD_COLOURS.get(quad, "black"))
    return fig
