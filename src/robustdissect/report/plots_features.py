"""Figures of the feature dissection (object-oriented matplotlib; each function returns a
`matplotlib.figure.Figure`): ρ against γ per layer with the quadrant boundaries, quadrant shares
per layer, and quadrant shares per model with bootstrap intervals."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..analysis.features import QUADRANTS, FeatureScores

__all__ = ["plot_model_shares", "plot_quadrant_shares", "plot_rho_gamma"]

COLOURS = {"RU": "#1b9e77", "NRU": "#d95f02", "RL": "#7570b3", "NL": "#999999"}


def plot_rho_gamma(res: FeatureScores, ncols: int = 3) -> Figure:
    """One panel per layer: γ̂ against ρ of every unit, coloured by quadrant; dashed lines at
    ρ = τ_ρ and γ = 0, dotted the strict boundary γ = 0.5·ρ; ringed units had a feature-targeted
    attack."""
    sc = res.scores
    layer_of = res.layer_of.numpy()
    rho, gamma = sc.rho.numpy(), sc.gamma.numpy()
    quads = np.array(sc.quadrant)
    cand = np.zeros(len(rho), dtype=bool)
    cand[res.candidates.numpy()] = True
    n = len(res.layers)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(3.4 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    lo = float(min(gamma.min(), 0.0)) - 0.1
    hi = float(max(rho.max(), sc.tau_rho)) + 0.1
    for ax in axes[n:]:
        ax.set_visible(False)
    for li, (ax, layer) in enumerate(zip(axes, res.layers, strict=False)):
        sel = layer_of == li
        for qd in QUADRANTS:
            m = sel & (quads == qd)
            if m.any():
                ax.scatter(rho[m], gamma[m], s=14, c=COLOURS[qd], label=qd, alpha=0.85)
        m = sel & cand
        if m.any():
            ax.scatter(rho[m], gamma[m], s=60, facecolors="none", edgecolors="black", linewidths=0.8)
        ax.axvline(sc.tau_rho, ls="--", c="k", lw=0.8)
        ax.axhline(0.0, ls="--", c="k", lw=0.8)
        xs = np.array([0.0, hi])
        ax.plot(xs, 0.5 * xs, ls=":", c="k", lw=0.8)
        ax.set_xlim(min(0.0, float(rho.min())) - 0.05, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(layer)
        ax.set_xlabel("ρ (balanced usefulness)")
        ax.set_ylabel("γ̂ (upper bound)")
    handles = [Line2D([], [], ls="", marker="o", color=COLOURS[qd], label=qd) for qd in QUADRANTS]
    handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="black", label="feature-attacked"))
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=8)
    return fig


def plot_quadrant_shares(layer_rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Stacked bars: the share of each layer's units in each quadrant, one panel per model (rows
    of `FeatureScores.layer_rows()`, several models concatenated)."""
    models = list(dict.fromkeys(str(r.get("model", "")) for r in layer_rows))
    n_layers = max(1, len(layer_rows) // max(1, len(models)))
    fig = Figure(figsize=(max(4.0, 0.7 * n_layers + 1.5) * len(models) + 1.2, 3.2), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False, sharey=True).ravel()
    for ax, model in zip(axes, models, strict=True):
        rows = [r for r in layer_rows if str(r.get("model", "")) == model]
        names = [str(r["layer"]) for r in rows]
        bottom = np.zeros(len(names))
        for qd in QUADRANTS:
            vals = np.array([float(r[f"share_{qd}"]) for r in rows])
            ax.bar(names, vals, bottom=bottom, color=COLOURS[qd], label=qd)
            bottom += vals
        ax.set_ylim(0, 1)
        ax.set_title(model, fontsize=9)
    axes[0].set_ylabel("share of units")
    axes[-1].legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig


def plot_model_shares(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Share of all analysed units per quadrant and model, with bootstrap intervals (rows of
    `bootstrap_shares`)."""
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    fig = Figure(figsize=(max(5.0, 1.6 * len(QUADRANTS) + 1), 3.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(models))
    x = np.arange(len(QUADRANTS))
    for mi, model in enumerate(models):
        by_q = {str(r["quadrant"]): r for r in rows if r["model"] == model}
        share = np.array([float(by_q[q]["share"]) for q in QUADRANTS])
        lo = np.array([float(by_q[q].get("ci_low", math.nan)) for q in QUADRANTS])
        hi = np.array([float(by_q[q].get("ci_high", math.nan)) for q in QUADRANTS])
        lo, hi = np.where(np.isnan(lo), share, lo), np.where(np.isnan(hi), share, hi)
        pos = x - 0.4 + width * (mi + 0.5)
        # a percentile interval need not contain the point estimate: clip the whiskers at the bar
        err = np.clip(np.vstack([share - lo, hi - share]), 0.0, None)
        ax.bar(pos, share, width, label=model, yerr=err, capsize=3)
    ax.set_xticks(x, list(QUADRANTS))
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of analysed units")
    ax.legend(fontsize=7)
    return fig
