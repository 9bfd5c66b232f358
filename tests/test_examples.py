"""Every example config in examples/ runs through its command (in-process, the CLI entry) and the
run it writes holds the example's settings: a stage block of the YAML is not overridden by the
command's own option defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ANALYSES = ["evaluate", "sensitivity", "features", "concepts", "diagnose", "metric", "landscape"]


def _example(name: str) -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_there_is_one_example_per_command() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted([*ANALYSES, "run", "train"])
    for name in ANALYSES:  # each analysis example configures exactly its own stage
        assert list(_example(name)["stages"]) == [name], name


@pytest.mark.parametrize("name", ANALYSES)
def test_analysis_example_runs_with_its_settings(cli: Cli, tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    code, _out, err = cli([name, "--config", str(EXAMPLES / f"{name}.yaml"), "--out", str(out)])
    assert code == 0, err
    example = _example(name)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results["stages"]) == ["overview", name]
    entry = results["stages"][name]
    assert entry["tables"] and "could not run" not in entry["text"], entry["text"]
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["n"] == example["n"]
    for key, value in example["stages"][name].items():  # every key of the block reached the stage
        assert saved["stages"][name][key] == value, (name, key)


def test_a_stage_block_wins_over_command_line_defaults_and_loses_to_given_options(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import robustdissect.cli as cli_module

    seen: list[Any] = []
    monkeypatch.setattr(cli_module, "_execute", lambda cfg, target: seen.append(cfg))
    evaluate, concepts = str(EXAMPLES / "evaluate.yaml"), str(EXAMPLES / "concepts.yaml")
    assert cli(["evaluate", "--config", evaluate, "--out", str(tmp_path / "a")])[0] == 0
    assert cli(["evaluate", "--config", evaluate, "--out", str(tmp_path / "b"), "--attacks", "fgsm",
                "--steps", "7", "--n", "9"])[0] == 0  # fmt: skip
    assert cli(["concepts", "--config", concepts, "--out", str(tmp_path / "c")])[0] == 0
    assert cli(["evaluate", "--out", str(tmp_path / "d")])[0] == 0
    block = _example("evaluate")["stages"]["evaluate"]
    defaults, given, concept, plain = (cfg.stages for cfg in seen)
    assert defaults["evaluate"] == block  # --attacks all, --steps 20, --eps 0.1 left at their defaults
    assert given["evaluate"] == {**block, "attacks": "fgsm", "pgd_steps": 7}
    assert seen[1].n == 9
    assert concept["concepts"]["n"] == _example("concepts")["stages"]["concepts"]["n"]  # not --concept-n's 2000
    assert concept["concepts"]["join"] is False
    assert plain["evaluate"] == {"attacks": "all", "eps": 0.1, "eps_l2": 1.5, "pgd_steps": 20}


def test_run_example_runs_every_stage(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, _out, err = cli(["run", "--config", str(EXAMPLES / "run.yaml"), "--out", str(out)])
    assert code == 0, err
    example = _example("run")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results["stages"]) == list(example["stages"])
    for name, entry in results["stages"].items():
        assert "could not run" not in entry["text"], (name, entry["text"])
    assert len(results["stages"]["evaluate"]["tables"]) >= 3
    assert (out / "report.html").is_file() and (out / "units.html").is_file()


def test_train_example_trains(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "train"
    code, _out, err = cli(["train", "--config", str(EXAMPLES / "train.yaml"), "--out", str(out)])
    assert code == 0, err
    card = json.loads((out / "model.json").read_text(encoding="utf-8"))
    text = json.dumps(card)
    assert '"pat"' in text
    assert (out / "model.safetensors").stat().st_size > 1000
