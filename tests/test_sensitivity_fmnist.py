"""Sensitivity analyses end to end: shipped Fashion-MNIST model, real test images, real attacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from torch import nn

from robustdissect.analysis.importance import sensitivity_vs_importance
from robustdissect.analysis.pairs import targeted_pair_sets
from robustdissect.analysis.sensitivity import sensitive_neurons, sensitivity_under_attack
from robustdissect.analysis.suppression import accuracy, suppression_experiment
from robustdissect.attacks import PGD, GaussianNoise
from robustdissect.data import Dataset


@pytest.fixture(scope="module")
def subset(fmnist: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    split = fmnist.test.subset(96, seed=0)
    return split.x, split.y


def test_sigma_under_pgd(shipped_vanilla: nn.Module, subset: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = subset
    layers = [f"conv{i}" for i in range(1, 7)] + [f"relu{i}" for i in range(1, 7)]
    res = sensitivity_under_attack(shipped_vanilla, x, y, PGD(eps=0.1, steps=5), layers, batch_size=48)
    assert res.n == 96
    assert [res.layers[f"conv{i}"].channels for i in range(1, 7)] == [16, 16, 32, 32, 64, 64]
    for row in res.summary_rows():
        assert np.isfinite(row["sigma_mean"]) and row["sigma_mean"] > 0
        sigma = np.sort(res.layers[row["layer"]].sigma)[::-1]
        k = row["k"]
        assert row["top_gap"] == pytest.approx(sigma[:k].mean() / sigma[k:].mean(), rel=1e-9)
        assert sigma[k - 1] > sigma[k]  # the top 10% stand out: a gap > 1 is not a matter of ties
        assert np.isfinite(row["ratio_mean_sensitive"])
    noise = sensitivity_under_attack(shipped_vanilla, x, y, GaussianNoise(3, scale="fmnist"), ["conv6"])
    assert noise.layers["conv6"].sigma.mean() > 0


def test_e1_with_targeted_pgd(shipped_vanilla: nn.Module, subset: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = subset
    pairs = targeted_pair_sets(shipped_vanilla, x[:48], y[:48], PGD(eps=0.1, steps=5), targets=[0, 7])
    res = sensitivity_vs_importance(shipped_vanilla, pairs, ks=[10])
    assert res.fc == "fc1" and res.layer == "fc1:input"
    for t in (0, 7):
        ti = res.targets[t]
        assert ti.n_pairs > 0 and ti.sigma.shape == (64,)
        # The importance ranking: Borda votes descending, ties by mean φ descending, then by index.
        order = np.lexsort((np.arange(64), -ti.mean_phi, -ti.votes[10]))
        assert ti.gamma[10].tolist() == order[:10].tolist()
        importance = np.empty(64)
        importance[order] = np.arange(64, 0, -1)
        # Spearman = Pearson correlation of the (average) ranks of σ and of importance
        expected = np.corrcoef(rankdata(ti.sigma), rankdata(importance))[0, 1]
        assert ti.spearman[10] == pytest.approx(expected, abs=1e-12)
        # substitutions cost 2: S_ω(Γ, Ω) = 2 LCS / (10 + 10)
        assert ti.levenshtein[10] == pytest.approx(_lcs(ti.gamma[10].tolist(), ti.omega[10].tolist()) / 10)


def _lcs(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence (textbook dynamic programme)."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, ai in enumerate(a, start=1):
        for j, bj in enumerate(b, start=1):
            d[i][j] = d[i - 1][j - 1] + 1 if ai == bj else max(d[i - 1][j], d[i][j - 1])
    return d[-1][-1]


def test_e4_beta_one_matches_model(shipped_vanilla: nn.Module, subset: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = subset
    res = sensitivity_under_attack(shipped_vanilla, x, y, PGD(eps=0.1, steps=3), hook="relu")
    top = sensitive_neurons(res)
    assert list(top) == [f"relu{i}" for i in range(1, 7)]
    out = suppression_experiment(shipped_vanilla, x, y, top, betas=(1.0, 0.0), draws=1)
    acc = {(r["beta"], r["group"]): r["accuracy"] for r in out.rows}
    assert acc[(1.0, "sensitive")] == accuracy(shipped_vanilla, x, y) > 0.5
    assert acc[(0.0, "sensitive")] < acc[(1.0, "sensitive")]
