"""Feature dissection (METHODS §6.1–§6.4, §6.7): the oracles of ρ^bal, γ^bal and the quadrant
rule on a toy table, the percentile sketch against the exact empirical CDF, the depth-stratified
selection (unchanged when one layer is scaled by 1000), γ̂ ≤ ρ̂ on the shipped model, the memoized
entry point and the stage end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from robustdissect.analysis.features import (
    ChannelCDF,
    FeatureOptions,
    balanced_usefulness,
    classify,
    depth_bins,
    layer_quotas,
    permutation_threshold,
    reference_statistics,
    responses,
    robust_usefulness,
    score_features,
    score_units,
    stratified_select,
)
from robustdissect.attacks import FGSM, PGD
from robustdissect.config import RunConfig
from robustdissect.models import default_conv_layers
from robustdissect.pipeline import run_pipeline
from robustdissect.runs import read_table

# -- toy table with hand-computed answers ------------------------------------------------------

Y = torch.tensor([0, 0, 1, 1, 2, 2])
# unit 0: high on class 0. Per class: mean 2 (c=0), 0 (c=1), -1 (c=2)
F0 = torch.tensor([2.0, 2.0, 0.0, 0.0, -1.0, -1.0])


def test_balanced_usefulness_by_hand() -> None:
    rho = balanced_usefulness(F0[:, None], Y, 3)[0]
    # c=0: ½(2 − (0+0−1−1)/4) = 1.25; c=1: ½(0 − (2+2−1−1)/4) = −0.25; c=2: ½(−1 − 1) = −1
    assert torch.allclose(rho, torch.tensor([1.25, -0.25, -1.0]))


def test_robust_usefulness_and_quadrants_by_hand() -> None:
    f_low = torch.tensor([1.0, 0.5, -0.5, -0.5, -1.5, -1.5])
    f_high = torch.tensor([2.5, 2.5, 0.5, 0.5, 0.0, -1.0])
    gamma = robust_usefulness(f_low[:, None], f_high[:, None], Y, torch.tensor([0]))
    # ½(mean(1, 0.5) − mean(0.5, 0.5, 0, −1)) = ½(0.75 − 0) = 0.375
    assert gamma.item() == pytest.approx(0.375)

    # four units: useful & robust, useful & brittle, useless & stable, useless & unstable
    f = torch.stack([F0, F0, 0.1 * F0.flip(0), 0.1 * F0.flip(0)], 1)
    low = torch.stack([f_low, F0 - 3.0, f[:, 2], f[:, 3]], 1)
    high = torch.stack([f_high, F0 + 3.0, f[:, 2], f[:, 3]], 1)
    adv = f + torch.tensor([0.2, 2.0, 0.1, 1.0])  # s = 0.2, 2.0, 0.1, 1.0
    sc = score_units(f, low, high, adv, Y, 3, tau_rho=1.0, tau_s=0.5)
    assert sc.rho[:2].tolist() == pytest.approx([1.25, 1.25])
    assert sc.cls[:2].tolist() == [0, 0]
    assert sc.gamma[0].item() == pytest.approx(0.375)
    # unit 1: ½((−1 − 1)/1 ... ) worst case by 3 on each side: ½((2−3) − (mean of rest + 3)) = ½(−1 − 2.5)
    assert sc.gamma[1].item() == pytest.approx(0.5 * (-1.0 - 2.5))
    assert sc.r[0].item() == pytest.approx(0.3)
    assert sc.s.tolist() == pytest.approx([0.2, 2.0, 0.1, 1.0])
    assert sc.quadrant == ["RU", "NRU", "RL", "NL"]
    assert sc.strict_quadrant == ["NRU", "NRU", "RL", "NL"]  # r = 0.3 < 0.5


def test_quadrant_rule_boundaries() -> None:
    rho = torch.tensor([0.5, 0.5, 0.5, 0.49, 0.49, 0.8])
    gamma = torch.tensor([0.0, 1e-6, 0.25, 0.1, 0.1, 0.4])
    s = torch.tensor([9.0, 9.0, 9.0, 0.25, 0.375, 0.0])
    quad, strict = classify(rho, gamma, s, tau_rho=0.5, tau_s=0.25, strict_r=0.5)
    assert quad == ["NRU", "RU", "RU", "RL", "NL", "RU"]  # ρ = τ_ρ is useful, γ = 0 is not robust, s = τ_s stable
    assert strict == ["NRU", "NRU", "RU", "RL", "NL", "RU"]  # r = γ/ρ ≥ 0.5 exactly passes


def test_permutation_threshold() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (400,), generator=g)
    noise = torch.randn(400, 50, generator=g)
    tau, source = permutation_threshold(noise, y, 10, shuffles=100, seed=0)
    assert source == "permutation"
    real = balanced_usefulness(noise, y, 10).amax(1)
    assert 0.0 < tau < 1.0
    assert float((real > tau).float().mean()) < 0.05  # pure noise rarely beats the null's 99th percentile
    signal = noise.clone()
    signal[:, 0] += 3.0 * (y == 4)
    assert balanced_usefulness(signal, y, 10)[0].amax() > tau
    assert permutation_threshold(noise, y, 10, shuffles=0) == (0.1, "fallback")
    assert permutation_threshold(noise, torch.zeros(400, dtype=torch.long), 10) == (0.1, "fallback")


# -- percentile sketch --------------------------------------------------------------------------


def test_cdf_exact_on_a_small_case() -> None:
    ref = torch.tensor([[0.0, 5.0], [1.0, 5.0], [1.0, 6.0], [3.0, 7.0]])  # ties in both units
    cdf = ChannelCDF(capacity=16)
    cdf.update(ref[:3])
    cdf.update(ref[3:])
    a = torch.tensor([[-1.0, 4.0], [0.0, 5.0], [1.0, 5.5], [2.0, 7.0], [9.0, 6.0]])
    exact = (ref[None, :, :] <= a[:, None, :]).float().mean(1)
    q = cdf.cdf(a)
    assert torch.equal(q, exact)
    assert q.min() >= 0 and q.max() <= 1
    assert q[:, 0].tolist() == [0.0, 0.25, 0.75, 0.75, 1.0]


def test_cdf_sketch_error_bound_and_bounded_memory() -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(20000, 3, generator=g) * torch.tensor([1.0, 10.0, 0.01])
    cap = 256
    cdf = ChannelCDF(capacity=cap)
    for s in range(0, 20000, 500):
        cdf.update(ref[s : s + 500])
        assert cdf.values_held() <= 2 * cap + 1  # fixed memory per unit, whatever n
    assert cdf.n == 20000 and cdf.counts is not None and int(cdf.counts.sum()) == 3 * 20000
    a = torch.quantile(ref, torch.linspace(0, 1, 101), dim=0)  # (101, 3)
    a = torch.cat([a, a.min(0).values[None] - 1, a.max(0).values[None] + 1])
    exact = (ref[None, :, :] <= a[:, None, :]).double().mean(1)
    err = (cdf.cdf(a).double() - exact).abs()
    bound = cdf.error_bound()
    assert bool((err <= bound[None, :] + 1e-6).all())
    assert float(bound.max()) <= 8 / cap  # random order: a few times 1/capacity (edges from the first values)
    # exact at the frozen edges
    assert cdf.edges is not None
    e = cdf.edges[:, ::17].t()
    exact_e = (ref[None, :, :] <= e[:, None, :]).double().mean(1)
    assert torch.allclose(cdf.cdf(e).double(), exact_e, atol=1e-6)


# -- layer selection (§6.4) ----------------------------------------------------------------------


def test_depth_bins_and_quotas() -> None:
    assert depth_bins(6, 3) == [0, 0, 1, 1, 2, 2]  # {conv1–2}, {conv3–4}, {conv5–6}
    assert depth_bins(4, 3) == [0, 0, 1, 2]
    assert depth_bins(2, 3) == [0, 1]
    assert layer_quotas([16, 16], 10) == [5, 5]
    assert layer_quotas([32, 128], 10) == [3, 7]  # √32 : √128 = 1 : 2 → 3.33, 6.67
    assert layer_quotas([2, 100], 10) == [1, 9]  # 1.24 and 8.76: the remainder to the larger fraction
    assert layer_quotas([1, 100], 30) == [1, 29]  # capped at the layer's width, the rest elsewhere
    assert layer_quotas([3, 4], 50) == [3, 4]


def test_stratified_select_picks_per_bin_and_layer() -> None:
    channels = [4, 4, 8, 8, 16, 16]
    score = torch.arange(56, dtype=torch.float32).flip(0)  # earlier units score higher
    picked = stratified_select(score, channels, m=4, bins=3)
    # bin 0: quotas 2 + 2 from layers 0 and 1; bin 1: 2 + 2; bin 2: 2 + 2; each the layer's top units
    assert picked.tolist() == [0, 1, 4, 5, 8, 9, 16, 17, 24, 25, 40, 41]
    per_row = stratified_select(torch.stack([score, -score]), channels, m=2, bins=3)
    assert per_row.shape == (2, 6)
    assert per_row[1].tolist() == [3, 7, 15, 23, 39, 55]


class _Scale(nn.Module):
    def __init__(self, module: nn.Module, factor: float) -> None:
        super().__init__()
        self.module, self.factor = module, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) * self.factor


def test_scaling_one_layer_by_1000_changes_no_selection(fmnist, shipped_vanilla) -> None:
    base = shipped_vanilla.eval()
    scaled = copy.deepcopy(base)
    # conv3 (BN output) ×1000 as the hook sees it; the ReLU output ÷1000, so the logits are unchanged
    scaled.conv3.bn = _Scale(scaled.conv3.bn, 1000.0)
    scaled.conv3.relu = _Scale(scaled.conv3.relu, 1e-3)
    x, y = fmnist.test.x[:200], fmnist.test.y[:200]
    x_ref = fmnist.train.subset(500, seed=0).x
    with torch.no_grad():
        assert torch.allclose(base(x), scaled(x), atol=1e-3)
    layers = default_conv_layers(base, "conv", x[:1])
    selections = []
    for model in (base, scaled):
        ref = reference_statistics(model, x_ref, layers)
        a = responses(model, x, layers)
        f, q = ref.standardise(a), ref.percentile(a)
        rho = balanced_usefulness(f, y, 10).amax(1)
        q_class = torch.stack([q[y == c].mean(0) for c in range(10)])
        selections.append(
            (
                stratified_select(rho, ref.channels, 10).tolist(),
                stratified_select(q, ref.channels, 10).tolist(),
                stratified_select(q_class, ref.channels, 10).tolist(),
                a,
            )
        )
    assert selections[0][:3] == selections[1][:3]
    # the raw magnitudes of conv3 did change: a raw-magnitude ranking would be dominated by it
    a0, a1 = selections[0][3], selections[1][3]
    assert a1[:, 32:64].abs().mean() > 100 * a0[:, 32:64].abs().mean()


# -- on the shipped model -------------------------------------------------------------------------

TINY = FeatureOptions(
    n=80, reference_n=300, feature_steps=3, restarts=2, candidates_per_bin=1, permutations=20, bootstrap=10
)


def test_gamma_upper_bound_below_rho_on_the_shipped_model(fmnist, shipped_vanilla) -> None:
    x, y = fmnist.test.x[:80], fmnist.test.y[:80]
    x_ref = fmnist.train.subset(300, seed=0).x
    layers = default_conv_layers(shipped_vanilla, "conv", x[:1])
    attacks = [PGD(0.1, steps=5, seed=0), FGSM(0.1)]
    res = score_features(shipped_vanilla, x, y, x_ref, layers, TINY, model_attacks=attacks, num_classes=10)
    sc = res.scores
    assert sc.rho.shape == sc.gamma.shape == (224,)
    assert bool((sc.gamma <= sc.rho + 1e-5).all())  # γ̂ ≤ ρ̂ per unit (the clean point is in the set)
    assert bool((res.f_low <= res.f_clean).all()) and bool((res.f_high >= res.f_clean).all())
    assert res.q.min() >= 0 and res.q.max() <= 1
    assert res.candidates.numel() == 3  # one per depth bin
    assert [res.bins[int(res.layer_of[u])] for u in res.candidates.tolist()] == [0, 1, 2]
    assert set(sc.quadrant) <= {"RU", "NRU", "RL", "NL"}
    # the feature-targeted attack lowers its unit's f on class c* below what PGD on CE and FGSM reach
    no_feature = score_features(
        shipped_vanilla, x, y, x_ref, layers, FeatureOptions(**{**TINY.__dict__, "candidates_per_bin": 0}),
        model_attacks=attacks, num_classes=10,
    )  # fmt: skip
    for u in res.candidates.tolist():
        assert sc.gamma[u] < no_feature.scores.gamma[u]
        mask = y == sc.cls[u]
        assert res.f_low[mask, u].mean() < no_feature.f_low[mask, u].mean()
    rows = res.rows()
    assert len(rows) == 224 and sum(r["feature_attacked"] for r in rows) == 3
    assert sum(r["units"] for r in res.layer_rows()) == 224
    assert sum(res.shares().values()) == pytest.approx(1.0)
    reliance = res.reliance()
    assert sum(reliance.values()) == pytest.approx(1.0)
    imp = res.phi.abs().mean(0)
    ru = [i for i, q in enumerate(sc.quadrant) if q == "RU"]
    assert reliance["RU"] == pytest.approx(float(imp[ru].sum() / imp.sum()), rel=1e-5)
    assert res.top_units_per_image.shape == (80, 30) and res.top_units_per_class.shape == (10, 30)


def test_stage_end_to_end(tmp_path: Path, fmnist) -> None:
    opts = {**TINY.__dict__, "n": None, "compare": ["fmnist-smallcnn-pat"], "batch_size": 100}
    cfg = RunConfig(n=60, quick=False, stages={"overview": {}, "features": opts})
    run = run_pipeline(cfg, tmp_path / "run")
    res = json.loads((run / "results.json").read_text())
    entry = res["stages"]["features"]
    assert "upper bound" in entry["text"]
    assert entry["models"] == ["fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat"]
    units = read_table(run / "tables" / "feature_units.csv")
    assert len(units) == 2 * 224
    assert all(float(r["gamma"]) <= float(r["rho"]) + 1e-5 for r in units)
    quads = read_table(run / "tables" / "feature_quadrants.csv")
    for model in entry["models"]:
        rows = [r for r in quads if r["model"] == model]
        assert sum(float(r["share"]) for r in rows) == pytest.approx(1.0)
        assert all(0.0 <= float(r["ci_low"]) <= float(r["ci_high"]) <= 1.0 for r in rows)
        assert sum(float(r["importance_share"]) for r in rows) == pytest.approx(1.0, abs=1e-4)
    pat = [r for r in quads if r["model"] == "fmnist-smallcnn-pat"]
    assert all(r["diff_ci_low"] != "" for r in pat)
    per_image = read_table(run / "tables" / "feature_top_units_per_image.csv")
    assert len(per_image) == 20 * 30 and all(0.0 <= float(r["q"]) <= 1.0 for r in per_image)
    for name in ("feature_rho_gamma", "feature_quadrant_shares", "feature_model_shares"):
        assert (run / "figures" / f"{name}.png").is_file()
    assert entry["tau_rho"] > 0
    assert res["evidence"]["misses"]["features"] == 2  # one computation per model


def test_feature_scores_is_computed_once_per_run(tmp_path: Path, fmnist) -> None:
    from robustdissect.pipeline import Context, prepare
    from robustdissect.stages.common import feature_scores, stage_feature_options
    from robustdissect.store import EvidenceStore

    opts = {**TINY.__dict__, "n": 40, "candidates_per_bin": 0, "compare": []}
    cfg = RunConfig(n=50, quick=False, stages={"overview": {}, "features": opts})
    p = prepare(cfg)
    ctx = Context(cfg, None, p.model, p.card, p.data, p.device, EvidenceStore(tmp_path / "evidence"))  # type: ignore[arg-type]
    assert stage_feature_options(ctx).n == 40  # another stage gets the features stage's options
    first = feature_scores(ctx)
    again = feature_scores(ctx)
    assert again is first
    assert ctx.store.misses["features"] == 1 and ctx.store.hits["features"] == 1
    assert first.y.shape == (40,)
    assert ctx.store.misses["adv"] == 2  # model-level PGD and FGSM, stored once


def test_cli_refuses_bad_input_before_any_work(tmp_path: Path, cli) -> None:
    for i, (args, needle, before_work) in enumerate(
        (
            (["--compare", "no-such-checkpoint"], "no-such-checkpoint", True),
            (["--eps", "-1"], "eps", True),
            (["--layers", "conv99"], "conv99", True),  # checked against the model before any stage runs
        )
    ):
        out = tmp_path / f"run{i}"
        code, _, err = cli(["features", "--n", "20", "--out", str(out), *args])
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("robustdissect: error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
        assert not out.exists()
        assert out.with_name(f"run{i}.partial").exists() is not before_work


def test_joining_stages_get_reduced_budgets_without_a_features_stage() -> None:
    from types import SimpleNamespace

    from robustdissect.analysis.features import QUICK_FEATURES
    from robustdissect.stages.common import stage_feature_options

    for quick in (True, False):
        ctx = SimpleNamespace(config=RunConfig(quick=quick, stages={"overview": {}}))
        opts = stage_feature_options(ctx)  # type: ignore[arg-type]
        assert opts.n == QUICK_FEATURES["n"] and opts.feature_steps == QUICK_FEATURES["feature_steps"]
    full = SimpleNamespace(config=RunConfig(quick=False, stages={"features": {}}))
    assert stage_feature_options(full).feature_steps == FeatureOptions().feature_steps  # type: ignore[arg-type]
