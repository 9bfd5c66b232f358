"""Figures for the report. Object-oriented matplotlib (Agg), each function returns a Figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
import torch
from matplotlib.figure import Figure


def confusion_matrix(cm: np.ndarray, classes: Sequence[str]) -> Figure:
    """cm: (K, K) counts, rows = true class."""
    k = len(classes)
    fig = Figure(figsize=(0.55 * k + 2.5, 0.55 * k + 2))
    ax = fig.add_subplot()
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(k), [c[:12] for c in classes], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), [c[:12] for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="row fraction")
    return fig


def per_class_bars(values: Sequence[float], classes: Sequence[str], ylabel: str) -> Figure:
    fig = Figure(figsize=(max(4.0, 0.5 * len(classes) + 1.5), 3))
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set_xticks(range(len(classes)), [c[:12] for c in classes], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return fig


def image_grid(x: torch.Tensor, titles: Sequence[str] | None = None, ncols: int = 8) -> Figure:
    """x: (N, C, H, W) in [0, 1]; grayscale for C = 1."""
    n = x.shape[0]
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(1.3 * ncols, 1.55 * nrows))
    for i in range(n):
        _show(fig.add_subplot(nrows, ncols, i + 1), x[i], None if titles is None else titles[i])
    return fig


def _show(ax: Any, img: torch.Tensor, title: str | None, cmap: str = "gray") -> None:
    """Draw one (C, H, W) image in [0, 1] without axes; `cmap` applies to 1-channel images."""
    img = img.detach().cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap=cmap, vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title, fontsize=6)


def line_plot(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Figure:
    """One line per series, optional shaded (low, high) bands keyed like the series."""
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.add_subplot()
    for name, ys in series.items():
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=name)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return fig


def accuracy_bars(rows: Sequence[dict[str, object]]) -> Figure:
    """Horizontal bars of accuracy with (ci_low, ci_high) error bars; rows from the evaluation table."""
    names = [str(r["attack"]) for r in rows]
    acc = np.array([float(r["accuracy"]) for r in rows])  # type: ignore[arg-type]
    lo = np.array([float(r["ci_low"]) for r in rows])  # type: ignore[arg-type]
    hi = np.array([float(r["ci_high"]) for r in rows])  # type: ignore[arg-type]
    fig = Figure(figsize=(6, 0.35 * len(rows) + 1))
    ax = fig.add_subplot()
    colors = {"clean": "#55a868", "white-box": "#c44e52", "black-box": "#8172b2", "worst case": "#333333"}
    ax.barh(range(len(rows)), acc, xerr=[acc - lo, hi - acc], capsize=2,
            color=[colors.get(str(r["kind"]), "#4c72b0") for r in rows])  # fmt: skip
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.grid(axis="x", alpha=0.3)
    return fig


def adversarial_grid(
    clean: torch.Tensor, adv: torch.Tensor, classes: Sequence[str], y: torch.Tensor, pred: torch.Tensor
) -> Figure:
    """Rows: clean images, adversarial images (title: prediction), |difference| amplified to [0, 1]."""
    k = clean.shape[0]
    diff = (adv - clean).abs()
    diff = diff / diff.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    fig = Figure(figsize=(1.3 * k, 4.2))
    for row, (imgs, titles) in enumerate(
        [(clean, [classes[int(t)][:10] for t in y]), (adv, [f"→ {classes[int(p)][:10]}" for p in pred]), (diff, None)]
    ):
        for i in range(k):
            title = None if titles is None else titles[i]
            _show(fig.add_subplot(3, k, row * k + i + 1), imgs[i], title, "gray" if row < 2 else "magma")
    return fig


def layer_study_figure(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """The SNS layer-selection study: accuracy (clean and each attack, 95% bands) against the
    number k of top layers in S, one row per k."""
    ks = [int(r["k"]) for r in rows]
    columns = [c for c in rows[0] if f"{c}_ci_low" in rows[0]]
    series = {c: [float(r[c]) for r in rows] for c in columns}
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] = {
        c: ([float(r[f"{c}_ci_low"]) for r in rows], [float(r[f"{c}_ci_high"]) for r in rows]) for c in columns
    }
    fig = line_plot(ks, series, "k (top conv layers in S)", "accuracy", "SNS layer selection", bands=bands)
    fig.axes[0].set_xticks(ks)
    return fig
