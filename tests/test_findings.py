"""What a run found, in sentences (report/findings.py), the report's readable labels
(report/labels.py), and both in a real run's report.html and console lines."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from robustdissect.config import RunConfig
from robustdissect.pipeline import headline, run_pipeline
from robustdissect.report.findings import findings, model_label
from robustdissect.report.labels import format_table, format_value, label, short_name, summary_rows

NAN = math.nan


def _evaluate(clean: float = 0.9, linf: float = 0.1, l2: float | None = 0.25, warnings: list[str] | None = None,
              worst: bool = True) -> dict[str, Any]:  # fmt: skip
    table = [
        {"attack": "clean", "kind": "clean", "n": 200, "accuracy": clean, "ci_low": 0.851, "ci_high": 0.934,
         "settings": ""},
        {"attack": "pgd-linf", "kind": "white-box", "n": 200, "accuracy": 0.12, "ci_low": 0.081, "ci_high": 0.173,
         "settings": "eps=0.1, steps=20, alpha=0.02236"},
        {"attack": "pgd-l2", "kind": "white-box", "n": 200, "accuracy": 0.3, "ci_low": 0.241, "ci_high": 0.367,
         "settings": "eps=1.5, steps=20"},
        {"attack": "cw-l2", "kind": "white-box", "n": 200, "accuracy": 0.27, "ci_low": 0.213, "ci_high": 0.336,
         "settings": "eps=1.5"},
    ]  # fmt: skip
    if worst:
        table.append({"attack": "worst case (L∞)", "kind": "worst case", "n": 200, "accuracy": linf,
                      "ci_low": 0.066, "ci_high": 0.149, "settings": "eps=0.1; cascade pgd-linf → fgsm → apgd-ce"})
        if l2 is not None:
            table.append({"attack": "worst case (L2)", "kind": "worst case", "n": 200, "accuracy": l2,
                          "ci_low": 0.196, "ci_high": 0.314, "settings": "eps=1.5; min over pgd-l2, cw-l2"})
    settings = {"pgd-linf": {"norm": "linf", "eps": 0.1}, "pgd-l2": {"norm": "l2", "eps": 1.5},
                "cw-l2": {"norm": "l2"}}  # fmt: skip
    return {"title": "Robustness evaluation", "summary": {"clean": "90.0% [85.1, 93.4]"}, "table": table,
            "attack_settings": settings, "warnings": warnings or []}  # fmt: skip


def _features(models: list[str], nru: list[float], ru: list[float]) -> dict[str, Any]:
    rows = []
    for i, m in enumerate(models):
        for q, share in (("RU", ru[i]), ("NRU", nru[i]), ("RL", 0.2), ("NL", 0.1)):
            row = {"model": m, "quadrant": q, "share": share, "importance_share": 0.4 if q == "NRU" else 0.2,
                   "ci_low": share - 0.05, "ci_high": share + 0.05, "diff_vs_first": NAN, "diff_ci_low": NAN,
                   "diff_ci_high": NAN}  # fmt: skip
            if i:
                base = (ru if q == "RU" else nru)[0] if q in ("RU", "NRU") else 0.0
                d = share - base
                row.update(diff_vs_first=d, diff_ci_low=d - 0.04, diff_ci_high=d + 0.03)
            rows.append(row)
    return {"title": "Features", "summary": {"units": 224, "share NRU": nru[0]}, "quadrants": rows, "models": models}


DIAGNOSE = {
    "title": "Layer diagnosis",
    "summary": {"adversarial examples judged": 40, "most frequent flip layer": "pool2"},
    "layers": [
        {"layer": "input", "d": 0.15, "A": None, "V": 0.0},
        {"layer": "relu1", "d": 0.25, "A": 1.6667, "V": 0.05},
        {"layer": "pool1", "d": 0.55, "A": 2.2, "V": 0.1},
        {"layer": "pool2", "d": 0.6, "A": 1.0909, "V": 0.25},
    ],
    "warnings": [],
}

CONCEPTS = {
    "title": "Concepts",
    "summary": {},
    "most_fragile": [
        {"model": "path/to/net.py:make", "concept": "stripes", "units": 4, "fragility": 0.8312, "fragility_se": 0.052,
         "nru": 3, "nru_low": 0.301, "nru_high": 0.954},
        {"model": "path/to/net.py:make", "concept": "red", "units": 2, "fragility": 0.41, "fragility_se": 0.1,
         "nru": 0, "nru_low": 0.0, "nru_high": 0.658},
    ],
    "warnings": [],
}  # fmt: skip


def robust_with_compare() -> dict[str, Any]:
    """A user's model (`file.py:factory`) with a robust counterpart under the new `compare` stage."""
    return {
        "model": "/home/u/models/net.py:make",
        "compare": ["robust=/home/u/ckpt/net_pat.safetensors"],
        "dataset": {"analysed_split": "test"},
        "stages": {
            "evaluate": _evaluate(warnings=["black-box attack 'spsa' leaves 40.0% robust accuracy, 20.0 points "
                                            "below the best white-box attack: gradients may be masked"]),
            "diagnose": {**DIAGNOSE, "warnings": ["no IG-1 pooling study to show: run python -m x"]},
            "features": _features(["/home/u/models/net.py:make", "robust"], nru=[0.339, 0.004], ru=[0.196, 0.567]),
            "concepts": {**CONCEPTS, "most_fragile": [{**r, "model": "/home/u/models/net.py:make"}
                                                     for r in CONCEPTS["most_fragile"]]},
            "compare": {
                "title": "Robust counterparts compared",
                "summary": {},
                "comparison": [
                    {"model": "net:make", "clean": 0.9, "clean_ci_low": 0.851, "clean_ci_high": 0.934,
                     "pgd-linf": 0.12, "pgd-linf_ci_low": 0.081, "pgd-linf_ci_high": 0.173},
                    {"model": "robust", "clean": 0.85, "clean_ci_low": 0.794, "clean_ci_high": 0.893,
                     "pgd-linf": 0.7, "pgd-linf_ci_low": 0.633, "pgd-linf_ci_high": 0.76},
                ],
                "warnings": ["model other not compared: no such file", "a third thing", "a fourth thing"],
            },
            "metric": {"title": "Robustness metric Ψ", "summary": {}, "models": [
                {"model": "net", "psi_mean": 6.3468, "psi_p90": 10.753, "n": 100, "eps": 0.1},
                {"model": "robust", "psi_mean": 0.058461, "psi_p90": 0.2047, "n": 100, "eps": 0.1}]},
        },
    }  # fmt: skip


def test_robust_model_with_compare_states_every_answer() -> None:
    got = findings(robust_with_compare())
    assert got == [
        "Clean accuracy of net:make: 90.0% [85.1, 93.4] on 200 test images.",
        "Worst-case robust accuracy under L∞ ε = 0.1: 10.0% [6.6, 14.9]; under L2 ε = 1.5: 25.0% [19.6, 31.4] (an "
        "upper bound of the true robust accuracy: a stronger attack can only lower it).",
        "Vulnerability enters at pool1: the adversarial perturbation is amplified most there (A = 2.2, relative "
        "distortion d 0.25 → 0.55).",
        # V = 25% of 40 judged = 10 examples: Wilson [14.2, 40.2]; no flip 1 - 0.4 = 60%
        "Explanations of the adversarial examples turn into the adversarial class for good most often at pool2 "
        "(25.0% [14.2, 40.2] of 40 judged examples; for 60.0% the judge never reads the adversarial class).",
        "33.9% [28.9, 38.9] of the 224 units of net:make are useful but brittle (the dangerous quadrant NRU: useful "
        "for the class, not robust under attack) and carry 40.0% of its importance; 19.6% [14.6, 24.6] are robust "
        "and useful.",
        "The dangerous units of net:make carry its most fragile concepts: stripes (3 of 4 detectors dangerous "
        "[30.1, 95.4], fragility 0.83 ± 0.05); fragility is the mean 1 − γ̂/ρ over a concept's detectors.",
        "Robust counterparts on the same images: robust clean 85.0% [79.4, 89.3], PGD (L∞) 70.0% [63.3, 76.0].",
        "Against net:make, robust has 0.4% useful but brittle units (−33.5 points [−37.5, −30.5]) and 56.7% robust "
        "and useful units (+37.1 points [+33.1, +40.1]).",
        "Ψ, the largest change of the calibrated prediction (KL) in the L∞ ball of ε = 0.1, lower is more robust: "
        "6.35 for net (90th percentile 10.8); 0.0585 for robust (90th percentile 0.205), mean over 100 images.",
        # masking first, then the model left out, then the rest; the IG-1 note never
        "Warning (Robustness evaluation): black-box attack 'spsa' leaves 40.0% robust accuracy, 20.0 points below "
        "the best white-box attack: gradients may be masked.",
        "Warning (Robust counterparts compared): model other not compared: no such file.",
        "Warning (Robust counterparts compared): a third thing.",
        "1 more warning in the sections below.",
    ]
    assert not any("/home/u" in s for s in got)


def test_model_without_compare_and_the_old_training_stage() -> None:
    results = {
        "model": "fmnist-smallcnn-vanilla",
        "model_label": "vanilla",
        "stages": {
            "evaluate": _evaluate(worst=False),
            "sensitivity": {"title": "Neuron sensitivity", "summary": {"attack": "PGD-L∞ ε=0.1, k=10"},
                            "options": {"fraction": 0.1}, "layers": [
                                {"layer": "conv1", "hook": "conv", "ratio_mean_sensitive": 0.424},
                                {"layer": "conv2", "hook": "conv", "ratio_mean_sensitive": 0.913},
                                {"layer": "relu2", "hook": "relu", "ratio_mean_sensitive": 5.0},
                                {"layer": "conv3", "hook": "conv", "ratio_mean_sensitive": None}]},
            "features": _features(["fmnist-smallcnn-vanilla"], nru=[0.5], ru=[0.25]),
            "training": {"title": "Robust training compared", "summary": {}, "warnings": [],
                         "comparison": [{"model": "vanilla", "clean": 0.9, "pgd-linf": 0.0}]},
        },
    }  # fmt: skip
    got = findings(results)
    assert got == [
        "Clean accuracy of vanilla: 90.0% [85.1, 93.4] on 200 images.",
        # no worst-case rows: the strongest white-box attack of each threat model
        "Worst-case robust accuracy under L∞ ε = 0.1: 12.0% [8.1, 17.3], strongest attack PGD (L∞); under L2 ε = "
        "1.5: 27.0% [21.3, 33.6], strongest attack C&W (L2) (an upper bound of the true robust accuracy: a "
        "stronger attack can only lower it).",
        "Vulnerability enters at conv2: its top 10% most sensitive units change the most relative to their clean "
        "response under PGD-L∞ ε=0.1, k=10 (mean σ_Ratio 0.913, the highest of 2 layers).",
        "50.0% [45.0, 55.0] of the 224 units of vanilla are useful but brittle (the dangerous quadrant NRU: useful "
        "for the class, not robust under attack) and carry 40.0% of its importance; 25.0% [20.0, 30.0] are robust "
        "and useful.",
    ]
    assert model_label(results) == "vanilla"


def test_compare_stage_that_could_not_run_says_why() -> None:
    why = "No robust counterpart to compare with: pass --compare SPEC."
    results = {"model": "ckpt/my_model.safetensors", "stages": {
        "compare": {"title": "Robust counterparts compared", "text": why, "unavailable": why, "warnings": []}}}
    assert findings(results) == [why]


def test_missing_stages_and_overview_only() -> None:
    assert findings({}) == []
    assert findings({"model": "x", "stages": {}}) == []
    results = {"model": "runs/t/best.pt", "stages": {"overview": {"title": "Model", "clean_accuracy": 0.9,
                                                                  "summary": {"images": 60}}}}  # fmt: skip
    # 54 of 60 correct: Wilson [79.9, 95.3]; the checkpoint is named by its stem
    assert findings(results) == ["Clean accuracy of best: 90.0% [79.9, 95.3] on 60 images."]


def test_nan_values_never_reach_a_sentence() -> None:
    results = robust_with_compare()
    st = results["stages"]
    for row in st["evaluate"]["table"]:
        row.update(accuracy=NAN, ci_low=NAN, ci_high=NAN)
    st["diagnose"]["layers"] = [{**r, "A": NAN, "V": NAN} for r in st["diagnose"]["layers"]]
    for row in st["features"]["quadrants"]:
        row.update(share=NAN, diff_vs_first=NAN)
    st["metric"]["models"] = [{**r, "psi_mean": NAN} for r in st["metric"]["models"]]
    st["compare"]["comparison"] = [{**r, "pgd-linf_ci_low": NAN} for r in st["compare"]["comparison"]]
    st["concepts"]["most_fragile"] = [{**r, "fragility_se": NAN} for r in st["concepts"]["most_fragile"]]
    got = findings(results)
    assert not any(re.search(r"\bnan\b", s, re.IGNORECASE) for s in got)
    assert not any(s.startswith(("Clean accuracy", "Worst-case", "Vulnerability", "Ψ")) for s in got)
    # a missing interval end drops the interval, never the number
    assert "Robust counterparts on the same images: robust clean 85.0% [79.4, 89.3], PGD (L∞) 70.0%." in got
    assert any("stripes (3 of 4 detectors dangerous [30.1, 95.4], fragility 0.83)" in s for s in got)
    # JSON's NaN is null: the same
    assert findings(json.loads(json.dumps(results).replace("NaN", "null"))) == got


def test_short_names() -> None:
    assert short_name("fmnist-smallcnn-pat") == "fmnist-smallcnn-pat"
    assert short_name("/full/path/to/models.py:lenet5") == "models:lenet5"
    assert short_name("models.py:lenet5") == "models:lenet5"
    assert short_name("torchvision.models:resnet50") == "models:resnet50"
    assert short_name("runs/x/cifar_cnn.safetensors") == "cifar_cnn"
    assert short_name("robust=/a/b/adv.safetensors") == "robust"


def test_labels_and_formats() -> None:
    assert label("features", "share RU") == ("share of robust & useful units (RU)", "pct")
    assert label("features", "reliance on RU units (/full/path/to/models.py:lenet5)")[0] == (
        "importance on robust & useful units, models:lenet5")
    assert label("pushback", "dbp_criterion_holds") == ("D_bp criterion holds", "bool")
    assert label("pushback", "some_new_key") == ("some new key", "auto")
    assert label("training", "pat pgd-linf")[0] == "pat: PGD (L∞)"
    assert label("metric", "Ψ /x/y/net.py:make", {"/x/y/net.py:make": "mine"})[0] == "Ψ, mine"
    rows = dict(summary_rows("pushback", {"dbp_criterion_holds": False, "share_robust_kept": 0.6216,
                                          "RS fmnist-smallcnn-pat": 0.9292, "acc: clean, purified": 0.875,
                                          "ratio": 0.123456789, "nothing": NAN, "absent": None}))  # fmt: skip
    assert rows == {"D_bp criterion holds": "no", "robust units kept by D_bp": "62.2%",
                    "reliance shift RS, fmnist-smallcnn-pat": "92.9%", "accuracy: clean, purified": "87.5%",
                    "ratio": "0.123", "nothing": "n/a", "absent": "–"}  # fmt: skip
    assert format_value(108.0771) == "108" and format_value(12345.6) == "12,346" and format_value(True) == "yes"
    assert format_value("0.69", "pct") == "69.0%" and format_value("nan") == "n/a"
    header, body = format_table(
        ["model", "clean", "clean_ci_low", "clean_ci_high", "pgd-linf", "share", "ci_low", "n", "rs_phi"],
        [["/a/b/net.py:make", "0.916667", "0.819308", "1", "0", "0.339286", "0.265513", "60", "0.490912"]],
    )
    assert header == ["model", "clean", "clean 95% low", "clean 95% high", "PGD (L∞)", "share", "95% low", "images",
                      "rs phi"]  # fmt: skip
    assert body == [["net:make", "91.7%", "81.9%", "100.0%", "0.0%", "33.9%", "26.6%", "60", "0.491"]]


# ---------------------------------------------------------------------------------------------
# a real run on Fashion-MNIST: the report's first section and the console's last lines

STAGES = {
    "overview": {},
    "evaluate": {"attacks": ["pgd-linf", "fgsm"], "worst_case": ["pgd-linf", "fgsm"], "corruptions": [],
                 "pgd_steps": 5, "eps_sweep_relative": [1.0], "steps_sweep": [1, 5], "curve_n": 60},
    "features": {"n": 60, "reference_n": 300, "feature_steps": 3, "restarts": 1, "candidates_per_bin": 1,
                 "permutations": 20, "bootstrap": 50, "compare": ["fmnist-smallcnn-pat"]},
}  # fmt: skip


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory, fmnist: Any) -> Path:
    return run_pipeline(RunConfig(n=60, stages=STAGES), tmp_path_factory.mktemp("findings") / "run")


def test_report_opens_with_the_sentences_before_any_table(small_run: Path) -> None:
    results = json.loads((small_run / "results.json").read_text())
    found = findings(results)
    assert [s.split(":")[0] for s in found[:2]] == ["Clean accuracy of fmnist-smallcnn-vanilla",
                                                    "Worst-case robust accuracy under L∞ ε = 0.1"]  # fmt: skip
    assert any("are useful but brittle" in s for s in found)
    assert any(s.startswith("Against fmnist-smallcnn-vanilla, fmnist-smallcnn-pat has ") for s in found)
    page = (small_run / "report.html").read_text()
    first = page.index('<section id="findings">')
    assert page.index("<table") > first  # nothing tabular above the answers
    end = page.index("</section>", first)
    block = page[first:end]
    assert "What this run found" in block and "<table" not in block
    import html

    text = html.unescape(block)
    positions = [text.index(s) for s in found]
    assert positions == sorted(positions)  # every sentence, in order
    tables = " ".join(re.findall(r"<table.*?</table>", page, flags=re.S))
    assert "share_ru" not in tables.lower() and "ci_low" not in tables
    assert not re.search(r"<th>[^<]*[A-Za-z]_[a-z][^<]*</th>", tables)  # no raw snake_case key or column
    assert "<th>share RU</th><td>" not in tables and "<th>share of robust &amp; useful units (RU)</th><td>" in tables
    assert not re.search(r"\d\.\d{6,}", tables), re.search(r".{40}\d\.\d{6,}.{20}", tables)
    assert not re.search(r">\s*nan\s*<", tables, flags=re.IGNORECASE)


def test_console_ends_with_the_same_sentences(small_run: Path) -> None:
    results = json.loads((small_run / "results.json").read_text())
    lines = headline(results)
    found = findings(results)
    assert lines[-len(found) - 1].startswith("What this run found")
    assert [ln.removeprefix("  - ") for ln in lines[-len(found):]] == found
    numbers = "\n".join(lines[: -len(found) - 1])
    assert "share of useful but brittle units (NRU, dangerous)" in numbers and "share NRU" not in numbers
    assert not re.search(r"\d\.\d{6,}", numbers)
