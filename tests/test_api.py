"""The notebook API (robustdissect.api): each call gives the numbers the run writes to its tables
for the same model, images, attack settings and seed; to_frame with and without pandas; plot; the
README's notebook session runs."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.figure import Figure

import robustdissect as rd
from robustdissect.config import RunConfig
from robustdissect.data import Dataset
from robustdissect.errors import UserError
from robustdissect.evaluation import EvaluateOptions, build_attack
from robustdissect.models import load_checkpoint
from robustdissect.pipeline import run_pipeline
from robustdissect.runs import read_table

N = 60  # analysed images of the run
STAGES: dict[str, dict[str, Any]] = {
    "evaluate": {"attacks": ["fgsm", "pgd-linf"], "curve_n": 40},
    "sensitivity": {"experiments": ["profiles"], "n": N},
    "features": {"n": 40, "reference_n": 300, "permutations": 20, "bootstrap": 20, "feature_steps": 5},
    "concepts": {"n": 120, "permutations": 10, "join": False, "figure_concepts": 0, "gradcam_images": 0},
    "diagnose": {"n": 16, "inverter": "optim", "inversion_steps": 5, "resamples": 20, "show": 2, "judge": "self"},
    "metric": {"n": 40, "steps": 3, "calibration_n": 100, "counterparts": 0},
    "landscape": {"n": 4, "grid": 5, "line_points": 11, "attack_steps": 5, "counterparts": 0},
}
NAME = "fmnist-smallcnn-vanilla"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, fmnist: Dataset) -> Path:
    """One run of every stage the API mirrors, on N images of the shipped vanilla model."""
    cfg = RunConfig(model=NAME, n=N, compare=[], stages=STAGES)
    return run_pipeline(cfg, tmp_path_factory.mktemp("api") / "run")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m, _card = load_checkpoint(NAME)
    return m


@pytest.fixture(scope="module")
def ev(model: torch.nn.Module, fmnist: Dataset) -> rd.EvaluateReport:
    return rd.evaluate(model, (fmnist.test.x[:N], fmnist.test.y[:N]), ["fgsm", "pgd-linf"], 0.1,
                       options={"curve_n": 40}, classes=fmnist.classes)  # fmt: skip


def same(table: list[dict[str, str]], records: list[dict[str, Any]], skip: tuple[str, ...] = ()) -> None:
    """Every cell of the CSV table equals the record's value (floats as written: 6 digits)."""
    assert len(table) == len(records) > 0
    for row, rec in zip(table, records, strict=True):
        for col, text in row.items():
            if col in skip:
                continue
            value = rec[col]
            if isinstance(value, bool) or value is None or isinstance(value, str):
                assert text == ("" if value is None else str(value)), (col, text, value)
            elif isinstance(value, int | float):
                if math.isnan(float(value)):
                    assert text.lower() == "nan", (col, text)
                else:
                    assert float(text) == pytest.approx(float(value), rel=2e-5, abs=1e-9), (col, text, value)
            else:
                assert text == str(value), (col, text, value)


def visible_axes(fig: Figure) -> int:
    return sum(1 for ax in fig.axes if ax.get_visible() and ax.axison)


def test_evaluate_equals_the_runs_tables(run: Path, ev: rd.EvaluateReport) -> None:
    table = read_table(run / "tables" / "robust_accuracy.csv")
    assert [r["attack"] for r in table] == ["clean", "fgsm", "pgd-linf", "worst case (L∞)"]
    same(table, ev.records())
    same(read_table(run / "tables" / "worst_case_cascade.csv"), ev.cascade)
    same(read_table(run / "tables" / "robust_accuracy_per_class.csv"), ev.per_class)
    same(read_table(run / "tables" / "perturbation_norms.csv"), ev.norms)
    same(read_table(run / "tables" / "accuracy_vs_eps.csv"), [{"eps": e, "accuracy": a}
                                                              for e, a in ev.accuracy_vs_eps.items()])  # fmt: skip
    same(read_table(run / "tables" / "accuracy_vs_steps.csv"), [{"steps": k, "accuracy": a}
                                                                for k, a in ev.accuracy_vs_steps.items()])  # fmt: skip
    assert list(ev.accuracy_vs_steps) == [1, 5, 20]
    # the curves' PGD at the table's ε with other step counts join the L∞ worst case
    cascade = [r["attack"] for r in ev.cascade]
    assert "pgd-linf k=1 (curves)" in cascade and "apgd-ce" in cascade
    acc = ev.accuracy
    assert acc["worst case (L∞)"] <= min(acc["fgsm"], acc["pgd-linf"]) < acc["clean"]
    assert ev.outcomes["pgd-linf"].x_adv.shape == (N, 1, 28, 28)
    fig = ev.plot()
    assert isinstance(fig, Figure) and len(fig.axes) == 1


def test_evaluate_takes_a_loader_a_split_and_a_dataset(model: torch.nn.Module, fmnist: Dataset,
                                                       ev: rd.EvaluateReport) -> None:  # fmt: skip
    x, y = fmnist.test.x[:N], fmnist.test.y[:N]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=25)
    from_loader = rd.evaluate(model, loader, "fgsm,pgd-linf", 0.1, options={"curves": False, "square_queries": 0,
                                                                              "worst_case": ["pgd-linf"]})  # fmt: skip
    assert from_loader.accuracy["pgd-linf"] == ev.accuracy["pgd-linf"]
    assert from_loader.accuracy["clean"] == ev.accuracy["clean"]
    split = rd.data.Split(x, y)
    only = {"square_queries": 0, "worst_case": ["fgsm"], "curves": False}
    assert rd.evaluate(model, split, ["fgsm"], 0.1, options=only).accuracy["fgsm"] == ev.accuracy["fgsm"]
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        rd.evaluate(model, (x * 255, y), ["fgsm"])
    with pytest.raises(UserError, match="DataLoader"):
        rd.evaluate(model, 3, ["fgsm"])  # type: ignore[arg-type]


def test_sensitivity_equals_the_runs_tables(run: Path, model: torch.nn.Module, fmnist: Dataset) -> None:
    x, y = fmnist.test.x[:N], fmnist.test.y[:N]
    # the stage's σ attack: L∞ PGD ε = 0.1, 10 steps, the paper's step rule
    attack = rd.attacks.make_attack("pgd-linf", eps=0.1, steps=10, step_rule="paper", seed=0, batch_size=250)
    sig = rd.sensitivity(model, x, attack(model, x, y).x_adv)
    same(read_table(run / "tables" / "sigma_layers.csv"), sig.records())
    same(read_table(run / "tables" / "sigma.csv"), sig.units() if isinstance(sig.units(), list) else
         sig.units().to_dict("records"))  # fmt: skip
    layers = {r["layer"] for r in sig.records()}
    assert {"conv1", "relu1"} <= layers
    assert visible_axes(sig.plot()) == len(layers)


def test_features_equal_the_runs_tables(run: Path, model: torch.nn.Module, fmnist: Dataset) -> None:
    opts = {k: v for k, v in STAGES["features"].items()}
    feats = rd.features(model, fmnist, options=opts, name=NAME)
    same(read_table(run / "tables" / "feature_layers.csv"), feats.records())
    same(read_table(run / "tables" / "feature_quadrants.csv"), feats.quadrants)
    units = read_table(run / "tables" / "feature_units.csv")
    same(units, feats.scores.rows())
    assert len(units) == sum(feats.scores.channels)
    assert visible_axes(feats.plot()) == 1
    with pytest.raises(UserError, match="reference"):
        rd.features(model, (fmnist.test.x[:8], fmnist.test.y[:8]))


def test_concepts_equal_the_runs_tables(run: Path, model: torch.nn.Module, fmnist: Dataset) -> None:
    con = rd.concepts(model, fmnist, n=120, permutations=10)
    same(read_table(run / "tables" / "concept_units.csv"), con.records())
    same(read_table(run / "tables" / "concept_categories.csv"), con.dissection.category_rows())
    assert visible_axes(con.plot()) == 1


def test_diagnose_equals_the_runs_tables(run: Path, model: torch.nn.Module, fmnist: Dataset,
                                         ev: rd.EvaluateReport) -> None:  # fmt: skip
    # the stage explains the evaluate stage's stored L∞ PGD examples (attacked on every analysed image)
    pgd = ev.outcomes["pgd-linf"]
    assert pgd.settings == build_attack("pgd-linf", ev.options, 0).describe()
    n = STAGES["diagnose"]["n"]
    diag = rd.diagnose(model, fmnist.test.x[:n], fmnist.test.y[:n], pgd.x_adv[:n], adv_pred=pgd.pred[:n],
                       inversion=rd.analysis.diagnose.InversionSettings(steps=5), x_mean=fmnist.train.x.mean(0),
                       resamples=20, show=2)  # fmt: skip
    same(read_table(run / "tables" / "diagnose_layers.csv"), diag.records())
    same(read_table(run / "tables" / "diagnose_correlation.csv"), diag.diagnosis.correlation_rows())
    same(read_table(run / "tables" / "diagnose_per_example.csv"), diag.diagnosis.per_example_rows())
    assert visible_axes(diag.plot()) == 4


def test_metric_and_landscape_equal_the_runs_tables(run: Path, model: torch.nn.Module, fmnist: Dataset) -> None:
    x, y = fmnist.test.x, fmnist.test.y
    psi = rd.metric(model, x[:40], 0.1, steps=3, calibration_x=fmnist.val.x[:100], name=NAME)
    same(read_table(run / "tables" / "metric_psi.csv"), psi.records(), skip=("seconds", "calibration_seconds"))
    assert psi.result.psi.shape == (40,) and psi.result.mean > 0
    assert visible_axes(psi.plot()) == 1
    land = rd.landscape(model, x[:4], y[:4], eps=0.1, grid=5, line_points=11, attack_steps=5, name=NAME)
    same(read_table(run / "tables" / "landscape_summary.csv"), land.records(), skip=("seconds",))
    per_image = land.per_image()
    same(read_table(run / "tables" / "landscape_per_image.csv"),
         per_image if isinstance(per_image, list) else per_image.to_dict("records"))  # fmt: skip
    assert len(land.plot().axes) == 2  # the contour plot and its colour bar


def test_to_frame_without_and_with_pandas(ev: rd.EvaluateReport, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pandas", None)  # `import pandas` fails
        records = ev.to_frame()
    assert isinstance(records, list) and records == ev.records()
    assert records is not ev.records()  # a copy: editing it leaves the result alone
    pandas = pytest.importorskip("pandas")
    df = ev.to_frame()
    assert isinstance(df, pandas.DataFrame)
    assert list(df["attack"]) == [r["attack"] for r in ev.records()]
    assert df["accuracy"].tolist() == pytest.approx([r["accuracy"] for r in ev.records()])


def test_results_are_frozen(ev: rd.EvaluateReport) -> None:
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.table = []  # type: ignore[misc]
    assert isinstance(ev.options, EvaluateOptions)


def test_readme_notebook_session_runs() -> None:
    """The README's Python API block that calls the analyses runs as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "rd.evaluate(" in b]
    assert len(blocks) == 1
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    ev = namespace["ev"]
    assert ev.accuracy["pgd-linf"] < ev.accuracy["clean"]
    assert isinstance(namespace["fig"], Figure)
