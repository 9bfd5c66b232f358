"""The `compare` stage on a tiny run: shipped vanilla plus a missing checkpoint (a warning)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from robustdissect.config import RunConfig
from robustdissect.evaluation import wilson_interval
from robustdissect.pipeline import run_pipeline
from robustdissect.stages.compare import LAYER_STUDY_COMMAND, _layer_study_block
from robustdissect.store import list_evidence

TINY = {
    "models": ["fmnist-smallcnn-vanilla", "fmnist-smallcnn-nonexistent"],
    "attacks": ["pgd-linf", "fgsm", "spsa"],
    "attack_options": {"pgd_steps": 3, "blackbox_n": 16, "spsa_iterations": 2, "spsa_samples": 16},
    "curve_n": 16,
    "steps_sweep": [1, 2],
    "eps_sweep": [0.05, 0.1],
    "curve_steps": 2,
    "sigma_n": 16,
    "sigma_steps": 2,
}


def _study_rows() -> list[dict[str, object]]:
    """Rows in the format `python -m robustdissect.studies.sns_layers` writes (two k)."""
    return [
        {"k": k, "layers": layers, "frozen": frozen, "epochs": 1, "train_seconds": 1.0,
         "clean": c, "clean_ci_low": c - 0.02, "clean_ci_high": c + 0.02,
         "pgd-linf": p, "pgd-linf_ci_low": p - 0.03, "pgd-linf_ci_high": p + 0.03}
        for k, layers, frozen, c, p in ((1, "conv6", 15, 0.88, 0.77), (2, "conv5,conv6", 12, 0.87, 0.78))
    ]  # fmt: skip


def test_compare_stage_tiny(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    study = tmp_path / "study"
    study.mkdir()
    (study / "layer_selection.json").write_text(json.dumps(_study_rows()))
    cfg = RunConfig(n=64, device="cpu", quick=False,
                    stages={"overview": {}, "compare": {**TINY, "layer_study": str(study)}})
    run = run_pipeline(cfg, tmp_path / "run")
    entry = json.loads((run / "results.json").read_text())["stages"]["compare"]

    assert any("fmnist-smallcnn-nonexistent" in w and "robustdissect train" in w for w in entry["warnings"])
    assert entry["models"] == ["fmnist-smallcnn-vanilla"]
    with (run / "tables" / "compare_accuracy_long.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["attack"] for r in rows] == ["clean", "pgd-linf", "fgsm", "spsa"]
    for r in rows:
        n, acc = int(r["n"]), float(r["accuracy"])
        assert n == (16 if r["attack"] == "spsa" else 64)
        lo, hi = wilson_interval(round(acc * n), n)
        assert math.isclose(float(r["ci_low"]), lo, abs_tol=1e-6)  # the CSV keeps 6 digits
        assert math.isclose(float(r["ci_high"]), hi, abs_tol=1e-6)
        assert float(r["ci_low"]) <= acc <= float(r["ci_high"])
    by = {r["attack"]: float(r["accuracy"]) for r in rows}
    assert by["clean"] > 0.7 and by["pgd-linf"] < by["clean"]  # the vanilla model breaks under PGD

    wide = entry["comparison"][0]
    assert wide["model"] == "fmnist-smallcnn-vanilla" and wide["epochs"] == 8 and wide["objective"] == "vanilla"
    assert math.isclose(wide["clean"], by["clean"])
    stored = {i["parts"]["name"] for i in list_evidence(run) if i["kind"] == "adv"}
    assert {"pgd-linf", "fgsm", "spsa"} <= stored
    assert [r["steps"] for r in entry["pgd_steps"]] == [1, 2]
    for name in ("compare_pgd_steps", "compare_pgd_eps", "compare_sigma_layers", "compare_sigma_sorted"):
        assert (run / "figures" / f"{name}.png").is_file()
    assert entry["sigma"]["models"] == ["fmnist-smallcnn-vanilla"] and len(entry["sigma"]["layers"]) == 6
    assert "report.html" in {p.name for p in run.iterdir()}

    # E12 from the finished study: its rows as a table, accuracy against k as a figure
    with (run / "tables" / "compare_layer_selection.csv").open() as f:
        study_rows = list(csv.DictReader(f))
    assert [int(r["k"]) for r in study_rows] == [1, 2]
    assert [float(r["pgd-linf"]) for r in study_rows] == [0.77, 0.78]
    assert (run / "figures" / "compare_layer_selection.png").is_file()
    assert not any("E12" in w for w in entry["warnings"])


def test_compare_stage_without_layer_study_adds_nothing() -> None:
    warnings: list[str] = []
    tables: list[dict[str, str]] = []
    _layer_study_block(None, None, tables, [], warnings)  # type: ignore[arg-type]
    assert warnings == [] and tables == [] and "robustdissect.studies.sns_layers" in LAYER_STUDY_COMMAND


def test_compare_stage_without_a_counterpart_says_what_to_pass(tmp_path: Path) -> None:
    """A model with no --compare: one sentence naming --compare and the train command, no table."""
    cfg = RunConfig(model="fmnist-smallcnn-pat", compare=[], n=16, device="cpu",
                    stages={"overview": {}, "compare": {}})  # fmt: skip
    run = run_pipeline(cfg, tmp_path / "run")
    entry = json.loads((run / "results.json").read_text())["stages"]["compare"]
    assert entry["text"].startswith("No robust counterpart") and "--compare" in entry["text"]
    assert "robustdissect train --model fmnist-smallcnn-pat --objective pat" in entry["text"]
    assert entry["tables"] == [] and entry["summary"] == {}
    assert not (run / "tables" / "compare_accuracy.csv").exists()
