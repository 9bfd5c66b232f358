"""Figures of the robustness metric and the input-space landscapes (object-oriented matplotlib;
each function returns a Figure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from ..analysis.landscape import LandscapeResult

__all__ = ["landscape_contours", "landscape_slices", "landscape_surfaces", "psi_histograms", "study_scatter"]


def landscape_contours(results: Mapping[str, LandscapeResult], surface: str = "decision") -> Figure:
    """Mean decision (or CE) surface per model over the (d₁, d₂) plane, side by side; the D = 0
    boundary in black and the ε square dashed."""
    n = len(results)
    fig = Figure(figsize=(4.2 * n, 3.8))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, r) in zip(axes, results.items(), strict=True):
        z = (r.mean_decision if surface == "decision" else r.mean_loss).numpy()
        a, b = r.a.numpy(), r.b.numpy()
        centred = surface == "decision" and z.min() < 0 < z.max()
        norm = TwoSlopeNorm(0.0, float(z.min()), float(z.max())) if centred else None  # white at D = 0
        cs = ax.contourf(b, a, z, levels=20, cmap="RdBu" if surface == "decision" else "viridis", norm=norm)
        fig.colorbar(cs, ax=ax, shrink=0.85)
        if surface == "decision" and z.min() < 0 < z.max():
            ax.contour(b, a, z, levels=[0.0], colors="k", linewidths=1.5)
        e = r.eps
        ax.plot([-e, e, e, -e, -e], [-e, -e, e, e, -e], "k--", lw=0.8)
        ax.set_xlabel("b (random direction d₂)")
        ax.set_ylabel("a (adversarial direction d₁)")
        ax.set_title(f"{name}: mean {'D' if surface == 'decision' else 'CE'} ({r.norm})", fontsize=9)
    fig.tight_layout()
    return fig


def landscape_surfaces(results: Mapping[str, LandscapeResult], surface: str = "loss") -> Figure:
    """3-D surfaces of the mean CE (or decision) surface per model, side by side, same z range."""
    n = len(results)
    fig = Figure(figsize=(4.5 * n, 4.0))
    zs = {k: (r.mean_loss if surface == "loss" else r.mean_decision).numpy() for k, r in results.items()}
    lo = min(float(z.min()) for z in zs.values())
    hi = max(float(z.max()) for z in zs.values())
    for i, (name, r) in enumerate(results.items()):
        ax: Any = fig.add_subplot(1, n, i + 1, projection="3d")
        bb, aa = np.meshgrid(r.b.numpy(), r.a.numpy())
        ax.plot_surface(bb, aa, zs[name], cmap="viridis", linewidth=0, antialiased=True)
        ax.set_zlim(lo, hi)
        ax.set_xlabel("b (d₂)", fontsize=8)
        ax.set_ylabel("a (d₁)", fontsize=8)
        ax.set_zlabel("CE" if surface == "loss" else "D", fontsize=8)
        ax.set_title(f"{name}: mean {'CE' if surface == 'loss' else 'D'}", fontsize=9)
    fig.tight_layout()
    return fig


def landscape_slices(results: Mapping[str, LandscapeResult]) -> Figure:
    """D along d₁ (b = 0) per image (thin) and averaged (thick) per model; ε dotted, D = 0 solid."""
    n = len(results)
    fig = Figure(figsize=(4.2 * n, 3.4))
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    for ax, (name, r) in zip(axes, results.items(), strict=True):
        a = r.line_a.numpy()
        for row in r.line_decision.numpy():
            ax.plot(a, row, color="tab:blue", alpha=0.25, lw=0.7)
        ax.plot(a, r.line_decision.mean(0).numpy(), color="tab:blue", lw=2)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.axvline(r.eps, color="tab:red", ls=":", lw=1)
        s = r.summary()
        ax.set_title(f"{name}: a* ≤ ε for {s['boundary_inside_eps']:.0%}", fontsize=9)
        ax.set_xlabel("a along d₁")
    axes[0].set_ylabel("D = Z_y − max_{j≠y} Z_j")
    fig.tight_layout()
    return fig


def psi_histograms(psis: Mapping[str, np.ndarray]) -> Figure:
    """Distribution of ψ(x) per model (log10(ψ + 1e-6))."""
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.subplots()
    for name, v in psis.items():
        ax.hist(np.log10(np.asarray(v) + 1e-6), bins=30, alpha=0.5, label=name)
    ax.set_xlabel("log10 ψ(x)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def study_scatter(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                  correlations: Mapping[str, Mapping[str, Any]]) -> Figure:  # fmt: skip
    """−Ψ (log scale of Ψ) against each accuracy column, one panel per column, with Spearman ρ."""
    n = len(columns)
    ncols = min(3, n)
    nrows = (n + ncols - 1) // ncols
    fig = Figure(figsize=(4.0 * ncols, 3.3 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    psi = np.array([float(r["psi_mean"]) for r in rows])
    for ax, col in zip(axes, columns, strict=False):
        acc = np.array([float(r[col]) for r in rows])
        ax.scatter(psi, acc, s=18)
        for r, p, v in zip(rows, psi, acc, strict=True):
            ax.annotate(str(r["model"]).replace("fmnist-", ""), (p, v), fontsize=5, alpha=0.7)
        ax.set_xscale("log")
        c = correlations.get(col, {})
        ax.set_title(f"{col}: ρ = {c.get('spearman', float('nan')):.2f}", fontsize=9)
        ax.set_xlabel("Ψ (lower = more robust)")
        ax.set_ylabel("accuracy")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
