"""E1-E4, E6-E8 experiment functions on tiny models with worked numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from robustdissect.analysis.importance import (
    class_important_neurons,
    contributions,
    cross_target_overlap,
    final_linear,
    important_neurons,
    sensitivity_vs_importance,
)
from robustdissect.analysis.pairs import attack_pairs, targeted_pair_sets
from robustdissect.analysis.roi import regions_of_interest
from robustdissect.analysis.sensitivity import (
    compare_models,
    ratio_sweep,
    sensitive_neurons,
    sensitivity_under_attack,
)
from robustdissect.analysis.suppression import random_non_sensitive, suppression_experiment
from robustdissect.errors import UserError
from robustdissect.models import build_model
from robustdissect.probe import record


@dataclass(frozen=True)
class _Result:
    x_adv: torch.Tensor


class _Noise:
    """Attack stand-in: x + scale·N(0, 1), seeded; records how it was called."""

    def __init__(self, scale: float, clip: bool = True) -> None:
        self.scale, self.clip = scale, clip
        self.calls: list[tuple[int | None, torch.Tensor | None, int]] = []

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> _Result:
        hooks = sum(len(m._forward_hooks) for m in model.modules())
        self.calls.append((seed, targets, hooks))
        g = torch.Generator().manual_seed(0 if seed is None else seed)
        xa = x + self.scale * torch.randn(x.shape, generator=g)
        return _Result(xa.clamp(0, 1) if self.clip else xa)


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("smallcnn", width=4).eval()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)


# ---------------------------------------------------------------------------- E1


def _linear_model() -> nn.Module:
    fc = nn.Linear(4, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]))
        fc.bias.zero_()
    return nn.Sequential(nn.Flatten(), fc)


def _img(v: list[float]) -> torch.Tensor:
    return torch.tensor(v).view(1, 1, 2, 2)


def test_e1_worked_example() -> None:
    model = _linear_model()
    x = torch.cat([_img([0.5, 0.25, 0, 0]), _img([0.125, 0.625, 0.125, 0]), _img([0.875, 0, 0, 0])])
    xa = torch.cat([
        _img([0.5, 0.25, 0.375, 0.375]),  # -> class 2
        _img([0.125, 0.375, 0.125, 0.5]),  # -> class 2
        _img([0.75, 0, 0.125, 0.125]),  # stays class 0: dropped
    ])  # fmt: skip
    res = sensitivity_vs_importance(model, {2: (x, xa)}, ks=[2, 1])
    t = res.targets[2]
    assert t.n_pairs == 2 and res.layer == "1:input" and res.fc == "1"
    assert t.sigma.tolist() == [0.0, 0.125, 0.1875, 0.4375]
    assert t.mean_phi.tolist() == [0.0, 0.0, 0.25, 0.4375]
    assert t.votes[2].tolist() == [0.0, 0.0, 3.0, 3.0]  # Π = [2, 3] and [3, 2]
    assert t.omega[2].tolist() == [3, 2] and t.gamma[2].tolist() == [3, 2]
    assert t.levenshtein[2] == 1.0
    # importance order 3, 2, 0, 1 (ties by mean φ, then index) vs σ order 3, 2, 1, 0
    assert t.spearman[2] == pytest.approx(0.8)
    assert t.gamma[1].tolist() == [3] and t.omega[1].tolist() == [3]
    rows = {r["k"]: r for r in res.rows}
    assert rows[2]["omega"] == "3 2" and rows[2]["jaccard"] == 1.0
    assert res.summary[0]["spearman_mean"] == pytest.approx(0.8)
    raw = sensitivity_vs_importance(model, {2: (x, xa)}, ks=[2], tie_break="none")
    assert raw.targets[2].spearman[2] == pytest.approx(4 / math.sqrt(20))
    # a named penultimate layer gives the same numbers
    named = sensitivity_vs_importance(model, {2: (x, xa)}, ks=[2], layer="0", fc="1")
    assert named.targets[2].spearman[2] == pytest.approx(0.8)
    with pytest.raises(UserError, match="no successful"):
        sensitivity_vs_importance(model, {0: (x[:2], xa[:2])}, ks=[2])


def test_phi_and_important_neurons() -> None:
    feats = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 1.0]])
    w = torch.tensor([[1.0, 1.0, -1.0], [0.5, 0.5, 0.5]])
    phi = contributions(feats, w, 0)
    assert phi.tolist() == [[1.0, 2.0, -3.0], [3.0, 0.0, -1.0]]
    assert contributions(feats, w, torch.tensor([0, 1])).tolist()[1] == [1.5, 0.0, 0.5]
    assert important_neurons(phi, 2).tolist() == [[1, 0], [0, 1]]
    gamma, votes, _mean_phi = class_important_neurons(phi, 2)
    assert votes.tolist() == [3.0, 3.0, 0.0]
    assert gamma.tolist() == [0, 1]  # tie on votes: mean φ 2.0 > 1.0
    with pytest.raises(UserError):
        contributions(feats, w[:, :2], 0)
    name, fc = final_linear(build_model("smallcnn", width=4))
    assert name == "fc1" and fc.in_features == 16


def test_e1_on_cnn_with_attack_pairs(cnn: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    attack = _Noise(0.3)
    with torch.no_grad():
        pred = cnn(x).argmax(1)
    # make every pair "successful" towards the class the model predicts for the noisy input
    pairs = {}
    for t in range(10):
        batches = list(attack_pairs(cnn, x, y, attack, targets=t, keep="success", batch_size=8))
        if batches:
            pairs[t] = batches
    assert pairs, "the random model predicts at least one class"
    res = sensitivity_vs_importance(cnn, pairs, ks=[3])
    for t in pairs:
        ti = res.targets[t]
        assert ti.sigma.shape == (16,) and np.isfinite(ti.sigma).all()
        assert len(ti.gamma[3]) == 3 and len(ti.omega[3]) == 3
        # Ω is the top 3 by σ; with substitutions costing 2, S_ω(Γ, Ω) = 2 LCS / (3 + 3)
        assert sorted(ti.omega[3].tolist()) == sorted(np.argsort(-ti.sigma, kind="stable")[:3].tolist())
        assert ti.levenshtein[3] == pytest.approx(_lcs(ti.gamma[3].tolist(), ti.omega[3].tolist()) / 3)
    assert {r["target"] for r in res.rows} == set(pairs)
    assert pred.shape == (16,)


# ---------------------------------------------------------------------------- pairs


def test_attack_pairs_targets_seeds_and_success(cnn: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    attack = _Noise(0.2)
    batches = list(attack_pairs(cnn, x, y, attack, targets=3, batch_size=6, seed=10))
    assert [c[0] for c in attack.calls] == [10, 11, 12]
    assert all(c[1] is not None and bool((c[1] == 3).all()) for c in attack.calls)
    assert sum(b[0].shape[0] for b in batches) == 16
    sets = targeted_pair_sets(cnn, x, y, _Noise(0.2), targets=[1, 4], batch_size=6)
    for t, bs in sets.items():
        for xb, xa, yb in bs:
            assert bool((yb != t).all())
            with torch.no_grad():
                assert bool((cnn(xa).argmax(1) == t).all())
            assert xb.shape == xa.shape


# ---------------------------------------------------------------------------- E3


def _shift_pairs(first: int, second: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(2, 20, 1, 1)
    xa = x.clone()
    xa[:, first] += 0.5
    xa[:, second] += 0.25
    return x, xa


def test_e3_worked_example() -> None:
    model = nn.Sequential(nn.Identity(), nn.Flatten())
    pairs = {0: _shift_pairs(0, 1), 1: _shift_pairs(1, 2), 2: _shift_pairs(1, 0)}
    res = cross_target_overlap(model, pairs, ["0"], only_success=False)
    assert {t: v.tolist() for t, v in res.omega["0"].items()} == {0: [0, 1], 1: [1, 2], 2: [1, 0]}
    row = res.rows[0]
    assert row["k"] == 2 and row["targets"] == 3 and row["min_pairs"] == 2
    assert row["total_jaccard"] == pytest.approx(1 / 3)
    assert row["levenshtein_avg"] == pytest.approx(0.5)
    res1 = cross_target_overlap(model, pairs, ["0"], only_success=False, sub_cost=1)
    assert res1.rows[0]["levenshtein_avg"] == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    with pytest.raises(UserError, match="two targets"):
        cross_target_overlap(model, {0: pairs[0]}, ["0"])


def test_e3_on_cnn(cnn: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _y = data
    xa = (x + 0.2).clamp(0, 1)
    pairs = {0: (x[:8], xa[:8]), 1: (x[8:], xa[8:])}
    res = cross_target_overlap(cnn, pairs, only_success=False)
    assert [r["layer"] for r in res.rows] == [f"conv{i}" for i in range(1, 7)]
    for r in res.rows:
        a, b = (set(res.omega[r["layer"]][t].tolist()) for t in (0, 1))
        assert len(a) == len(b) == r["k"]
        assert r["total_jaccard"] == pytest.approx(len(a & b) / len(a | b))
    # the same pairs for both targets: identical sensitive sets and sequences
    same = cross_target_overlap(cnn, {0: pairs[0], 1: pairs[0]}, only_success=False)
    assert all(r["total_jaccard"] == 1.0 and r["levenshtein_avg"] == 1.0 for r in same.rows)
    # channels 0-1 moved for target 0, channels 2-3 for target 1: disjoint sets
    model = nn.Sequential(nn.Identity(), nn.Flatten())
    apart = {0: _shift_pairs(0, 1), 1: _shift_pairs(2, 3)}
    row = cross_target_overlap(model, apart, ["0"], only_success=False).rows[0]
    assert row["total_jaccard"] == 0.0 and row["levenshtein_avg"] == 0.0


def _lcs(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence (textbook dynamic programme)."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, ai in enumerate(a, start=1):
        for j, bj in enumerate(b, start=1):
            d[i][j] = d[i - 1][j - 1] + 1 if ai == bj else max(d[i - 1][j], d[i][j - 1])
    return d[-1][-1]


# ---------------------------------------------------------------------------- E4


def test_e4_suppression_table(cnn: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    layers = [f"relu{i}" for i in range(1, 4)]
    res = sensitivity_under_attack(cnn, x, y, _Noise(0.1), layers)
    top = sensitive_neurons(res)
    attack = _Noise(0.1)
    out = suppression_experiment(
        cnn, x, y, top, attacks={"noise": attack}, betas=(1.0, 0.5), draws=3, seed=1,
        transfer=True, batch_size=8,
    )  # fmt: skip
    # (1 sensitive + 3 random) × (clean, whitebox, transfer) per β
    assert len(out.rows) == 2 * 4 * 3
    summary = {(r["beta"], r["group"], r["mode"]): r for r in out.summary}
    assert summary[(0.5, "random", "clean")]["draws"] == 3
    base = [r["accuracy"] for r in out.rows if r["beta"] == 1.0 and r["mode"] == "clean"]
    assert len(set(base)) == 1
    for sel in out.selections["random"]:
        for name, idx in sel.items():
            assert len(idx) == len(top[name])
            assert not set(idx.tolist()) & set(top[name].tolist())
    # white-box examples were crafted on the suppressed model (hooks present) for β < 1
    assert any(c[2] > 0 for c in attack.calls) and any(c[2] == 0 for c in attack.calls)
    again = suppression_experiment(
        cnn, x, y, top, attacks={"noise": _Noise(0.1)}, betas=(1.0, 0.5), seed=1, batch_size=8
    )
    assert again.rows == out.rows
    assert sum(len(m._forward_hooks) for m in cnn.modules()) == 0


def test_e4_suppression_changes_predictions() -> None:
    fc = nn.Linear(2, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        fc.bias.copy_(torch.tensor([0.0, 0.3]))
    model = nn.Sequential(nn.Flatten(), nn.ReLU(), fc)
    x = torch.tensor([[[[1.0, 0.5]]], [[[0.1, 0.9]]]])
    y = torch.tensor([0, 1])
    out = suppression_experiment(model, x, y, {"1": [0]}, betas=(1.0, 0.2), draws=1)
    acc = {(r["beta"], r["group"]): r["accuracy"] for r in out.rows}
    assert acc[(1.0, "sensitive")] == 1.0
    assert acc[(0.2, "sensitive")] == 0.5  # 0.2 < 0.5 + 0.3: the first image flips to class 1
    assert acc[(0.2, "random")] == 1.0  # channel 1 scaled: class 1 still wins on image 2


def test_random_non_sensitive_is_seeded() -> None:
    a = random_non_sensitive({"l": [0, 1]}, {"l": 10}, draws=3, seed=4)
    b = random_non_sensitive({"l": [0, 1]}, {"l": 10}, draws=3, seed=4)
    assert [d["l"].tolist() for d in a] == [d["l"].tolist() for d in b]
    assert all(len(d["l"]) == 2 and d["l"].min() >= 2 for d in a)
    small = random_non_sensitive({"l": [0, 1, 2]}, {"l": 4}, draws=1)
    assert small[0]["l"].tolist() == [3]


# ---------------------------------------------------------------------------- E2


def test_e2_regions_of_interest(cnn: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = data
    xa = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    sigma = np.array([0.4, 0.1, 0.3, 0.2])
    roi = regions_of_interest(cnn, x, xa, "pool1", sigma, n_neurons=2, n_images=3, batch_size=5)
    assert roi.neurons.tolist()[:2] == [0, 2] and roi.kinds == ["sensitive"] * 2 + ["vanilla"] * 2
    assert roi.maps.shape == (4, 3, 28, 28) and roi.images.shape == (4, 3, 1, 28, 28)
    with record(cnn, ["pool1"]) as rec:
        cnn(x)
    acts = rec.outputs["pool1"]
    for i, m in enumerate(roi.neurons.tolist()):
        best = acts[:, m].flatten(1).amax(1).sort(descending=True, stable=True).indices[:3]
        assert roi.image_index[i].tolist() == best.tolist()
        assert np.array_equal(roi.images[i], x[best].numpy())
        vals = acts[:, m].flatten().double().sort().values
        j = int(0.995 * vals.numel())
        span = float(vals[-1] - vals[0]) / 4096
        assert vals[j - 1] - span - 1e-9 <= roi.thresholds[i] <= vals[j + 1] + span + 1e-9
    assert np.array_equal(roi.masks, roi.maps > roi.thresholds[:, None, None, None])
    same = regions_of_interest(cnn, x, x, "pool1", sigma, n_neurons=1, n_images=2, rank_by="mean")
    assert np.all(same.iou == 1.0) and np.array_equal(same.maps, same.maps_adv)
    assert len(roi.rows()) == 12 and {"iou", "area_adv"} <= set(roi.rows()[0])


# ---------------------------------------------------------------------------- E6-E8


def test_ratio_sweep_scales_linearly_before_relu(cnn: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    attacks = {1.0: _Noise(0.05, clip=False), 2.0: _Noise(0.1, clip=False)}
    sweep = ratio_sweep(cnn, x, y, attacks, ["conv1", "relu1"], family="noise", k=2)
    assert len(sweep.rows) == 4
    r = {(row["strength"], row["layer"]): row for row in sweep.rows}
    # conv1 (BN output) is affine in x, so doubling the noise doubles σ and the ratio of sums
    s1, s2 = sweep.results[1.0].layers["conv1"], sweep.results[2.0].layers["conv1"]
    assert np.allclose(s2.sigma, 2 * s1.sigma, rtol=1e-4)
    assert np.allclose(s2.ratio_of_sums, 2 * s1.ratio_of_sums, rtol=1e-4)
    assert r[(2.0, "relu1")]["hook"] == "relu" and r[(1.0, "conv1")]["family"] == "noise"
    fixed = ratio_sweep(cnn, x, y, attacks, ["conv1"], sensitive={"conv1": [0]})
    assert fixed.rows[0]["ratio_mean_sensitive"] == pytest.approx(fixed.results[1.0].layers["conv1"].ratio_mean[0])


def test_compare_models(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    torch.manual_seed(1)
    models = {"a": build_model("smallcnn", width=4), "b": build_model("smallcnn", width=4)}
    cmp = compare_models(models, x[:6], y[:6], _Noise(0.1), ["conv2", "relu6"])
    assert {r["model"] for r in cmp.rows} == {"a", "b"}
    assert len(cmp.summary) == 4 and len(cmp.rows) == 2 * (4 + 16)
    assert set(cmp.profiles()["b"]) == {"conv2", "relu6"}
