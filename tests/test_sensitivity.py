"""Neuron sensitivity σ (Eq. 1) and σ_Ratio (Eq. 11): the oracles of METHODS §5.6."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustdissect.analysis.sensitivity import (
    hook_kind,
    mean_ratio_sensitive,
    neuron_sensitivity,
    penultimate_k,
    sensitive_neurons,
    sigma_profiles,
    top_k_count,
)
from robustdissect.errors import UserError
from robustdissect.models import build_model


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("smallcnn", width=4).eval()


def _one_conv() -> nn.Module:
    """1x1 conv with known weights: channel 0 = x, channel 1 = -2x + 1."""
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, 1.0]))
    return nn.Sequential(conv)


def test_sigma_zero_when_pairs_identical(cnn: nn.Module) -> None:
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    layers = [f"conv{i}" for i in range(1, 7)] + [f"relu{i}" for i in range(1, 7)] + ["fc1"]
    res = neuron_sensitivity(cnn, (x, x.clone()), layers, batch_size=4)
    for ls in res.layers.values():
        assert np.all(np.abs(ls.sigma) <= 1e-6)
        assert np.all(np.abs(ls.ratio_mean) <= 1e-6)
        assert np.all(np.isfinite(ls.ratio_mean)) and np.all(np.isfinite(ls.ratio_of_sums))
    assert res.n == 6


def test_constant_shift_of_one_channel() -> None:
    model = nn.Sequential(nn.Identity())
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for c in (0.25, -0.125):
        xa = x.clone()
        xa[:, 1] += c
        res = neuron_sensitivity(model, (x, xa), ["0"])
        sig = res.layers["0"].sigma
        assert sig[1] == pytest.approx(abs(c), abs=1e-6)
        assert sig[0] == 0.0 and sig[2] == 0.0
        assert res.layers["0"].hook == "identity"
        mind = neuron_sensitivity(model, (x, xa), ["0"], reduction="mindarmour")
        assert mind.layers["0"].sigma[1] == pytest.approx(abs(c), abs=1e-6)


def test_hand_computed_sigma_and_ratio() -> None:
    model = _one_conv()
    x = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    xa = torch.tensor([[[[0.2, 0.2], [0.1, 0.4]]], [[[0.5, 0.0], [0.0, 0.0]]]])
    # |x - x'|_1: image 1 -> 0.3, image 2 -> 0.5; dim = 4
    res = neuron_sensitivity(model, (x, xa), ["0"], batch_size=1).layers["0"]
    assert res.sigma == pytest.approx([(0.3 + 0.5) / 4 / 2, 2 * (0.3 + 0.5) / 4 / 2], abs=1e-7)
    # channel 0: ||F(x)||_1 = 1.0 and 0 (skipped) -> mean ratio 0.3; ratio of sums 0.8 / 1.0
    # channel 1: F = -2x + 1: ||F||_1 = 2.0 and 4.0, ||dF||_1 = 0.6 and 1.0
    assert res.ratio_mean == pytest.approx([0.3, (0.6 / 2.0 + 1.0 / 4.0) / 2], abs=1e-6)
    assert res.ratio_of_sums == pytest.approx([0.8, 1.6 / 6.0], abs=1e-6)
    assert res.ratio_count.tolist() == [1, 2]
    assert res.n == 2 and res.dim == 4


def test_mindarmour_differs_on_sign_alternating_example() -> None:
    model = nn.Sequential(nn.Identity())
    x = torch.zeros(2, 1, 2, 2)
    xa = torch.tensor([[[[0.5, -0.5], [-0.5, 0.5]]]]).repeat(2, 1, 1, 1)
    eq1 = neuron_sensitivity(model, (x, xa), ["0"]).layers["0"].sigma
    mind = neuron_sensitivity(model, (x, xa), ["0"], reduction="mindarmour").layers["0"].sigma
    assert eq1[0] == pytest.approx(0.5)
    assert mind[0] == 0.0


def test_ratio_on_all_zero_maps_has_no_nan() -> None:
    model = nn.Sequential(nn.ReLU())
    x = -torch.ones(3, 2, 3, 3)  # all-zero ReLU maps on the clean input
    xa = x.clone()
    xa[:, 0] = 1.0
    res = neuron_sensitivity(model, (x, xa), ["0"]).layers["0"]
    assert np.all(np.isfinite(res.ratio_mean)) and np.all(np.isfinite(res.ratio_of_sums))
    assert res.ratio_mean.tolist() == [0.0, 0.0]
    assert res.ratio_count.tolist() == [0, 0]
    assert res.sigma.tolist() == pytest.approx([1.0, 0.0])
    assert hook_kind(model, "0") == "relu"


def test_default_layers_and_rows(cnn: nn.Module) -> None:
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    xa = (x + 0.05).clamp(0, 1)
    res = neuron_sensitivity(cnn, [(x[:2], xa[:2]), (x[2:], xa[2:])])
    assert list(res.layers) == [f"conv{i}" for i in range(1, 7)]
    assert {ls.hook for ls in res.layers.values()} == {"conv"}
    rows = res.rows()
    assert len(rows) == sum(ls.channels for ls in res.layers.values())
    assert sum(r["sensitive"] for r in rows if r["layer"] == "conv6") == 2  # round(0.1 * 16)
    summary = res.summary_rows()
    assert [r["layer"] for r in summary] == list(res.layers)
    assert all(r["sigma_top_mean"] >= r["sigma_rest_mean"] for r in summary)


def test_sensitive_neurons_and_profiles() -> None:
    sigma = {"a": np.array([0.1, 0.5, 0.3, 0.5, 0.0]), "b": np.arange(32, dtype=float)}
    top = sensitive_neurons(sigma)
    assert top["a"].tolist() == [1]  # max(1, round(0.5)) = 1, tie -> smaller index
    assert top["b"].tolist() == [31, 30, 29]  # round(3.2) = 3
    assert sensitive_neurons(sigma, k=2)["a"].tolist() == [1, 3]
    assert top_k_count(512) == 51 and top_k_count(64) == 6 and top_k_count(128) == 13
    assert top_k_count(25) == 3  # halves round up
    assert top_k_count(10, k=50) == 10
    assert penultimate_k(512) == 20 and penultimate_k(128) == 10
    with pytest.raises(UserError):
        top_k_count(10, fraction=0.0)


def test_profiles_and_mean_ratio(cnn: nn.Module) -> None:
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    xa = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    res = neuron_sensitivity(cnn, (x, xa), ["conv5", "relu5"])
    prof = sigma_profiles(res)["relu5"]
    assert np.all(np.diff(prof.sorted_sigma) <= 0)
    assert prof.k == 2 and prof.threshold == prof.sorted_sigma[1]
    assert np.array_equal(res.layers["relu5"].sigma[prof.order], prof.sorted_sigma)
    mr = mean_ratio_sensitive(res)
    top = sensitive_neurons(res)
    assert mr["conv5"] == pytest.approx(res.layers["conv5"].ratio_mean[top["conv5"]].mean())
    fixed = mean_ratio_sensitive(res, sensitive={"conv5": [0], "relu5": [1, 2]}, which="sums")
    assert fixed["relu5"] == pytest.approx(res.layers["relu5"].ratio_of_sums[[1, 2]].mean())


def test_bad_inputs(cnn: nn.Module) -> None:
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(UserError, match="differ in shape"):
        neuron_sensitivity(cnn, (x, x[:1]), ["conv1"])
    with pytest.raises(UserError, match="no pairs"):
        neuron_sensitivity(cnn, [], ["conv1"])
    with pytest.raises(UserError, match="reduction"):
        neuron_sensitivity(cnn, (x, x), ["conv1"], reduction="l2")  # type: ignore[arg-type]
