"""Steering the evaluation: every attack parameter from the CLI, exactly the images asked for,
worst case per threat model, masking warnings on a saturating model, user models in --compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from robustdissect.attacks import PGD
from robustdissect.config import RunConfig
from robustdissect.errors import UserError
from robustdissect.evaluation import EvaluateOptions, build_attack
from robustdissect.pipeline import run_pipeline
from robustdissect.runs import read_table
from robustdissect.store import list_evidence, load_evidence


def test_two_step_pgd_by_hand() -> None:
    """PGD-2 without random start on a linear model: x1 = clip(x0 + α sign(w_other − w_y)), twice."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 2.0]]))
    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.tensor([0])
    out = PGD(0.3, steps=2, alpha=0.1, random_start=False, keep="last")(model, x, y)
    # CE gradient of class 0 points along w_1 - w_0 = (-2, 2, -0.5, 2): signs (-, +, -, +)
    expected = torch.tensor([0.3, 0.7, 0.3, 0.7]).view(1, 1, 2, 2)
    assert torch.allclose(out.x_adv, expected, atol=1e-6)


def test_attack_options_reach_the_attack_and_name_rules() -> None:
    opts = EvaluateOptions(attack_options={"pgd-linf": {"alpha": 0.01, "restarts": 3, "keep": "first"}})
    attack = build_attack("pgd-linf", opts, seed=0)
    assert isinstance(attack, PGD)
    assert (attack.alpha, attack.restarts, attack.keep) == (0.01, 3, "first")
    madry = build_attack("pgd-linf", EvaluateOptions(attack_options={"pgd-linf": {"alpha": "2.5eps/k"}}), 0)
    assert isinstance(madry, PGD) and madry.alpha == pytest.approx(2.5 * 0.1 / 20) and madry.step_rule == "madry"
    default = build_attack("pgd-linf", EvaluateOptions(), 0)
    assert isinstance(default, PGD) and default.alpha == pytest.approx(0.1 / 20**0.5)  # one default: eps/sqrt(k)
    with pytest.raises(UserError, match="no parameter"):
        build_attack("pgd-linf", EvaluateOptions(attack_options={"pgd-linf": {"alhpa": 0.01}}), 0)


def test_cli_attack_opt_and_exact_n_on_an_npz_without_test_split(cli, tmp_path: Path, fmnist: Any) -> None:
    npz = tmp_path / "mine.npz"
    np.savez(npz, x=fmnist.test.x[:30].numpy(), y=fmnist.test.y[:30].numpy())
    model = f"{__name__}:make_vanilla"  # a user model: the shipped checkpoint's card names fashion-mnist
    out = tmp_path / "ev"
    code, _, _err = cli(["evaluate", "--model", model, "--data", "npz", "--data-dir", str(npz), "--n", "20",
                 "--attacks", "pgd-linf,pgd-l2", "--attack-opt", "pgd-linf.alpha=0.01",
                 "--attack-opt", "pgd-linf.restarts=2", "--curves", "none", "--corruptions", "none",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"]["analysed_n"] == 20 and res["dataset"]["sizes"]["test"] == 30
    settings = res["stages"]["evaluate"]["attack_settings"]["pgd-linf"]
    assert settings["alpha"] == 0.01 and settings["restarts"] == 2
    rows = {r["attack"]: r for r in read_table(out / "tables" / "robust_accuracy.csv")}
    assert int(rows["pgd-linf"]["n"]) == 20 and "alpha=0.01" in rows["pgd-linf"]["settings"]

    # worst case per threat model: L-inf over the L-inf attacks only, L2 over the L2 ones
    items = {i["parts"]["name"]: i for i in list_evidence(out) if i["kind"] == "adv"}
    linf, _ = load_evidence(out, "adv", items["pgd-linf"]["key"])
    l2, _ = load_evidence(out, "adv", items["pgd-l2"]["key"])
    assert float(rows["worst case (L∞)"]["accuracy"]) == pytest.approx(float(linf["correct"].float().mean()))
    assert float(rows["worst case (L2)"]["accuracy"]) == pytest.approx(float(l2["correct"].float().mean()))
    assert res["headline"]["attack"] == "worst case (L∞)"


class Saturating(nn.Module):
    """The shipped vanilla model with its logits scaled by 1e4: same predictions, a float32
    softmax saturated on the confidently classified images (exactly zero CE gradient)."""

    def __init__(self) -> None:
        super().__init__()
        from robustdissect.models import load_checkpoint

        self.inner = load_checkpoint("fmnist-smallcnn-vanilla")[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) * 1e4


def make_vanilla() -> nn.Module:
    from robustdissect.models import load_checkpoint

    return load_checkpoint("fmnist-smallcnn-vanilla")[0]


def make_saturating() -> nn.Module:
    return Saturating()


def test_a_saturating_model_trips_the_masking_warning_and_the_shipped_one_does_not(tmp_path: Path, fmnist: Any) -> None:
    stages = {"evaluate": {"attacks": ["pgd-linf"], "worst_case": ["pgd-linf"], "corruptions": [],
                           "eps_sweep": [0.1], "steps_sweep": [1, 20], "curve_n": 40}}  # fmt: skip
    masked = run_pipeline(RunConfig(model=f"{__name__}:make_saturating", n=40, stages=stages), tmp_path / "m")
    warnings = json.loads((masked / "results.json").read_text())["stages"]["evaluate"]["warnings"]
    assert any("zero (or non-finite) input gradient" in w for w in warnings)
    shipped = run_pipeline(RunConfig(n=40, stages=stages), tmp_path / "s")
    warnings = json.loads((shipped / "results.json").read_text())["stages"]["evaluate"]["warnings"]
    assert not any("input gradient" in w for w in warnings)


def make_tiny_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 10),
    ).eval()


def test_compare_overlay_takes_a_user_factory(cli, tmp_path: Path, fmnist: Any) -> None:
    out = tmp_path / "sens"
    code, _, _err = cli(["sensitivity", "--compare", f"tiny={__name__}:make_tiny_cnn", "--experiments",
                         "profiles,compare", "--n", "20", "--steps", "2", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert (out / "figures" / "compare_profiles.png").is_file()
    entry = json.loads((out / "results.json").read_text())["stages"]["sensitivity"]
    assert not any("not compared" in w for w in entry["warnings"])
    assert cli(["sensitivity", "--compare", "nowhere.py:make", "--out", str(tmp_path / "x")])[0] == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
