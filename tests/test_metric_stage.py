"""Stages `metric` and `landscape` end to end on the shipped models, the evidence they store, and
the YU-1 summary statistics on rows with known answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from scipy import stats

from robustdissect.analysis.metric_study import rank_correlations, ranking_stability, read_study, summarise
from robustdissect.config import RunConfig
from robustdissect.errors import UserError
from robustdissect.pipeline import run_pipeline
from robustdissect.runs import read_table
from robustdissect.store import list_evidence


def test_metric_and_landscape_stages(tmp_path: Path, fmnist: Any) -> None:
    study = tmp_path / "study"
    study.mkdir()
    rows = _rows()
    (study / "yu1.json").write_text(json.dumps({"settings": {"n": 5}, "rows": rows, **summarise(rows, n_boot=50)}))
    stages = {
        "metric": {"n": 40, "steps": 5, "calibration_n": 200, "evaluation": True, "eval_steps": 5, "eval_restarts": 1,
                   "study": str(study)},
        "landscape": {"n": 4, "grid": 5, "line_points": 11, "attack_steps": 5},
    }  # fmt: skip
    cfg = RunConfig(model="fmnist-smallcnn-vanilla", n=40, quick=False, stages=stages)
    run = run_pipeline(cfg, tmp_path / "run")
    res = json.loads((run / "results.json").read_text())
    metric = res["stages"]["metric"]
    psi = {r["model"]: r for r in read_table(run / "tables" / "metric_psi.csv")}
    assert list(psi) == ["fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat"]  # PAT beside the shipped smallcnn
    assert float(psi["fmnist-smallcnn-vanilla"]["psi_mean"]) > 10 * float(psi["fmnist-smallcnn-pat"]["psi_mean"])
    assert float(psi["fmnist-smallcnn-vanilla"]["pgd_accuracy"]) < float(psi["fmnist-smallcnn-pat"]["pgd_accuracy"])
    assert all(float(r["seconds"]) > 0 for r in psi.values())
    assert metric["models"][0]["n"] == 40
    # the maximiser's examples are stored, keyed on the calibrated wrapper (temperature included)
    kinds = [(i["parts"]["name"], i["parts"]["settings"].get("loss")) for i in list_evidence(run) if i["kind"] == "adv"]
    assert kinds.count(("pgd-linf", "kl")) == 2
    land = {r["model"]: r for r in read_table(run / "tables" / "landscape_summary.csv")}
    assert float(land["fmnist-smallcnn-vanilla"]["boundary_inside_eps"]) == 1.0
    steep = {name: float(r["steepness_mean"]) for name, r in land.items()}
    assert steep["fmnist-smallcnn-vanilla"] > steep["fmnist-smallcnn-pat"]
    for f in ("landscape_decision_contours", "landscape_loss_surface3d", "landscape_slices", "metric_psi_hist"):
        assert (run / "figures" / f"{f}.png").is_file()
    assert "Robustness metric" in (run / "report.html").read_text()
    # the YU-1 study is shown: its correlations, stability and scatter
    corr = {r["accuracy_column"]: r for r in read_table(run / "tables" / "metric_yu1_correlations.csv")}
    assert float(corr["pgd_eps0.1_k10"]["spearman"]) == pytest.approx(1.0)
    stab = {r["ranking_by"]: r for r in read_table(run / "tables" / "metric_yu1_stability.csv")}
    assert float(stab["psi"]["mean_pairwise_kendall"]) == pytest.approx(1.0)
    assert (run / "figures" / "metric_yu1_scatter.png").is_file()
    assert metric["study"]["models"] == 5 and "YU-1 (5 models)" in metric["text"]


def test_stage_options_are_checked_before_any_work(tmp_path: Path) -> None:
    for stages in ({"metric": {"calibration": "softmax"}}, {"landscape": {"grid": 10}}, {"metric": {"stepz": 3}}):
        with pytest.raises(UserError):
            run_pipeline(RunConfig(n=10, quick=False, stages=stages), tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def _rows() -> list[dict[str, Any]]:
    # Ψ ranks the five models exactly as acc_a does, in reverse of acc_b
    psi = [0.01, 0.1, 0.5, 2.0, 8.0]
    return [
        {"model": f"m{i}", "psi_mean": p, "psi_eps0.2_k20": p * 2 + 0.01 * i, "psi_seconds": 1.0,
         "pgd_eps0.1_k10": 0.9 - 0.2 * i, "pgd_eps0.1_k10_seconds": 2.0,
         "pgd_eps0.2_k10": 0.1 + 0.2 * i, "pgd_eps0.2_k10_seconds": 3.0,
         "cw_l2": [0.5, 0.7, 0.1, 0.3, 0.2][i], "eval_seconds": 10.0, "pgd100_seconds": 4.0}
        for i, p in enumerate(psi)
    ]  # fmt: skip


def test_rank_correlations_and_stability_have_known_answers() -> None:
    rows = _rows()
    corr = rank_correlations(rows, ["pgd_eps0.1_k10", "pgd_eps0.2_k10", "cw_l2"], n_boot=200)
    assert corr["pgd_eps0.1_k10"]["spearman"] == pytest.approx(1.0)
    assert corr["pgd_eps0.1_k10"]["kendall"] == pytest.approx(1.0)
    assert corr["pgd_eps0.2_k10"]["spearman"] == pytest.approx(-1.0)
    neg_psi = [-r["psi_mean"] for r in rows]
    cw = [r["cw_l2"] for r in rows]
    assert corr["cw_l2"]["spearman"] == pytest.approx(stats.spearmanr(neg_psi, cw).statistic)
    assert corr["cw_l2"]["kendall"] == pytest.approx(stats.kendalltau(neg_psi, cw).statistic)
    lo, hi = corr["cw_l2"]["spearman_low"], corr["cw_l2"]["spearman_high"]
    assert -1.0 <= lo <= corr["cw_l2"]["spearman"] <= hi <= 1.0
    # two accuracy columns in exactly reversed order: pairwise tau -1; Ψ's two settings agree: +1
    acc = ranking_stability(rows, ["pgd_eps0.1_k10", "pgd_eps0.2_k10"], higher_is_better=True)
    assert acc["mean_pairwise_kendall"] == pytest.approx(-1.0)
    psi = ranking_stability(rows, ["psi_mean", "psi_eps0.2_k20"], higher_is_better=False)
    assert psi["mean_pairwise_kendall"] == pytest.approx(1.0)
    s = summarise(rows, n_boot=100)
    assert s["accuracy_columns"] == ["pgd_eps0.1_k10", "pgd_eps0.2_k10", "cw_l2"]
    assert s["psi_columns"] == ["psi_mean", "psi_eps0.2_k20"]
    assert s["timing"]["full_over_psi"] == pytest.approx(10.0)
    assert s["timing"]["pgd100_over_psi"] == pytest.approx(4.0)


def test_read_study_refuses_a_missing_study(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no YU-1 study"):
        read_study(tmp_path)


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from robustdissect.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["metric", "--calibration", "softmax"], "calibration must be one of"),
        (["metric", "--models", "fmnist-smallcnn-pta"], "fmnist-smallcnn-pta"),
        (["landscape", "--grid", "10"], "grid must be an odd integer"),
        (["landscape", "--norm", "l1"], "norm must be one of"),
    ],
)
def test_cli_mistakes_are_one_line_and_leave_nothing(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    code, _out, err = _cli([*args, "--n", "10", "--out", str(out_dir)], capsys)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_cli_metric_prints_psi_and_seconds(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmnist: Any) -> None:
    code, out, err = _cli(["metric", "--model", "fmnist-smallcnn4-w8-vanilla", "--n", "30", "--steps", "3",
                           "--evaluate", "--out", str(tmp_path / "m")], capsys)  # fmt: skip
    assert code == 0, err
    line = next(s for s in out.splitlines() if s.strip().startswith("Ψ fmnist-smallcnn4-w8-vanilla"))
    assert " in " in line and line.rstrip().endswith(" s")
    assert any(s.strip().startswith("PGD-100 accuracy fmnist-smallcnn4-w8-vanilla") for s in out.splitlines())
