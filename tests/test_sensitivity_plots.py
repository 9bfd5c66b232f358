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
    _render(P.plot_sigma_profiles(prof))
    _render(P.plot_sigma_profiles({"vanilla": prof, "pat": prof}, ["conv1"], log=True))
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
