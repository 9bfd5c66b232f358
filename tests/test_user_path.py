"""The user's path end to end: their own `file.py:factory` model and its robust twin (`--compare`),
on their own data (a CIFAR-shaped .npz, or the built-in data for a 1-channel model), through every
stage of `run`. Nothing of the shipped Fashion-MNIST models may appear in such a run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli, UserModel

from robustdissect.config import DEFAULT_STAGES

NAN = re.compile(r"(?<![A-Za-z0-9+/])nan(?![A-Za-z0-9+/=])", re.IGNORECASE)


def _run_user(cli: Cli, user: UserModel, out: Path, *extra: str) -> dict[str, Any]:
    data = ["--data", "npz", "--data-dir", str(user.data)] if user.data else []
    args = ["run", "--quick", "--n", "60", "--model", f"mine={user.spec}", "--weights", str(user.weights),
            "--model-arg", f"in_channels={user.channels}", "--compare", f"robust={user.spec}",
            "--compare-weights", str(user.robust_weights), *data, "--out", str(out), *extra]  # fmt: skip
    code, stdout, err = cli(args)
    assert code == 0, err
    assert stdout.rstrip().endswith(f"wrote {out}/report.html")
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    return results


def _every_stage_computed_on_the_pair(results: dict[str, Any], out: Path, user: UserModel) -> None:
    stages = results["stages"]
    assert list(stages) == list(DEFAULT_STAGES)
    for name, entry in stages.items():
        assert not entry["text"].startswith("This analysis could not run"), (name, entry["text"])
        assert "unavailable" not in entry, name
    assert results["model"] == "mine" and list(results["compared"]) == ["robust"]
    assert [r["model"] for r in stages["compare"]["comparison"]] == ["mine", "robust"]
    assert stages["diagnose"]["judge"] == "robust"
    assert [r["model"] for r in stages["metric"]["models"]] == ["mine", "robust"]
    assert [r["model"] for r in stages["landscape"]["models"]] == ["mine", "robust"]
    assert [r["model"] for r in stages["pushback"]["pushback"]["reliance"]] == ["mine", "robust"]
    assert stages["pushback"]["text"].startswith("Computed in this run")
    report = (out / "report.html").read_text()
    for text in (report, (out / "results.json").read_text()):
        assert "fmnist" not in text  # no shipped model, study or number in a run on the user's models
        assert not NAN.search(text), NAN.search(text)  # (a word, not inside base64 image data)
    # models are named by their short names: no path of theirs reaches the report
    for path in (user.spec.rsplit(":", 1)[0], str(user.weights), str(user.robust_weights)):
        assert path not in report
    env = json.loads((out / "env.json").read_text())
    assert env["device"] == "cpu"


@pytest.mark.slow
def test_run_on_a_colour_user_model_and_its_robust_twin(tmp_path: Path, cli: Cli, user_model_rgb: UserModel) -> None:
    out = tmp_path / "run"
    results = _run_user(cli, user_model_rgb, out, "--device", "cpu")
    assert results["dataset"]["name"] == "npz" and results["dataset"]["image_shape"] == [3, 32, 32]
    _every_stage_computed_on_the_pair(results, out, user_model_rgb)
    first_screen = (out / "report.html").read_text().split("<table")[0]
    assert "Clean accuracy of mine" in first_screen


@pytest.mark.slow
def test_run_on_a_grey_user_model_on_the_built_in_data(tmp_path: Path, cli: Cli, user_model: UserModel) -> None:
    out = tmp_path / "run"
    results = _run_user(cli, user_model, out)
    assert results["dataset"]["name"] == "fashion-mnist"
    _every_stage_computed_on_the_pair(results, out, user_model)


def test_a_user_model_without_counterpart_gets_sentences_not_nan(
    tmp_path: Path, cli: Cli, user_model: UserModel
) -> None:
    """No --compare beside a user model: the comparing stages say what to pass, in one sentence."""
    out = tmp_path / "run"
    code, _out, err = cli(["run", "--quick", "--n", "40", "--model", user_model.spec, "--weights",
                           str(user_model.weights), "--config", str(_stages(tmp_path, ["compare", "diagnose"])),
                           "--out", str(out)])  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "standard" and results["compared"] == {}
    compare = results["stages"]["compare"]
    assert compare["text"].startswith("No robust counterpart to compare with: pass --compare")
    diagnose = results["stages"]["diagnose"]
    assert any("pass --compare" in w for w in diagnose["warnings"])
    assert all("nan" not in str(v).lower() for v in diagnose["summary"].values())


def _stages(folder: Path, names: list[str]) -> Path:
    path = folder / "stages.yaml"
    path.write_text("stages: [overview, evaluate, " + ", ".join(names) + "]\n")
    return path


def test_compare_entries_and_their_mistakes(tmp_path: Path, cli: Cli, user_model: UserModel) -> None:
    """--compare-weights pairs with --compare; mistakes are one line and leave nothing behind."""
    out = tmp_path / "run"
    code, _o, err = cli(["evaluate", "--model", user_model.spec, "--weights", str(user_model.weights),
                         "--compare-weights", "a.safetensors", "--out", str(out)])  # fmt: skip
    assert code == 2 and "--compare-weights needs --compare" in err and not out.exists()
    code, _o, err = cli(["evaluate", "--model", user_model.spec, "--weights", str(user_model.weights),
                         "--compare", "a=x.py:make,b=y.py:make", "--compare-weights", "1,2,3", "--out", str(out)])
    assert code == 2 and "3 files for 2 --compare models" in err and not out.exists()
    code, _o, err = cli(["evaluate", "--model", user_model.spec, "--weights", str(user_model.weights),
                         "--compare", "twin=fmnist-smallcnn-pat", "--data", "npz", "--data-dir",
                         str(tmp_path / "missing.npz"), "--out", str(out)])  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    code, _o, err = cli(["evaluate", "--model", user_model.spec, "--weights", str(user_model.weights),
                         "--device", "cuda:7", "--out", str(out)])  # fmt: skip
    assert code == 2 and "cuda:7 is not available" in err and not out.exists()
    code, _o, err = cli(["evaluate", "--model", user_model.spec, "--weights", str(user_model.weights),
                         "--normalize", "0.1,0.2/0.3", "--out", str(out)])  # fmt: skip
    assert code == 2 and "gives 2 mean and 1 std values for 1-channel images" in err and not out.exists()


def test_train_a_user_model_with_pat_then_compare_the_pair(tmp_path: Path, cli: Cli) -> None:
    """A two-layer user model trained for one short epoch, standard and PAT, on a CIFAR-format
    fixture; then `run --compare` on the pair: the PAT twin is the counterpart and the judge."""
    from test_training_user import write_cifar, write_net

    net, data = write_net(tmp_path / "code"), write_cifar(tmp_path / "cifar")
    spec = f"{net}:make"
    for objective in ("vanilla", "pat"):
        code, _o, err = cli(["train", "--model", spec, "--data", "cifar10", "--data-dir", str(data), "--objective",
                             objective, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / objective)])
        assert code == 0, err
    out = tmp_path / "run"
    stages = tmp_path / "stages.yaml"
    stages.write_text("stages: [overview, evaluate, compare, diagnose]\n")
    code, _o, err = cli(["run", "--quick", "--n", "40", "--model", f"std={spec}", "--weights",
                         str(tmp_path / "vanilla" / "model.safetensors"), "--compare", f"pat={spec}",
                         "--compare-weights", str(tmp_path / "pat" / "model.safetensors"), "--data", "cifar10",
                         "--data-dir", str(data), "--config", str(stages), "--out", str(out)])  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["stages"]["compare"]["comparison"]}
    assert list(rows) == ["std", "pat"]
    assert rows["pat"]["objective"] == "pat" and rows["pat"]["epochs"] == 1  # from the card beside the weights
    assert rows["std"]["objective"] == "vanilla"
    assert results["stages"]["diagnose"]["judge"] == "pat"
    assert "fmnist" not in (out / "report.html").read_text()
