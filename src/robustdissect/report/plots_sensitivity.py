"""Figures of the neuron-sensitivity analyses (object-oriented matplotlib; each function returns a
`matplotlib.figure.Figure`, never touches pyplot's global state).

Inputs are the arrays and rows returned by `analysis.sensitivity`, `analysis.importance`,
`analysis.suppression` and `analysis.roi`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
from matplotlib.figure import Figure

from ..analysis.roi import ROIResult
from ..analysis.sensitivity import LayerProfile

__all__ = [
    "plot_mean_ratio",
    "plot_overlap_by_layer",
    "plot_per_class",
    "plot_ratio_vs_strength",
    "plot_roi",
    "plot_sigma_profiles",
    "plot_suppression",
]

Rows = Sequence[Mapping[str, Any]]


def _grid(n: int, ncols: int = 4, size: tuple[float, float] = (3.2, 2.6)) -> tuple[Figure, Any]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def plot_sigma_profiles(
    profiles: Mapping[str, LayerProfile] | Mapping[str, Mapping[str, LayerProfile]],
    layers: Sequence[str] | None = None,
    *,
    log: bool = False,
) -> Figure:
    """Figs. 10-12: σ of every neuron sorted descending, one panel per layer, one line per model
    ({layer: profile} or {model: {layer: profile}}), dashed line at the top-k (10%) boundary."""
    first = next(iter(profiles.values()), None)
    single = isinstance(first, LayerProfile) or first is None
    by_model = cast(dict[str, Mapping[str, LayerProfile]], {"": profiles} if single else dict(profiles))
    names = list(layers) if layers else list(next(iter(by_model.values()), {}))
    fig, axes = _grid(len(names))
    for ax, layer in zip(axes, names, strict=False):
        for model, prof in by_model.items():
            if layer not in prof:
                continue
            p = prof[layer]
            line = ax.plot(np.arange(1, p.sorted_sigma.size + 1), p.sorted_sigma, label=model or None)
            ax.axvline(p.k + 0.5, color=line[0].get_color(), ls="--", lw=0.8)
        ax.set_title(layer)
        ax.set_xlabel("neuron rank")
        ax.set_ylabel("σ")
        if log:
            ax.set_yscale("log")
        if len(by_model) > 1:
            ax.legend(fontsize="small")
    return fig


def _series_label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    return " ".join(f"{row[k]}" for k in keys if k in row and row[k] not in ("", None))


def plot_mean_ratio(
    rows: Rows,
    value: str = "ratio_mean_sensitive",
    series: Sequence[str] = ("model", "family", "strength"),
) -> Figure:
    """Fig. 13: per layer, the mean σ_Ratio of its sensitive neurons as grouped bars, one bar
    per series (e.g. model × perturbation × strength). Rows: `ratio_sweep(...).rows`."""
    layers = list(dict.fromkeys(str(r["layer"]) for r in rows))
    labels = list(dict.fromkeys(_series_label(r, series) for r in rows))
    fig = Figure(figsize=(max(6.0, 0.9 * len(layers) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(layers))
    for i, label in enumerate(labels):
        vals = {str(r["layer"]): float(r[value]) for r in rows if _series_label(r, series) == label}
        ax.bar(x + i * width - 0.4 + width / 2, [vals.get(layer, np.nan) for layer in layers],
               width, label=label or None)  # fmt: skip
    ax.set_xticks(x, layers)
    ax.set_ylabel("mean σ_Ratio of sensitive neurons")
    if len(labels) > 1:
        ax.legend(fontsize="small", ncols=2)
    return fig


def plot_ratio_vs_strength(
    rows: Rows,
    layers: Sequence[str] | None = None,
    value: str = "ratio_mean_sensitive",
    series: Sequence[str] = ("model", "family"),
) -> Figure:
    """Fig. 14 / Table II: σ_Ratio of the sensitive neurons against attack strength, one panel
    per layer, one line per series (e.g. model)."""
    names = list(layers) if layers else list(dict.fromkeys(str(r["layer"]) for r in rows))
    fig, axes = _grid(len(names))
    for ax, layer in zip(axes, names, strict=False):
        sub = [r for r in rows if r["layer"] == layer]
        for label in dict.fromkeys(_series_label(r, series) for r in sub):
            pts = sorted((float(r["strength"]), float(r[value])) for r in sub if _series_label(r, series) == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
        ax.set_title(layer)
        ax.set_xlabel("strength (ε)")
        ax.set_ylabel("σ_Ratio")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


def plot_suppression(summary: Rows, conditions: Sequence[str] | None = None) -> Figure:
    """Fig. 9: accuracy against β for the sensitive and the random group (mean ± std over draws),
    one panel per condition × mode. Rows: `suppression_experiment(...).summary`."""
    keys = list(dict.fromkeys((str(r["condition"]), str(r["mode"])) for r in summary))
    if conditions is not None:
        keys = [k for k in keys if k[0] in conditions]
    fig, axes = _grid(len(keys))
    for ax, (cond, mode) in zip(axes, keys, strict=False):
        for group in ("sensitive", "random"):
            pts = sorted(
                (float(r["beta"]), float(r["accuracy"]), float(r.get("accuracy_std", 0.0)))
                for r in summary
                if r["condition"] == cond and r["mode"] == mode and r["group"] == group
            )
            if not pts:
                continue
            b, a, s = (np.array(v) for v in zip(*pts, strict=True))
            ax.plot(b, a, marker="o", label=group)
            if np.any(s > 0):
                ax.fill_between(b, a - s, a + s, alpha=0.2)
        ax.set_title(cond if mode in ("clean", "whitebox") else f"{cond} ({mode})")
        ax.set_xlabel("β")
        ax.set_ylabel("accuracy")
        ax.invert_xaxis()
        ax.legend(fontsize="small")
    return fig


def plot_roi(roi: ROIResult, alpha: float = 0.45) -> Figure:
    """Figs. 4-7: per neuron a benign row and an adversarial row of its top images with the
    thresholded, upsampled activation region overlaid."""
    m, t = roi.image_index.shape
    fig = Figure(figsize=(1.6 * t + 1.2, 1.6 * 2 * m), layout="constrained")
    axes = fig.subplots(2 * m, t, squeeze=False)
    for i in range(m):
        for row, (imgs, masks) in enumerate(((roi.images, roi.masks), (roi.images_adv, roi.masks_adv))):
            for j in range(t):
                ax = axes[2 * i + row, j]
                img = imgs[i, j]
                if img.shape[0] == 1:
                    ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1))
                overlay = np.zeros((*masks.shape[2:], 4))
                overlay[masks[i, j]] = (1.0, 0.2, 0.1, alpha)
                ax.imshow(overlay)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    kind = "benign" if row == 0 else "adv."
                    ax.set_ylabel(f"{roi.kinds[i]} {roi.neurons[i]}\n{kind}", fontsize="small")
    fig.suptitle(f"{roi.layer}: regions above the {roi.quantile} quantile")
    return fig


def plot_per_class(
    rows: Rows, metric: str = "spearman", k: int | None = None, class_names: Sequence[str] | None = None
) -> Figure:
    """Figs. 2-3: per target class, Spearman or Levenshtein similarity between sensitive and
    important neurons (rows from `sensitivity_vs_importance(...).rows`)."""
    ks = sorted({int(r["k"]) for r in rows})
    kk = k if k is not None else (ks[0] if ks else 0)
    sub = sorted((r for r in rows if int(r["k"]) == kk), key=lambda r: int(r["target"]))
    fig = Figure(figsize=(6.0, 3.2), layout="constrained")
    ax = fig.subplots()
    vals = np.array([float(r[metric]) for r in sub], dtype=np.float64)
    ax.bar(range(len(sub)), vals)
    names = [class_names[int(r["target"])][:12] if class_names else str(r["target"]) for r in sub]
    ax.set_xticks(range(len(sub)), names, rotation=45 if class_names else 0, ha="right" if class_names else "center")
    if vals.size and np.isfinite(vals).any():
        ax.axhline(float(np.nanmean(vals)), color="k", ls="--", lw=0.8, label="mean")
        ax.legend(fontsize="small")
    ax.set_xlabel("target class")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} (k = {kk})")
    return fig


def plot_overlap_by_layer(rows: Rows) -> Figure:
    """Fig. 8: total Jaccard and mean pairwise Levenshtein similarity of the sensitive sets
    across targets, against layer (rows from `cross_target_overlap(...).rows`)."""
    fig = Figure(figsize=(6.0, 3.2), layout="constrained")
    ax = fig.subplots()
    layers = [str(r["layer"]) for r in rows]
    ax.plot(layers, [float(r["total_jaccard"]) for r in rows], marker="o", label="total Jaccard")
    ax.plot(layers, [float(r["levenshtein_avg"]) for r in rows], marker="s",
            label="mean Levenshtein similarity")  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.legend(fontsize="small")
    return fig
