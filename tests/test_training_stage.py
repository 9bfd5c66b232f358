"""The `training` stage on a tiny run: shipped vanilla plus a missing checkpoint (a warning)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from robustdissect.config import RunConfig
from robustdissect.evaluation import wilson_interval
from robustdissect.pipeline import run_pipeline

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


def test_training_stage_tiny(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = RunConfig(n=64, device="cpu", stages={"overview": {}, "training": TINY})
    run = run_pipeline(cfg, tmp_path / "run")
    entry = json.loads((run / "results.json").read_text())["stages"]["training"]

    assert any("fmnist-smallcnn-nonexistent" in w and "robustdissect train" in w for w in entry["warnings"])
    assert entry["models"] == ["vanilla"]
    with (run / "tables" / "training_comparison_long.csv").open() as f:
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
    assert wide["model"] == "vanilla" and wide["epochs"] == 8 and wide["objective"] == "vanilla"
    assert math.isclose(wide["clean"], by["clean"])
    assert (run / "adv" / "vanilla" / "pgd-linf.safetensors").is_file()
    assert [r["steps"] for r in entry["pgd_steps"]] == [1, 2]
    for name in ("training_pgd_steps", "training_pgd_eps", "training_sigma_layers", "training_sigma_sorted"):
        assert (run / "figures" / f"{name}.png").is_file()
    assert entry["sigma"]["models"] == ["vanilla"] and len(entry["sigma"]["layers"]) == 6
    assert "report.html" in {p.name for p in run.iterdir()}
