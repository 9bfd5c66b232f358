"""The concepts stage on the shipped vanilla model: tables, figures and section from a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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
