"""Stages `metric` and `landscape` end to end on the shipped models, the evidence they store, and
the YU-1 summary statistics on rows with known answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from scipy import stats

from robustdissect.config import RunConfig
from robustdissect.errors import UserError
from robustdissect.pipeline import run_pipeline
from robustdissect.runs import read_table
from robustdissect.store import list_evidence
from robustdissect.studies.yu1 import rank_correlations, ranking_stability, read_study, summarise


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
    cfg = RunConfig(model="fmnist-smallcnn-vanilla", compare=["fmnist-smallcnn-pat"], n=40, quick=False, stages=stages)
    run = run_pipeline(cfg, tmp_path / "run")
    res = json.loads((run / "results.json").read_text())
    metric = res["stages"]["metric"]
    psi = {r["model"]: r for r in read_table(run / "tables" / "metric_psi.csv")}
    assert list(psi) == ["fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat"]  # the run's counterpart
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
    assert metric["study"]["models"] == 5 and "YU-1 (5 models): 5 test images" in metric["text"]
    # the measured cost: Ψ's time (its calibration included) over the timed PGD evaluation's
    assert "over that of PGD-5 (1 restart(s), early stop per image)" in metric["text"]
    assert all(float(r["calibration_seconds"]) > 0 for r in psi.values())
    assert all(r["steps"] == "5" for r in psi.values())


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["metric", "--calibration", "softmax"], "calibration must be one of"),
        (["metric", "--compare", "fmnist-smallcnn-pta"], "fmnist-smallcnn-pta"),
        (["metric", "--study", "no-such-folder"], "no YU-1 study in no-such-folder"),
        (["landscape", "--grid", "10"], "grid must be an odd integer"),
        (["landscape", "--norm", "l1"], "norm must be one of"),
    ],
)
def test_cli_mistakes_are_one_line_and_leave_nothing(args: list[str], message: str, tmp_path: Path, cli) -> None:
    out_dir = tmp_path / "out"
    code, _out, err = cli([*args, "--n", "10", "--out", str(out_dir)])
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_cli_metric_prints_psi_and_seconds(tmp_path: Path, cli, fmnist: Any) -> None:
    code, out, err = cli(["metric", "--model", "fmnist-smallcnn4-w8-vanilla", "--n", "30", "--steps", "3",
                           "--evaluate", "--out", str(tmp_path / "m")])  # fmt: skip
    assert code == 0, err
    line = next(s for s in out.splitlines() if s.strip().startswith("Ψ, fmnist-smallcnn4-w8-vanilla"))
    assert " in " in line and line.rstrip().endswith(" s")
    assert any(s.strip().startswith("PGD-100 accuracy, fmnist-smallcnn4-w8-vanilla") for s in out.splitlines())


def test_psi_steps_agreement_and_summary_report_the_k20_ranking() -> None:
    from robustdissect.studies.yu1 import psi_steps_agreement, study_settings

    ref = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    same = psi_steps_agreement({"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}, ref)
    assert same["spearman"] == pytest.approx(1.0) and same["kendall"] == pytest.approx(1.0)
    assert same["discordant_pairs"] == [] and same["models"] == 4
    swapped = psi_steps_agreement({"a": 0.1, "b": 0.3, "c": 0.2, "d": 0.4}, ref)
    assert swapped["discordant_pairs"] == [["b", "c"]]
    assert swapped["kendall"] == pytest.approx(stats.kendalltau([1, 3, 2, 4], [1, 2, 3, 4]).statistic)
    # rows of a study record their settings: the K = 20 column at the main eps is compared with psi_mean
    rows = _rows()
    settings = study_settings(n=5, restarts=2)
    for i, r in enumerate(rows):
        r["psi_eps0.1_k20"] = r["psi_mean"] * 1.5 + (0.7 if i == 1 else 0.0)  # m1 overtakes m2
        r["psi_k20_seconds"] = 4.0
        r["settings"] = settings
    s = summarise(rows, n_boot=20)
    agr = s["psi_steps_agreement"]["psi_eps0.1_k20"]
    assert agr["discordant_pairs"] == [["m1", "m2"]]
    assert s["timing"]["psi_k20_seconds_total"] == pytest.approx(20.0)
    assert s["timing"]["pgd100_over_psi_k20"] == pytest.approx(1.0)
    assert "psi_eps0.1_k20" in s["psi_columns"] and "psi_k20_seconds" not in s["psi_columns"]


def test_cached_rows_are_reused_only_with_the_same_settings(tmp_path: Path, fmnist: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A row is recomputed when restarts, n, the images or the model's weights change, or when it
    records no settings (an older study); otherwise it is read back."""
    from robustdissect.studies import yu1 as ms

    calls: list[dict[str, Any]] = []

    def fake_evaluate(model: Any, x: Any, y: Any, x_cal: Any, **kw: Any) -> dict[str, Any]:
        calls.append({"n": len(x), **kw})
        i = len(calls)
        return {"clean": 0.9, "psi_mean": 0.1 * i, "psi_seconds": 1.0, "pgd_eps0.1_k10": 0.5,
                "pgd_eps0.1_k10_seconds": 1.0, "cw_l2": 0.5, "eval_seconds": 2.0, "pgd100_seconds": 1.0}  # fmt: skip

    monkeypatch.setattr(ms, "evaluate_model", fake_evaluate)
    monkeypatch.setattr(ms, "save_png", lambda fig, path: path)
    models = ["fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat"]
    out = tmp_path / "yu1"

    def study(n: int = 20, restarts: int = 1, seed: int = 0) -> dict[str, Any]:
        return ms.run_study(models, out, fmnist, n, restarts, seed, [10], n_boot=10)

    study()
    assert len(calls) == 2 and calls[0]["restarts"] == 1 and calls[0]["n"] == 20
    row = json.loads((out / "models" / "fmnist-smallcnn-vanilla.json").read_text())
    assert row["settings"]["restarts"] == 1 and row["settings"]["n"] == 20 and row["settings"]["psi_steps"] == 5
    assert len(row["settings"]["weights"]) == 16 and len(row["settings"]["images"]) == 16
    first = json.loads((out / "yu1.json").read_text())
    study()  # same settings: both rows read back
    assert len(calls) == 2
    assert json.loads((out / "yu1.json").read_text())["rows"] == first["rows"]
    study(restarts=2)  # changed restarts: both recomputed
    assert len(calls) == 4 and calls[-1]["restarts"] == 2
    assert json.loads((out / "models" / "fmnist-smallcnn-pat.json").read_text())["settings"]["restarts"] == 2
    assert json.loads((out / "yu1.json").read_text())["settings"]["restarts"] == 2
    study(n=30, restarts=2)  # changed n
    assert len(calls) == 6 and calls[-1]["n"] == 30
    study(n=30, restarts=2, seed=1)  # other images (and attack seed)
    assert len(calls) == 8
    # an older row without settings, and a row of other weights, are recomputed
    path = out / "models" / "fmnist-smallcnn-vanilla.json"
    old = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in old.items() if k != "settings"}))
    study(n=30, restarts=2, seed=1)
    assert len(calls) == 9
    expected = json.loads(path.read_text())["settings"]
    assert ms.cached_row(path, expected)[0] is not None
    row, why = ms.cached_row(path, {**expected, "weights": "0" * 16})
    assert row is None and "weights" in why
    row, why = ms.cached_row(path, {**expected, "restarts": 3})
    assert row is None and "restarts 2 -> 3" in why
    assert ms.cached_row(tmp_path / "none.json", expected) == (None, "not computed yet")
    (tmp_path / "old.json").write_text(json.dumps({"model": "m", "psi_mean": 1.0}))
    assert "older study" in ms.cached_row(tmp_path / "old.json", expected)[1]
    csv = (out / "yu1.csv").read_text().splitlines()[0].split(",")
    assert "settings" not in csv and "row_seconds" in csv


def test_a_family_member_that_is_not_shipped_fails_before_any_work(tmp_path: Path, fmnist: Any) -> None:
    from robustdissect.studies.yu1 import DEFAULT_FAMILY, run_study

    assert "fmnist-smallcnn4-w16-trades" in DEFAULT_FAMILY and len(DEFAULT_FAMILY) == 14
    with pytest.raises(UserError, match="fmnist-smallcnn-nonexistent.*ship_checkpoint"):
        run_study(["fmnist-smallcnn-vanilla", "fmnist-smallcnn-nonexistent"], tmp_path / "s", fmnist, 10, 1, 0, [10],
                  n_boot=10)  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_rerun_estimate_has_known_answers() -> None:
    from robustdissect.studies.yu1 import estimate_rerun

    row = {"model": "m", "pgd_eps0.1_k100": 0.5, "pgd_eps0.1_k100_seconds": 10.0, "pgd_eps0.2_k100": 0.0,
           "pgd_eps0.2_k100_seconds": 2.0, "cw_l2_seconds": 3.0, "psi_seconds": 4.0, "landscape_seconds": 1.0,
           "settings": {"n": 100, "restarts": 1, "psi_steps": 20}}  # fmt: skip
    # restarts 2: the 50% still correct are attacked again, at most for the whole run (10 s), at least
    # for their share (5 s); the broken column costs nothing more; Ψ K 5 + (5, 5, 20) steps against 20
    est = estimate_rerun([row], n=100, restarts=2)
    psi = 4.0 * (5 + 5 + 5 + 20) / 20
    assert est["low_seconds"] == pytest.approx(15.0 + 2.0 + 3.0 + psi + 1.0)
    assert est["high_seconds"] == pytest.approx(20.0 + 2.0 + 3.0 + psi + 1.0)
    double = estimate_rerun([row], n=200, restarts=1)
    assert double["low_seconds"] == double["high_seconds"] == pytest.approx(2 * (12.0 + 3.0 + psi) + 1.0)


def test_yu1_pgd_restarts_reattack_only_the_images_still_correct(fmnist: Any) -> None:
    """The study's PGD (early stop, restarts 2): the first run is the restarts-1 run; the second starts
    from the images it left correct and never attacks more; accuracy can only fall."""
    import itertools

    import torch
    from torch import nn

    from robustdissect.attacks import PGD
    from robustdissect.models import load_checkpoint

    model, _ = load_checkpoint("fmnist-smallcnn-pat")
    sizes: list[int] = []

    class Recorded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(len(x))
            return self.inner(x)

    rec = Recorded().eval()
    test = fmnist.test.subset(40, seed=0)
    one = PGD(0.1, steps=10, step_rule="madry", restarts=1, early_stop=True)(rec, test.x, test.y)
    first = list(sizes)
    sizes.clear()
    two = PGD(0.1, steps=10, step_rule="madry", restarts=2, early_stop=True)(rec, test.x, test.y)
    still = int(one.correct.sum())
    assert 0 < still < 40  # some images survive the first run, some do not
    assert first[-1] == still  # the base class's clean check of the images still correct
    assert sizes[: len(first) - 1] == first[:-1]  # the same first run, shrinking as images fall
    restart = sizes[len(first) - 1 :]
    assert restart[0] == still and max(restart) <= still
    assert all(a >= b for a, b in itertools.pairwise(restart))  # early stop: the attacked batch only shrinks
    assert two.robust_accuracy <= one.robust_accuracy
    assert bool((two.correct <= one.correct).all())
