"""The `sensitivity` stage end to end on the shipped model, with tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean

import pytest

from robustdissect.config import RunConfig
from robustdissect.pipeline import run_pipeline
from robustdissect.runs import read_table

TINY = {
    "eps_sweep": [0.05, 0.1],
    "noise_severities": [3],
    "importance_n": 60,
    "importance_ks": [5],
    "suppression_betas": [1.0, 0.5],
    "suppression_n": 40,
    "suppression_draws": 1,
    "compare": ["fmnist-smallcnn-avg-vanilla", "no-such-checkpoint"],
    "batch_size": 100,
}


def test_sensitivity_stage_writes_every_experiment(tmp_path: Path, fmnist) -> None:
    cfg = RunConfig(n=60, quick=False, stages={"overview": {}, "sensitivity": TINY})
    run = run_pipeline(cfg, tmp_path / "run")
    res = json.loads((run / "results.json").read_text())
    entry = res["stages"]["sensitivity"]

    sigma = read_table(run / "tables" / "sigma.csv")
    assert len(sigma) == 2 * (16 + 16 + 32 + 32 + 64 + 64)  # every channel, conv and ReLU hook points
    assert all(float(r["sigma"]) >= 0 for r in sigma)
    layers = {r["layer"]: r for r in entry["layers"]}
    assert set(layers) >= {f"conv{i}" for i in range(1, 7)} | {f"relu{i}" for i in range(1, 7)}
    ranked: dict[str, list[tuple[int, float]]] = {}
    for r in sigma:
        ranked.setdefault(r["layer"], []).append((int(r["rank"]), float(r["sigma"])))
    for r in entry["layers"]:
        assert r["k"] == max(1, round(0.1 * r["channels"]))
        by_rank = [s for _rank, s in sorted(ranked[r["layer"]])]
        top, rest = by_rank[: r["k"]], by_rank[r["k"] :]
        assert len(by_rank) == r["channels"] and min(top) >= max(rest)  # ranks follow σ
        assert r["top_gap"] == pytest.approx(fmean(top) / fmean(rest), rel=1e-4)

    table_ii = entry["table_ii"]
    assert len(table_ii) == 12 and {"eps=0.05", "eps=0.1"} <= set(table_ii[0])
    assert [r["layer"] for r in table_ii[:2]] == ["conv1", "relu1"]

    assert {r["k"] for r in entry["importance"]} == {5}
    overlap = {r["layer"]: r for r in entry["overlap"]}
    assert set(overlap) == {f"conv{i}" for i in range(1, 7)}
    for r in overlap.values():
        assert r["targets"] >= 2 and r["k"] == max(1, round(0.1 * r["channels"]))
        assert _is_total_jaccard(r["total_jaccard"], r["k"], r["targets"], r["channels"]), r
    table = {r["layer"]: float(r["total_jaccard"]) for r in read_table(run / "tables" / "overlap_by_layer.csv")}
    assert table == pytest.approx({name: r["total_jaccard"] for name, r in overlap.items()}, rel=1e-5)
    sup = entry["suppression"]
    clean_beta1 = [r for r in sup if r["beta"] == 1.0 and r["condition"] == "clean"]
    assert len({round(r["accuracy"], 9) for r in clean_beta1}) == 1  # β = 1 changes nothing
    assert any("no-such-checkpoint" in w for w in entry["warnings"])
    for fig in ("sigma_profiles", "amplification", "ratio_vs_eps", "spearman_per_class", "overlap_by_layer",
                "suppression", "regions_of_interest", "compare_profiles"):  # fmt: skip
        assert (run / "figures" / f"{fig}.png").is_file(), fig
    assert "Neuron sensitivity" in (run / "report.html").read_text()


def _is_total_jaccard(value: float, k: int, targets: int, channels: int) -> bool:
    """Whether `value` can be |∩| / |∪| of `targets` sets of k ids out of `channels`: the
    intersection has i <= k ids, the union u ids with k <= u <= min(targets * k, channels), and
    i = k exactly when every set is the same (then u = k)."""
    fractions = (i / u for u in range(k, min(targets * k, channels) + 1) for i in range(k + 1) if (i == k) == (u == k))
    return any(abs(value - f) < 1e-12 for f in fractions)
