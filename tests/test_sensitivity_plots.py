"""Sensitivity figures render from the analysis outputs (tiny inputs)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from robustdissect.analysis.roi import regions_of_interest
from robustdissect.analysis.sensitivity import neuron_sensitivity, sigma_profiles
from robustdissect.models import build_model
from robustdissect.report import plots_sensitivity as P


@dataclass(frozen=True)
class _Result:
    x_adv: torch.Tensor


def _render(fig: Figure) -> None:
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    assert buf.getvalue()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("smallcnn", width=4).eval()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return model, x, (x + 0.1).clamp(0, 1)


def test_profile_and_roi_figures(setup: tuple[torch.nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, xa = setup
    res = neuron_sensitivity(model, (x, xa), ["conv1", "relu1", "pool1"])
    prof = sigma_profiles(res)
    fig = P.plot_sigma_profiles(prof)
    _render(fig)
    # one panel per layer; its line is that layer's σ sorted descending, the dashed line at the top-k boundary
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["conv1", "relu1", "pool1"]
    for ax in panels:
        p = prof[ax.get_title()]
        ys = ax.get_lines()[0].get_ydata()
        assert np.allclose(ys, np.sort(np.asarray(res.layers[ax.get_title()].sigma))[::-1])
        assert np.all(np.diff(ys) <= 0) and len(ys) == 4  # width-4 smallcnn: 4 channels
        assert ax.get_lines()[1].get_xdata()[0] == pytest.approx(p.k + 0.5)
    both = P.plot_sigma_profiles({"vanilla": prof, "pat": prof}, ["conv1"], log=True)
    _render(both)
    (ax,) = [a for a in both.axes if a.get_title()]
    assert ax.get_yscale() == "log" and [t.get_text() for t in ax.get_legend().get_texts()] == ["vanilla", "pat"]
    roi = regions_of_interest(model, x, xa, "pool1", res.layers["pool1"].sigma, n_images=2)
    _render(P.plot_roi(roi))


def test_table_figures() -> None:
    sweep = [
        {"family": "pgd", "strength": s, "layer": layer, "ratio_mean_sensitive": s * d}
        for s in (0.02, 0.04) for d, layer in enumerate(["conv1", "relu1"], 1)
    ]  # fmt: skip
    _render(P.plot_mean_ratio(sweep))
    _render(P.plot_ratio_vs_strength(sweep))
    summary = [
        {"beta": b, "group": g, "condition": c, "mode": m, "accuracy": 0.5 + b / 3,
         "accuracy_std": 0.01 if g == "random" else 0.0}
        for b in (1.0, 0.7) for g in ("sensitive", "random")
        for c, m in (("clean", "clean"), ("pgd", "whitebox"), ("pgd", "transfer"))
    ]  # fmt: skip
    _render(P.plot_suppression(summary))
    per_class = [
        {"target": t, "k": 10, "spearman": 0.1 * t, "levenshtein": np.nan if t == 0 else 0.5} for t in range(3)
    ]
    _render(P.plot_per_class(per_class))
    _render(P.plot_per_class(per_class, "levenshtein", k=10))
    overlap = [{"layer": f"conv{i}", "total_jaccard": 1 / i, "levenshtein_avg": 0.5} for i in (1, 2)]
    _render(P.plot_overlap_by_layer(overlap))
