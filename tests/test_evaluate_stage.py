"""The `evaluate` stage end to end, and the adversarial-example cache it resumes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robustdissect.attacks import make_attack
from robustdissect.config import RunConfig
from robustdissect.errors import UserError
from robustdissect.evaluation import EvaluateOptions, run_cached, wilson_interval
from robustdissect.pipeline import run_pipeline
from robustdissect.runs import read_table

TINY = {
    "attacks": ["fgsm", "pgd-linf", "spsa"],
    "pgd_steps": 5,
    "blackbox_n": 20,
    "spsa_iterations": 5,
    "spsa_samples": 32,
    "corruptions": ["gaussian-noise", "contrast"],
    "eps_sweep": [0.02, 0.1],
    "steps_sweep": [1, 5],
    "curve_n": 40,
}


def test_evaluate_stage_table_curves_and_cache(tmp_path: Path, fmnist) -> None:
    run = run_pipeline(RunConfig(n=80, quick=False, stages={"evaluate": TINY}), tmp_path / "run")
    res = json.loads((run / "results.json").read_text())
    rows = {r["attack"]: r for r in read_table(run / "tables" / "robust_accuracy.csv")}
    assert list(rows) == ["clean", "fgsm", "pgd-linf", "spsa", "worst case"]
    for r in rows.values():
        n, acc = int(r["n"]), float(r["accuracy"])
        lo, hi = wilson_interval(round(acc * n), n)
        assert abs(float(r["ci_low"]) - lo) < 1e-5 and abs(float(r["ci_high"]) - hi) < 1e-5
        assert lo <= acc <= hi
    assert int(rows["spsa"]["n"]) == 20 and int(rows["pgd-linf"]["n"]) == 80
    clean = float(rows["clean"]["accuracy"])
    assert float(rows["pgd-linf"]["accuracy"]) < clean and float(rows["fgsm"]["accuracy"]) < clean
    assert float(rows["worst case"]["accuracy"]) <= min(float(rows[a]["accuracy"]) for a in ("fgsm", "pgd-linf"))
    assert set(res["robust_accuracy"]) == {"fgsm", "pgd-linf", "spsa", "worst case"}
    assert isinstance(res["warnings"], list)
    corr = read_table(run / "tables" / "corruptions.csv")
    assert len(corr) == 10  # two corruptions x five severities
    eps_curve = res["stages"]["evaluate"]["accuracy_vs_eps"]
    assert eps_curve["0.02"] >= eps_curve["0.1"]
    for name in ("fgsm", "pgd-linf", "spsa"):
        assert (run / "adv" / f"{name}.safetensors").is_file()
    assert (run / "figures" / "adversarial_grid.png").is_file()


def test_cached_adversarial_examples_are_reused_only_for_the_same_settings(
    tmp_path: Path, fmnist, shipped_vanilla
) -> None:
    x, y = fmnist.test.x[:16], fmnist.test.y[:16]
    index = torch.arange(16)
    cache = tmp_path / "adv" / "pgd.safetensors"
    attack = make_attack("pgd-linf", eps=0.1, steps=3)
    first = run_cached(attack, shipped_vanilla, x, y, index, cache)

    class Exploding:
        name = "pgd-linf"

        def describe(self) -> dict[str, object]:
            return attack.describe()

        def __call__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("the cached result should have been used")

    again = run_cached(Exploding(), shipped_vanilla, x, y, index, cache)  # type: ignore[arg-type]
    assert torch.equal(again.x_adv, first.x_adv) and torch.equal(again.correct, first.correct)
    other = run_cached(make_attack("pgd-linf", eps=0.05, steps=3), shipped_vanilla, x, y, index, cache)
    assert float((other.x_adv - x).abs().max()) <= 0.05 + 1e-6


def test_evaluate_options_refuse_unknown_and_corruption_names() -> None:
    with pytest.raises(UserError, match="did you mean"):
        EvaluateOptions(attacks=["pgd-lnf"]).attack_names()
    with pytest.raises(UserError, match="corruption"):
        EvaluateOptions(attacks=["jpeg"]).attack_names()
