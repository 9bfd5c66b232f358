"""The headline worst case is the per-image minimum over every attack of its threat model that the
run computed: no row of any table the evaluate stage writes lies below it. The model is one where
APGD-DLR beats the cascade list (a saturated softmax: CE gradients vanish, DLR is scale-free)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from torch import Tensor, nn

from robustdissect.config import RunConfig
from robustdissect.pipeline import run_pipeline
from robustdissect.runs import read_table


class Saturating(nn.Module):
    """The shipped vanilla model with logits x 1e4 (float32 softmax saturated)."""

    def __init__(self) -> None:
        super().__init__()
        from robustdissect.models import load_checkpoint

        self.inner = load_checkpoint("fmnist-smallcnn-vanilla")[0]

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner(x) * 1e4
        return out


def make_saturating() -> nn.Module:
    return Saturating()


N = 40
STAGE = {
    "attacks": ["fgsm", "pgd-linf", "apgd-dlr", "pgd-l2"],
    "worst_case": ["pgd-linf", "fgsm", "apgd-ce"],  # the first-look cascade: no DLR in it
    "pgd_steps": 10,
    "apgd_steps": 20,
    "corruptions": [],
    "eps_sweep": [0.05, 0.1],
    "steps_sweep": [1, 5, 10],
    "curve_n": N,
    "square_queries": 40,
    "square_norms": ["linf", "l2"],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, fmnist: Any) -> Path:
    cfg = RunConfig(model=f"{__name__}:make_saturating", n=N, quick=True, stages={"evaluate": STAGE})
    return run_pipeline(cfg, tmp_path_factory.mktemp("wc") / "run")


def test_no_table_row_lies_below_the_worst_case(run: Path) -> None:
    rows = {r["attack"]: r for r in read_table(run / "tables" / "robust_accuracy.csv")}
    res = json.loads((run / "results.json").read_text())
    settings = res["stages"]["evaluate"]["attack_settings"]
    worst = {"linf": float(rows["worst case (L∞)"]["accuracy"]), "l2": float(rows["worst case (L2)"]["accuracy"])}
    # the case of the issue: DLR beats every attack of the cascade list, and the headline takes it
    cascade_only = min(float(rows[a]["accuracy"]) for a in ("pgd-linf", "fgsm"))
    assert float(rows["apgd-dlr"]["accuracy"]) < cascade_only
    assert worst["linf"] <= float(rows["apgd-dlr"]["accuracy"])
    assert res["headline"]["attack"] == "worst case (L∞)" and res["headline"]["accuracy"] == worst["linf"]
    # robust_accuracy.csv: every attack row on all N images, of either threat model
    checked = 0
    for name, r in rows.items():
        if r["kind"] in ("white-box", "black-box") and int(r["n"]) == N:
            norm = settings[name]["norm"]
            assert float(r["accuracy"]) >= worst[norm] - 1e-12, name
            checked += 1
    assert checked == 4
    # the curves: every PGD at the table's eps on the same N images
    for r in read_table(run / "tables" / "accuracy_vs_steps.csv"):
        assert float(r["accuracy"]) >= worst["linf"] - 1e-12
    eps_rows = {float(r["eps"]): float(r["accuracy"]) for r in read_table(run / "tables" / "accuracy_vs_eps.csv")}
    assert eps_rows[0.1] >= worst["linf"]
    # per class: each L-inf attack column against the L-inf worst case, each L2 one against L2
    for r in read_table(run / "tables" / "robust_accuracy_per_class.csv"):
        for name in ("fgsm", "pgd-linf", "apgd-dlr"):
            if not math.isnan(float(r[name])):
                assert float(r[name]) >= float(r["worst case (L∞)"]) - 1e-12
        if not math.isnan(float(r["pgd-l2"])):
            assert float(r["pgd-l2"]) >= float(r["worst case (L2)"]) - 1e-12
    # the table of who broke what ends at the worst case and never rises
    cascade = read_table(run / "tables" / "worst_case_cascade.csv")
    for norm in ("linf", "l2"):
        part = [r for r in cascade if r["threat_model"] == norm]
        cumulative = [float(r["cumulative_accuracy"]) for r in part]
        assert cumulative == sorted(cumulative, reverse=True)
        assert cumulative[-1] == pytest.approx(worst[norm])
        assert part[-1]["attack"] == f"square-{norm}" or int(part[-1]["attacked"]) == 0
    names = [r["attack"] for r in cascade if r["threat_model"] == "linf"]
    assert "apgd-dlr" in names and "apgd-ce" in names and any("(curves)" in a for a in names)
