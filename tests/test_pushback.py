"""Back-perturbation, purification (BPDA) and the D_bp criterion (METHODS §6.5, §6.6, §6.7)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CHECKER, SIZE, Planted, planted_data

from robustdissect.analysis.features import FeatureOptions, score_features
from robustdissect.analysis.pushback import (
    Purified,
    UnitSets,
    back_perturb,
    dbp_criterion,
    evaluate_purification,
    purification_verdict,
    reliance_shift,
    transition_matrix,
)
from robustdissect.attacks import PGD
from robustdissect.errors import UserError


def test_planted_units_fall_in_their_quadrants_and_the_dbp_criterion_holds() -> None:
    torch.manual_seed(0)
    model = Planted().eval()
    x, y = planted_data(200, seed=1)
    x_ref, _ = planted_data(400, seed=2)
    opts = FeatureOptions(feature_steps=20, restarts=1, candidates_per_bin=1, depth_bins=1, permutations=100,
                          bootstrap=0, top_m=1)  # fmt: skip
    fs = score_features(model, x, y, x_ref, ["feat"], opts, num_classes=2)
    assert fs.scores.quadrant == ["RU", "NRU"]
    sets = UnitSets.from_scores(fs)
    assert sets.brittle.tolist() == [1] and sets.robust.tolist() == [0]

    x_bp = back_perturb(model, x, sets, eps=0.1, steps=50, alpha=0.01)
    assert float((x_bp - x).abs().max()) <= 0.1 + 1e-6
    assert float(x_bp.min()) >= 0.0 and float(x_bp.max()) <= 1.0
    crit = dbp_criterion(model, x, x_bp, y, sets, fs.scores.tau_rho, num_classes=2)
    assert float(crit.rho_b[0]) > 0.9  # perfectly class-separating before
    assert abs(float(crit.rho_b_bp[0])) < fs.scores.tau_rho
    assert float(crit.rho_r_bp[0]) >= 0.8 * float(crit.rho_r[0])
    assert crit.holds and crit.share_b_ok == 1.0 and crit.share_r_ok == 1.0


def test_without_the_robust_term_the_robust_unit_may_drift_but_brittle_target_is_met() -> None:
    model = Planted().eval()
    x, _ = planted_data(64, seed=3)
    mu = torch.tensor([0.5, 0.0])
    sd = torch.tensor([0.2, 0.05])
    sets = UnitSets(["feat"], [2], torch.tensor([1]), torch.tensor([0]), mu, sd, torch.zeros(1))
    x_bp = back_perturb(model, x, sets, eps=0.1, steps=50, alpha=0.01, lambda_r=1.0)
    coef = (x_bp[:, 0] * CHECKER).mean((1, 2))
    assert float(coef.abs().max()) < 0.01  # the ±0.05 checkerboard is neutralised
    left = x_bp[:, 0, :, : SIZE // 2].mean((1, 2))
    assert torch.allclose(left, x[:, 0, :, : SIZE // 2].mean((1, 2)), atol=0.01)


def test_purified_forward_uses_x_bp_and_backward_is_the_identity() -> None:
    model = Planted().eval()
    x, _ = planted_data(8, seed=4)
    sets = UnitSets(["feat"], [2], torch.tensor([1]), torch.tensor([0]), torch.tensor([0.5, 0.0]),
                    torch.tensor([0.2, 0.05]), torch.zeros(1))  # fmt: skip
    pur = Purified(model, sets, steps=20)
    x_bp = back_perturb(model, x, sets, steps=20)
    xg = x.clone().requires_grad_(True)
    out = pur(xg)
    assert torch.allclose(out, model(x_bp), atol=1e-6)
    (g,) = torch.autograd.grad(out[:, 1].sum(), xg)
    xb = x_bp.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(model(xb)[:, 1].sum(), xb)
    assert torch.allclose(g, g_ref, atol=1e-6)
    assert not model.feat._forward_hooks  # no hook survives


def test_purification_helps_non_adaptive_only_on_the_planted_model() -> None:
    """The model relies on the brittle unit; purification removes it, so the clean point is
    classified by the robust unit. Its head, though, reads both units at the purified point, which
    the adaptive attacker exploits through BPDA."""
    model = Planted().eval()
    x, y = planted_data(64, seed=5)
    sets = UnitSets(["feat"], [2], torch.tensor([1]), torch.tensor([0]), torch.tensor([0.5, 0.0]),
                    torch.tensor([0.2, 0.05]), torch.zeros(1))  # fmt: skip
    x_adv = PGD(0.1, steps=10, alpha=0.02, random_start=False)(model, x, y).x_adv
    res = evaluate_purification(model, x, y, x_adv, PGD(0.1, steps=10, alpha=0.02, random_start=False), sets,
                                steps=30)  # fmt: skip
    assert res.clean == 1.0 and res.clean_purified == 1.0
    assert res.attacked < 0.2
    assert res.attacked_purified > res.attacked
    assert all(lo <= getattr(res, k) <= hi for k, (lo, hi) in res.intervals.items())
    assert "non-adaptive" in purification_verdict(0.1, 0.9, 0.1, 0.05)
    assert purification_verdict(0.1, 0.9, 0.8, 0.05).startswith("purification raises accuracy against both")


def test_reliance_shift_and_transition_matrix_known_answers() -> None:
    imp = torch.tensor([1.0, 3.0, 0.0, 4.0])
    assert reliance_shift(imp, ["RU", "NRU", "RU", "RL"]) == pytest.approx(1 / 8)
    assert math.isnan(reliance_shift(torch.zeros(2), ["RU", "NL"]))
    m = transition_matrix(["NRU", "NRU", "RU", "NL"], ["RU", "NRU", "RU", "RL"])
    assert m[1, 0] == 1 and m[1, 1] == 1 and m[0, 0] == 1 and m[3, 2] == 1 and int(m.sum()) == 4


def test_stage_shows_the_shipped_results_without_recomputing(tmp_path: Path, fmnist: Any) -> None:
    from robustdissect.config import RunConfig
    from robustdissect.models import shipped_checkpoints
    from robustdissect.pipeline import run_pipeline
    from robustdissect.runs import read_table
    from robustdissect.stages.pushback import COMPARE, shipped_pushback

    shipped = shipped_pushback()
    assert shipped is not None, "results/pushback-fmnist.json is not shipped"
    assert {"purification", "criterion", "reliance", "verdict"} <= set(shipped)
    cfg = RunConfig(model="fmnist-smallcnn-vanilla", n=20, quick=True, stages={"overview": {}, "pushback": {}})
    t = time.perf_counter()
    run = run_pipeline(cfg, tmp_path / "run")
    assert time.perf_counter() - t < 60
    res = json.loads((run / "results.json").read_text())["stages"]["pushback"]
    assert res["pushback"]["verdict"] == shipped["verdict"]
    rows = read_table(run / "tables" / "pushback_purification.csv")
    assert len(rows) == 5 and all(float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"]) for r in rows)
    assert res["text"].startswith("Shipped results for fmnist-smallcnn-vanilla on Fashion-MNIST")
    # the run's model is not attacked: the only attacks are one per shipped model trained on a built set
    from robustdissect.stages.pushback import DATA_MODELS

    shipped_data = [m for m in DATA_MODELS.values() if m in shipped_checkpoints()]
    assert len(list((run / "evidence").glob("adv/*"))) == len(shipped_data)
    data_rows = read_table(run / "tables" / "pushback_datasets.csv") if shipped_data else []
    assert [r["model"] for r in data_rows] == shipped_data
    # reliance shift with both importances and bootstrap intervals, for vanilla, PAT and SNS at least
    rel = {r["model"]: r for r in read_table(run / "tables" / "pushback_reliance.csv")}
    assert {"fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat", "fmnist-smallcnn-sns"} <= set(rel)
    for r in rel.values():
        for imp in ("phi", "ablation"):
            assert float(r[f"rs_{imp}_lo"]) <= float(r[f"rs_{imp}"]) <= float(r[f"rs_{imp}_hi"]), (r["model"], imp)
    assert float(rel["fmnist-smallcnn-pat"]["rs_phi_diff_lo"]) > 0  # paired difference to vanilla
    # transitions only for fine-tuned models, from the model each was fine-tuned from
    trans = shipped["transitions"]
    assert trans["fmnist-smallcnn-sns-from-vanilla"]["from"] == "fmnist-smallcnn-vanilla"
    assert all(t["from"] != "fmnist-smallcnn-vanilla" or n != "fmnist-smallcnn-pat-ft" for n, t in trans.items())
    assert all(sum(map(sum, t["matrix"])) == 224 for t in trans.values())
    assert (run / "figures" / "pushback_transitions.png").is_file()
    # a compared model that is not shipped is named in a warning, not silently dropped
    missing = [m for m in COMPARE if m not in shipped_checkpoints() and m not in rel]
    assert all(any(m in w for w in res["warnings"]) for m in missing)


# -- reliance shift with both importances (§6.6) ---------------------------------------------


def test_ablation_importance_matches_the_unit_ablation_of_concepts(fmnist: Any, shipped_vanilla: Any) -> None:
    from robustdissect.analysis.concepts import unit_ablation
    from robustdissect.analysis.pushback import ablation_predictions, ba_drop_importance

    x, y = fmnist.test.x[:60], fmnist.test.y[:60]
    preds = ablation_predictions(shipped_vanilla, x, ["conv6"], [64])
    assert preds.shape == (65, 60)
    imp = ba_drop_importance(preds, y, 10)
    ref = unit_ablation(shipped_vanilla, x, y, "conv6", num_classes=10)
    assert torch.allclose(imp, ref.drop.nanmean(1).clamp_min(0), atol=1e-12)
    assert bool((imp >= 0).all()) and float(imp.max()) > 0


def test_ba_drop_by_hand_and_bootstrap_weights() -> None:
    from robustdissect.analysis.pushback import ba_drop_importance

    y = torch.tensor([0, 0, 1, 1])
    base = torch.tensor([0, 0, 1, 1])  # perfect: BA = 1 for both classes
    u0 = torch.tensor([1, 0, 1, 1])  # one class-0 image lost: BA_0 = (1/2 + 1)/2, BA_1 = (1 + 1/2)/2
    u1 = torch.tensor([0, 0, 1, 1])  # no change
    imp = ba_drop_importance(torch.stack([base, u0, u1]), y, 2)
    assert imp.tolist() == pytest.approx([0.25, 0.0])
    # weights: image 0 counted twice, image 1 dropped → unit 0 loses both copies of image 0
    w = torch.tensor([[2.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    boot = ba_drop_importance(torch.stack([base, u0, u1]), y, 2, w)
    assert boot[0].tolist() == pytest.approx([0.5, 0.0]) and boot[1].tolist() == pytest.approx([0.25, 0.0])


def test_reliance_bootstrap_points_intervals_and_paired_differences() -> None:
    from robustdissect.analysis.pushback import reliance_bootstrap, reliance_rows

    g = torch.Generator().manual_seed(0)
    n, k = 120, 3
    y = torch.arange(n) % k
    phi = torch.rand(n, 4, generator=g) * torch.tensor([3.0, 1.0, 0.0, 0.0])  # units 2, 3 carry nothing
    base = y.clone()
    preds = torch.stack([base, (y + 1) % k, base, base, torch.where(y == 0, 1, y)])  # unit 0: all lost, unit 3: class 0
    quads = ["RU", "NRU", "RL", "NL"]
    est = reliance_bootstrap(phi, preds, y, quads, k, resamples=300, seed=1)
    assert est["rs_phi"] == pytest.approx(float(phi[:, 0].mean() / phi.mean(0).sum()))
    # ablation (40 images per class): unit 0 shifts every label, BA_c = (0 + 40/80)/2 = 0.25, drop 0.75;
    # unit 3 sends class 0 to 1: BA_0 = (0 + 1)/2 (drop 0.5), BA_1 = (1 + 40/80)/2 (drop 0.25), BA_2 kept
    imp0, imp3 = 0.75, (0.5 + 0.25 + 0.0) / 3
    assert est["rs_ablation"] == pytest.approx(imp0 / (imp0 + imp3))
    assert est["boot_phi"].shape == (300,) and est["boot_ablation"].shape == (300,)
    twin = reliance_bootstrap(phi, preds, y, quads, k, resamples=300, seed=1)
    rows = reliance_rows([("a", est), ("b", twin)])
    for imp in ("phi", "ablation"):
        assert rows[0][f"rs_{imp}_lo"] <= rows[0][f"rs_{imp}"] <= rows[0][f"rs_{imp}_hi"]
        assert math.isnan(rows[0][f"rs_{imp}_diff"])
        assert rows[1][f"rs_{imp}_diff"] == 0 and rows[1][f"rs_{imp}_diff_lo"] == rows[1][f"rs_{imp}_diff_hi"] == 0
    none = reliance_bootstrap(phi, preds, y, quads, k, resamples=0)
    assert len(none["boot_phi"]) == 0 and math.isnan(reliance_rows([("a", none)])[0]["rs_phi_lo"])


def test_stage_recomputes_the_reliance_shift_with_intervals_and_fine_tuning_transitions(
    tmp_path: Path, fmnist: Any
) -> None:
    from robustdissect.config import RunConfig
    from robustdissect.pipeline import run_pipeline
    from robustdissect.runs import read_table

    opts = {"compute": "reliance", "feature_n": 24, "bootstrap": 50,
            "compare": ["fmnist-smallcnn-pat", "fmnist-smallcnn-pat-ft", "fmnist-smallcnn-no-such-model"],
            "transitions": ["fmnist-smallcnn-pat-ft", "fmnist-smallcnn-pat"]}  # fmt: skip
    cfg = RunConfig(model="fmnist-smallcnn-vanilla", n=24, quick=True, stages={"overview": {}, "pushback": opts})
    run = run_pipeline(cfg, tmp_path / "run")
    res = json.loads((run / "results.json").read_text())["stages"]["pushback"]
    rows = {r["model"]: r for r in read_table(run / "tables" / "pushback_reliance.csv")}
    assert list(rows) == ["fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat", "fmnist-smallcnn-pat-ft"]
    for r in rows.values():
        assert int(r["n"]) == 24 and int(r["bootstrap"]) == 50
        for imp in ("phi", "ablation"):
            assert 0 <= float(r[f"rs_{imp}_lo"]) <= float(r[f"rs_{imp}"]) <= float(r[f"rs_{imp}_hi"]) <= 1
    assert float(rows["fmnist-smallcnn-pat"]["rs_phi_diff"]) == pytest.approx(
        float(rows["fmnist-smallcnn-pat"]["rs_phi"]) - float(rows["fmnist-smallcnn-vanilla"]["rs_phi"]), abs=1e-5
    )
    trans = res["pushback"]["transitions"]
    # pat-ft was fine-tuned from PAT: its transitions start at PAT, not at the run's vanilla model;
    # PAT was trained from scratch: no transition
    assert list(trans) == ["fmnist-smallcnn-pat-ft"]
    assert trans["fmnist-smallcnn-pat-ft"]["from"] == "fmnist-smallcnn-pat"
    assert sum(map(sum, trans["fmnist-smallcnn-pat-ft"]["matrix"])) == 224
    warnings = " ".join(res["warnings"])
    assert "fmnist-smallcnn-no-such-model" in warnings
    assert "no transition matrix for fmnist-smallcnn-pat: it was trained from scratch" in warnings
    assert "reliance shift and transitions computed in this run" in res["text"]


def test_models_trained_on_built_sets_load_as_counterparts_by_shape(fmnist: Any) -> None:
    """A model trained on a built set (card dataset robust-data:PATH) is used on the run's images:
    it is matched to them by shape and classes, not by its card's dataset name."""
    from robustdissect.config import RunConfig
    from robustdissect.pipeline import Context, prepare

    p = prepare(RunConfig(n=8, compare=[]))
    ctx = Context(RunConfig(n=8, compare=[]), None, p.model, p.card, p.data, p.device, None)  # type: ignore[arg-type]
    got = ctx.load_model("fmnist-smallcnn-data-bp")
    assert not isinstance(got, str) and str(got[1]["dataset"]).startswith("robust-data:")
    assert "not available" in str(ctx.load_model("fmnist-smallcnn-no-such-model"))


def test_stage_on_a_user_model_computes_its_own_results(tmp_path: Path, fmnist: Any, user_model: Any) -> None:
    """Beside any model but the shipped vanilla one, the default profile computes the section for the
    run's model and its --compare models only: no shipped number, no shipped model."""
    from robustdissect.config import RunConfig
    from robustdissect.pipeline import run_pipeline
    from robustdissect.runs import read_table

    cfg = RunConfig(model=user_model.spec, weights=str(user_model.weights), label="mine", n=100, quick=True,
                    compare=[{"name": "twin", "model": user_model.spec, "weights": str(user_model.robust_weights)}],
                    stages={"overview": {}, "pushback": {"feature_n": 100, "purify_n": 16, "bootstrap": 20}})
    run = run_pipeline(cfg, tmp_path / "run")
    res = json.loads((run / "results.json").read_text())["stages"]["pushback"]
    assert res["text"].startswith("Computed in this run")
    assert [r["model"] for r in read_table(run / "tables" / "pushback_reliance.csv")] == ["mine", "twin"]
    assert not (run / "tables" / "pushback_datasets.csv").exists()
    assert "fmnist" not in (run / "results.json").read_text() + (run / "report.html").read_text()


def test_default_profile_reduces_the_back_perturbation_and_full_keeps_the_papers_settings() -> None:
    """The default run (quick) back-perturbs with 10 steps of 2.5·ε_bp/10 and takes the reliance
    shift on 100 images; --full keeps §6.5's 50 steps of 0.01, 64 purified images, every image."""
    import robustdissect.pipeline  # noqa: F401  (registers the stages)
    from robustdissect.config import RunConfig
    from robustdissect.stages.base import stage_settings
    from robustdissect.stages.pushback import PushbackOptions

    quick = stage_settings("pushback", RunConfig(quick=True, stages={"pushback": {}}))
    full = stage_settings("pushback", RunConfig(quick=False, stages={"pushback": {}}))
    assert (quick.steps, quick.reliance_n, quick.purify_n, quick.compute) == (10, 100, 32, "auto")
    assert quick.alpha == pytest.approx(2.5 * quick.eps_bp / quick.steps)
    assert (full.steps, full.alpha, full.reliance_n, full.purify_n, full.compute) == (50, 0.01, None, 64, True)
    # an option the config sets wins over the profile
    mine = stage_settings("pushback", RunConfig(quick=True, stages={"pushback": {"steps": 30, "reliance_n": None}}))
    assert (mine.steps, mine.reliance_n) == (30, None)
    for bad in (1, 0, True, 2.5, "100"):
        with pytest.raises(UserError, match="reliance_n"):
            PushbackOptions(reliance_n=bad)  # type: ignore[arg-type]


def test_reliance_shift_on_the_first_reliance_n_images(tmp_path: Path, fmnist: Any) -> None:
    """reliance_n takes both importances and their intervals on a prefix of the dissection's images."""
    from robustdissect.config import RunConfig
    from robustdissect.pipeline import run_pipeline
    from robustdissect.runs import read_table

    opts = {"compute": "reliance", "feature_n": 24, "reliance_n": 10, "bootstrap": 30, "compare": [],
            "transitions": []}  # fmt: skip
    cfg = RunConfig(model="fmnist-smallcnn-vanilla", n=24, quick=True, stages={"pushback": opts})
    run = run_pipeline(cfg, tmp_path / "run")
    (row,) = read_table(run / "tables" / "pushback_reliance.csv")
    assert int(row["n"]) == 10 and int(row["bootstrap"]) == 30
    for imp in ("phi", "ablation"):
        assert 0 <= float(row[f"rs_{imp}_lo"]) <= float(row[f"rs_{imp}"]) <= float(row[f"rs_{imp}_hi"]) <= 1
    tables = json.loads((run / "results.json").read_text())["stages"]["pushback"]["tables"]
    assert "95% bootstrap intervals over 10 images" in tables[1]["title"]
