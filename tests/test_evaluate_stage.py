"""The `evaluate` stage end to end, the evidence store it reads from, and safe resumption."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robustdissect.attacks import PGD
from robustdissect.cli import main
from robustdissect.config import RunConfig
from robustdissect.errors import UserError
from robustdissect.evaluation import EvaluateOptions, attack_evidence, wilson_interval
from robustdissect.pipeline import STAGES, Context, run_pipeline, section
from robustdissect.runs import read_table
from robustdissect.store import EvidenceStore, list_evidence, load_evidence

TINY = {
    "attacks": ["fgsm", "pgd-linf", "spsa"],
    "worst_case": ["pgd-linf", "fgsm", "apgd-ce"],
    "apgd_steps": 5,
    "pgd_steps": 5,
    "blackbox_n": 20,
    "spsa_iterations": 5,
    "spsa_samples": 32,
    "corruptions": ["gaussian-noise", "contrast"],
    "eps_sweep": [0.02, 0.1],
    "steps_sweep": [1, 5],
    "curve_n": 40,
    "square_queries": 30,
}


def test_evaluate_stage_table_worst_case_curves_and_store(tmp_path: Path, fmnist: Any) -> None:
    cfg = RunConfig(model="fmnist-smallcnn-pat", n=80, quick=False, stages={"evaluate": TINY})
    run = run_pipeline(cfg, tmp_path / "run")
    res = json.loads((run / "results.json").read_text())
    rows = {r["attack"]: r for r in read_table(run / "tables" / "robust_accuracy.csv")}
    assert list(rows) == ["clean", "fgsm", "pgd-linf", "spsa", "worst case (L∞)"]
    for r in rows.values():
        n, acc = int(r["n"]), float(r["accuracy"])
        lo, hi = wilson_interval(round(acc * n), n)
        assert abs(float(r["ci_low"]) - lo) < 1e-5 and abs(float(r["ci_high"]) - hi) < 1e-5
    assert int(rows["spsa"]["n"]) == 20 and int(rows["pgd-linf"]["n"]) == 80

    # the worst case folds in every stored L-inf attack of the run (table, curves), then runs APGD
    # and Square only on the points still robust
    items = {(i["parts"]["name"], i["parts"]["n"]): i for i in list_evidence(run) if i["kind"] == "adv"}
    pgd, _ = load_evidence(run, "adv", items[("pgd-linf", 80)]["key"])
    fgsm, _ = load_evidence(run, "adv", items[("fgsm", 80)]["key"])
    clean_ok = float(rows["clean"]["accuracy"]) * 80
    cascade = read_table(run / "tables" / "worst_case_cascade.csv")
    by_name = {r["attack"]: r for r in cascade}
    names = [r["attack"] for r in cascade]
    assert names[:2] == ["pgd-linf", "fgsm"] and names[-3:] == ["spsa", "apgd-ce", "square-linf"]
    assert any("(curves)" in a for a in names)  # the PGD-1 of the steps sweep at eps is in it
    assert int(by_name["pgd-linf"]["attacked"]) == round(clean_ok)
    assert int(by_name["fgsm"]["attacked"]) == int(pgd["correct"].sum())
    assert int(by_name["pgd-linf"]["attacked"]) - int(by_name["pgd-linf"]["broken"]) == int(pgd["correct"].sum())
    robust_before_apgd = round(float(by_name["spsa"]["cumulative_accuracy"]) * 80)
    assert robust_before_apgd <= int((pgd["correct"].bool() & fgsm["correct"].bool()).sum())
    assert int(by_name["apgd-ce"]["attacked"]) == robust_before_apgd
    apgd = [i for (name, _n), i in items.items() if name == "apgd-ce"]
    assert len(apgd) == 1 and apgd[0]["parts"]["n"] == robust_before_apgd
    square = [i for (name, _n), i in items.items() if name == "square-linf"]
    assert len(square) == 1 and square[0]["parts"]["n"] == robust_before_apgd - int(by_name["apgd-ce"]["broken"])
    worst = float(rows["worst case (L∞)"]["accuracy"])
    assert worst == pytest.approx(float(cascade[-1]["cumulative_accuracy"]))
    cumulative = [float(r["cumulative_accuracy"]) for r in cascade]
    assert cumulative == sorted(cumulative, reverse=True)

    assert set(res["robust_accuracy"]) == {"fgsm", "pgd-linf", "spsa", "worst case (L∞)"}
    assert len(read_table(run / "tables" / "corruptions.csv")) == 10  # two corruptions x five severities
    eps_curve = res["stages"]["evaluate"]["accuracy_vs_eps"]
    assert set(eps_curve) == {"0.02", "0.1", "0.5"}  # the sweep plus the large-eps check
    assert eps_curve["0.02"] >= eps_curve["0.1"] >= eps_curve["0.5"]
    assert res["stages"]["evaluate"]["masking"]["zero_gradient_share"] == 0.0
    assert (run / "figures" / "adversarial_grid.png").is_file()


class CountingPGD(PGD):
    """PGD that counts its searches."""

    calls = 0

    def _search(self, *args: Any, **kwargs: Any) -> Any:
        CountingPGD.calls += 1
        return super()._search(*args, **kwargs)


def test_same_evidence_key_is_computed_once(tmp_path: Path, fmnist: Any, shipped_vanilla: nn.Module) -> None:
    store = EvidenceStore(tmp_path / "evidence")
    x, y = fmnist.test.x[:24], fmnist.test.y[:24]
    index = torch.arange(24)
    CountingPGD.calls = 0
    first = attack_evidence(store, shipped_vanilla, CountingPGD(0.1, steps=3), x, y, index)
    again = attack_evidence(store, shipped_vanilla, CountingPGD(0.1, steps=3), x, y, index)
    assert CountingPGD.calls == 1 and store.hits == {"adv": 1} and store.misses == {"adv": 1}
    assert torch.equal(first.x_adv, again.x_adv) and first.key == again.key
    # a fresh store on the same folder (a resumed process) reads it from disk
    reread = attack_evidence(EvidenceStore(tmp_path / "evidence"), shipped_vanilla, CountingPGD(0.1, steps=3), x, y,
                             index)  # fmt: skip
    assert CountingPGD.calls == 1 and torch.equal(reread.x_adv, first.x_adv)
    # any change of images, settings, seed or weights is another item
    attack_evidence(store, shipped_vanilla, CountingPGD(0.1, steps=3), x[:20], y[:20], index[:20])
    attack_evidence(store, shipped_vanilla, CountingPGD(0.05, steps=3), x, y, index)
    attack_evidence(store, shipped_vanilla, CountingPGD(0.1, steps=3, seed=1), x, y, index)
    other = copy.deepcopy(shipped_vanilla)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    attack_evidence(store, other, CountingPGD(0.1, steps=3), x, y, index)
    assert CountingPGD.calls == 5 and len(list_evidence(tmp_path)) == 5
    with pytest.raises(UserError, match="no evidence item"):
        load_evidence(tmp_path, "adv", "0000000")


def test_stages_share_the_vanilla_attacks(tmp_path: Path, fmnist: Any) -> None:
    """The compare stage's row of the run's model is the evaluate stage's evidence, not a second attack."""
    stages = {
        "evaluate": {"attacks": ["pgd-linf", "fgsm"], "worst_case": ["pgd-linf"], "curves": False, "corruptions": []},
        "compare": {"models": ["fmnist-smallcnn-vanilla"], "attacks": ["pgd-linf", "fgsm"]},
    }
    run = run_pipeline(RunConfig(n=40, stages=stages), tmp_path / "run")
    res = json.loads((run / "results.json").read_text())
    assert res["evidence"]["hits"]["adv"] >= 2 and res["evidence"]["misses"]["adv"] == 2
    table = {r["model"]: r for r in read_table(run / "tables" / "compare_accuracy.csv")}
    evaluate = {r["attack"]: r for r in read_table(run / "tables" / "robust_accuracy.csv")}
    assert table["fmnist-smallcnn-vanilla"]["pgd-linf"] == evaluate["pgd-linf"]["accuracy"]


@STAGES.register("test-interrupt", "raises KeyboardInterrupt (tests of --resume)")
def _interrupt(ctx: Context, options: dict[str, Any]) -> dict[str, Any]:
    raise KeyboardInterrupt


def test_resume_refuses_another_model_or_config(tmp_path: Path, fmnist: Any, capsys: Any) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("n: 20\nstages: [overview, test-interrupt]\n")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(RunConfig(n=20, stages={"overview": {}, "test-interrupt": {}}), out)
    assert (tmp_path / "run.partial" / "identity.json").is_file()
    capsys.readouterr()
    argv = ["run", "--config", str(cfg_file), "--resume", "--out", str(out)]
    code = _exit_code([*argv, "--model", "fmnist-smallcnn-pat"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "other model weights" in err[0]
    code = _exit_code([*argv, "--n", "10"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "config differs" in err[-1]
    assert (tmp_path / "run.partial" / "results.json").is_file()  # the interrupted run is intact


def _exit_code(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


class ReusedReLUNet(nn.Module):
    """A torchvision-style basic block: one ReLU module called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        return self.head(self.relu(self.bn2(self.conv2(h)) + h))


def make_reused() -> nn.Module:
    torch.manual_seed(0)
    return ReusedReLUNet()


def test_a_model_that_reuses_a_relu_runs_with_a_warning(tmp_path: Path, fmnist: Any) -> None:
    stages = {"overview": {}, "sensitivity": {"experiments": ["profiles"], "compare": []}}
    cfg = RunConfig(model=f"{__name__}:make_reused", n=20, stages=stages)
    run = run_pipeline(cfg, tmp_path / "run")
    entry = json.loads((run / "results.json").read_text())["stages"]["sensitivity"]
    assert any("relu" in w and "left out" in w for w in entry["warnings"])
    layers = {r["layer"] for r in read_table(run / "tables" / "sigma.csv")}
    assert "relu" not in layers and layers  # the reused module is excluded, the rest analysed


def test_evaluate_options_refuse_unknown_and_corruption_names() -> None:
    with pytest.raises(UserError, match="did you mean"):
        EvaluateOptions(attacks=["pgd-lnf"]).attack_names()
    with pytest.raises(UserError, match="corruption"):
        EvaluateOptions(attacks=["jpeg"]).attack_names()


def test_section_keeps_machine_readable_fields() -> None:
    entry = section("t", summary={"a": 1}, extra=[1, 2])
    assert entry["extra"] == [1, 2] and entry["warnings"] == [] and entry["summary"] == {"a": 1}
