"""The concepts stage on the shipped vanilla model: tables, figures and section from a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from robustdissect.config import RunConfig
from robustdissect.data import Dataset
from robustdissect.pipeline import run_pipeline


def test_concepts_stage_writes_dissection(tmp_path: Path, fmnist: Dataset) -> None:
    opts = {"n": 150, "permutations": 20, "join": False, "figure_concepts": 2, "top_images": 3}
    cfg = RunConfig(n=50, stages={"concepts": opts}, quick=True)
    out = run_pipeline(cfg, tmp_path / "run")
    results = json.loads((out / "results.json").read_text())
    entry = results["stages"]["concepts"] if "stages" in results else results["concepts"]
    assert entry["summary"]["concept images"] == 150 and entry["summary"]["units"] == 16 + 16 + 32 + 32 + 64 + 64
    with (out / "tables" / "concept_units.csv").open() as f:
        units = list(csv.DictReader(f))
    assert len(units) == 224 and {u["layer"] for u in units} == {f"conv{i}" for i in range(1, 7)}
    for u in units:
        iou, null = float(u["iou"]), float(u["null_iou"])
        assert 0.0 <= iou <= 1.0
        assert (u["detector"] == "True") == (iou > 0.04 and iou > null)
        assert float(u["threshold_error"]) >= 0
    with (out / "tables" / "concept_categories.csv").open() as f:
        cats = list(csv.DictReader(f))
    assert sum(int(c["detectors"]) for c in cats) == entry["summary"]["detectors"]
    assert (out / "figures" / "concept_label_counts.png").is_file()
    if entry["summary"]["detectors"]:
        assert (out / "figures" / "concept_top_units.png").is_file()
    assert "concept" in (out / "report.html").read_text().lower()


def test_concepts_stage_joins_feature_quadrants(tmp_path: Path, fmnist: Dataset) -> None:
    opts = {"n": 150, "permutations": 20, "join": True, "compare": [], "figure_concepts": 2, "gradcam_images": 2}
    cfg = RunConfig(n=60, stages={"concepts": opts}, quick=True)
    out = run_pipeline(cfg, tmp_path / "run")
    with (out / "tables" / "concept_fragility_units.csv").open() as f:
        units = list(csv.DictReader(f))
    assert len(units) == 224 and {u["quadrant"] for u in units} <= {"RU", "NRU", "RL", "NL"}
    with (out / "tables" / "concept_fragility_categories.csv").open() as f:
        cats = list(csv.DictReader(f))
    dets = [u for u in units if u["detector"] == "True"]
    assert sum(int(c["units"]) for c in cats) == len(dets)
    for c in cats:  # fragility recomputed from the unit table
        r = [float(u["r"]) for u in dets if u["category"] == c["category"] and u["r"] not in ("", "nan")]
        if r:
            assert float(c["fragility"]) == pytest.approx(sum(1 - v for v in r) / len(r), abs=1e-5)
    with (out / "tables" / "concept_enrichment.csv").open() as f:
        enrich = list(csv.DictReader(f))
    assert {e["concepts"] for e in enrich} == {"texture", "high-frequency"}
    assert all(0.0 <= float(e["p_value"]) <= 1.0 for e in enrich)
    for name in ("concept_fragility", "concept_gradcam"):
        assert (out / "figures" / f"{name}.png").is_file()
