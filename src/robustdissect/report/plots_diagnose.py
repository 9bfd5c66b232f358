"""Figures of the layer diagnosis (METHODS §1): per-layer bars, explanation strips, the IG-1
pooling comparison. Object-oriented matplotlib; each function returns a Figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure


def layer_bars(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """V_l, V_l^soft, IL_l and A_l per layer (rows of `Diagnosis.layer_rows`, input row first)."""
    fig = Figure(figsize=(11, 6.5))
    axes = fig.subplots(2, 2)
    names = [str(r["layer"]) for r in rows]
    panels = [("V", "V_l (flip layer; 'input' = the judge is fooled by x′ itself)"),
              ("V_soft", "V_l^soft"), ("IL", "IL_l = R_l − R_{l−1}"), ("A", "A_l = d_l / d_{l−1}")]  # fmt: skip
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        vals = [float(r[key]) if r.get(key) is not None else math.nan for r in rows]
        ax.bar(range(len(vals)), [0.0 if math.isnan(v) else v for v in vals],
               color=["#c44e52" if n.startswith("pool") else "#4c72b0" for n in names])  # fmt: skip
        for i, v in enumerate(vals):  # undefined (e.g. A_l after d = 0, V_l with nothing judged): no bar
            if math.isnan(v):
                ax.text(i, 0.0, "n/a", ha="center", va="bottom", fontsize=6, color="grey")
        if key == "A":
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def strips(
    clean: torch.Tensor, adv: torch.Tensor, layers: Sequence[str], clean_classes: torch.Tensor,
    adv_classes: torch.Tensor, classes: Sequence[str], y: torch.Tensor, y_adv: torch.Tensor,
) -> Figure:  # fmt: skip
    """For each shown example two rows: the clean strip E_0(x) … E_L(x) and the adversarial strip
    E_0(x′) … E_L(x′); each panel titled with the judge's class (red: the adversarial class).
    clean, adv: (k, L+1, C, H, W)."""
    k, cols = clean.shape[:2]
    fig = Figure(figsize=(1.1 * cols + 0.6, 2.4 * max(k, 1) + 0.4))
    if k == 0:
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no adversarial example flipped a correct prediction", ha="center")
        return fig
    axes = fig.subplots(2 * k, cols, squeeze=False)
    heads = ["input", *layers]
    for i in range(k):
        for row, (imgs, cls, tag) in enumerate(((clean, clean_classes, "clean"), (adv, adv_classes, "adv"))):
            for j in range(cols):
                ax = axes[2 * i + row, j]
                img = imgs[i, j].detach().float().clamp(0, 1)
                shown = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
                ax.imshow(shown.numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                c = int(cls[i, j])
                name = classes[c] if c < len(classes) else str(c)
                ax.set_title(name[:10], fontsize=6, color="#c44e52" if c == int(y_adv[i]) else "black")
                if i == 0 and row == 0:
                    ax.set_xlabel(heads[j], fontsize=7)
                    ax.xaxis.set_label_position("top")
                if j == 0:
                    label = classes[int(y[i])] if tag == "clean" else classes[int(y_adv[i])]
                    ax.set_ylabel(f"{tag}\n{label[:10]}", fontsize=7)
    fig.tight_layout()
    return fig


def pooling_comparison(study: Mapping[str, Any]) -> Figure:
    """IG-1: PGD accuracy per pooling, training and ε (bar = mean over the short-schedule seeds, black
    dots = those seeds, open diamonds = the shipped checkpoints), and the per-layer IL and V^soft of
    max and avg pooling (mean over the short-schedule seeds). Stale checkpoints (retrained or
    trained off their preset) are left out, as in the comparisons."""
    fig = Figure(figsize=(12, 4))
    ax_acc, ax_il, ax_v = fig.subplots(1, 3)
    every = [r for r in study["models"] if not r.get("stale")]
    rows = [r for r in every if r.get("group", "short-schedule seeds") == "short-schedule seeds"]
    shipped = [r for r in every if r.get("group", "short-schedule seeds") != "short-schedule seeds"]
    groups = sorted({(r["training"], r["eps"]) for r in every})
    for gi, (training, eps) in enumerate(groups):
        for pi, pooling in enumerate(("max", "avg")):
            cell = (training, eps, pooling)
            vals = [r["pgd_accuracy"] for r in rows if (r["training"], r["eps"], r["pooling"]) == cell]
            xpos = gi * 3 + pi
            if vals:
                ax_acc.bar(xpos, sum(vals) / len(vals), color="#c44e52" if pooling == "max" else "#4c72b0", alpha=0.6)
                ax_acc.scatter([xpos] * len(vals), vals, color="k", s=8, zorder=3)
            ship = [r["pgd_accuracy"] for r in shipped if (r["training"], r["eps"], r["pooling"]) == cell]
            if ship:
                ax_acc.scatter([xpos + 0.25] * len(ship), ship, facecolors="none", edgecolors="k", marker="D", s=18,
                               zorder=3)  # fmt: skip
    ax_acc.set_xticks([gi * 3 + 0.5 for gi in range(len(groups))])
    ax_acc.set_xticklabels([f"{t}\nε={e:g}" for t, e in groups], fontsize=8)
    ax_acc.set_title("PGD accuracy (red max, blue avg; dots = seeds, ◇ = shipped)", fontsize=9)
    for ax, key_, label in ((ax_il, "IL", "IL_l (mean over seeds)"), (ax_v, "V_soft", "V_l^soft (mean over seeds)")):
        for training, ls in (("standard", "-"), ("pgd-at", "--")):
            for pooling, color in (("max", "#c44e52"), ("avg", "#4c72b0")):
                sel = [r for r in rows if r["training"] == training and r["pooling"] == pooling
                       and groups and r["eps"] == groups[0][1]]  # fmt: skip
                if not sel:
                    continue
                layers = [p["layer"] for p in sel[0]["layers"]]
                mean = [float(np.nanmean([float(r["layers"][i][key_]) for r in sel])) for i in range(len(layers))]
                ax.plot(range(len(layers)), mean, ls=ls, color=color, marker="o", ms=3, label=f"{pooling}, {training}")
                ax.set_xticks(range(len(layers)))
                ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
