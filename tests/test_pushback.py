"""Back-perturbation, purification (BPDA) and the D_bp criterion (METHODS §6.5, §6.6, §6.7)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

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

SIZE = 8
CHECKER = (torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None, :]) % 2 * 2.0 - 1.0  # ±1


class Planted(nn.Module):
    """Two planted units in layer `feat` (a full-image conv, output (N, 2, 1, 1)): unit 0 = mean of
    the left half (robust: the classes differ by 0.4 there), unit 1 = the checkerboard coefficient
    (brittle: the classes differ by ±0.05, inside an ε = 0.1 ball). The head reads both."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(1, 2, SIZE, bias=False)
        w = torch.zeros(2, 1, SIZE, SIZE)
        w[0, 0, :, : SIZE // 2] = 1.0 / (SIZE * SIZE // 2)
        w[1, 0] = CHECKER / (SIZE * SIZE)
        with torch.no_grad():
            self.feat.weight.copy_(w)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-5.0, -40.0], [5.0, 40.0]]))
            self.head.bias.copy_(torch.tensor([2.5, -2.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feat(x).flatten(1))  # type: ignore[no-any-return]


def planted_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.full((n, 1, SIZE, SIZE), 0.5)
    x[:, 0, :, : SIZE // 2] = (0.3 + 0.4 * y.float())[:, None, None]
    x = x + 0.05 * (2 * y.float() - 1)[:, None, None, None] * CHECKER
    x = x + 0.01 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1), y


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
    from robustdissect.pipeline import run_pipeline
    from robustdissect.runs import read_table
    from robustdissect.stages.pushback import shipped_pushback

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
    assert "shipped results" in res["text"]
    assert not list((run / "evidence").glob("adv/*"))  # nothing attacked
