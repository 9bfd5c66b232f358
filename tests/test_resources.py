"""Package resources: training presets by name or path, shipped checkpoints, report templates, and
the CLI commands that read them."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustdissect import resources
from robustdissect.errors import UserError
from robustdissect.models import list_models, shipped_checkpoints

PRESETS = Path(__file__).resolve().parents[1] / "src" / "robustdissect" / "configs" / "train"


def test_presets_are_the_committed_files() -> None:
    names = resources.train_presets()
    assert names == sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert "fmnist-smallcnn-vanilla" in names and "cifar10-vgg16-pat" in names
    from robustdissect.training import OBJECTIVES
    from robustdissect.training.loop import train_config_from_dict

    for name in names:
        cfg = resources.read_train_config(name)
        # every preset is a valid training config: a known objective, positive epochs, a dataset
        tc = train_config_from_dict(dict(cfg), name)
        assert tc.objective in OBJECTIVES.names() and tc.epochs >= 1 and tc.dataset, name
        assert name.split("-")[0] in ("fmnist", "cifar10", "mnist"), name


def test_config_by_path_wins_and_errors_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.yaml").write_text("epochs: 3\nlr: 0.1\n")
    assert resources.read_train_config(tmp_path / "mine.yaml") == {"epochs": 3, "lr": 0.1}
    assert resources.read_train_config(str(tmp_path / "mine.yaml")) == {"epochs": 3, "lr": 0.1}
    # A file in the working directory named like a preset is read as that file.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fmnist-smallcnn-pat").write_text("epochs: 1\n")
    assert resources.read_train_config("fmnist-smallcnn-pat") == {"epochs": 1}
    with pytest.raises(UserError, match="configs/train/fmnist-smallcnn-pat.yaml does not exist; .*--config fmnist"):
        resources.read_train_config("configs/train/fmnist-smallcnn-pat.yaml")
    with pytest.raises(UserError, match="mine.yml does not exist$"):
        resources.read_train_config("mine.yml")
    with pytest.raises(UserError, match="unknown training preset 'fmnist-smallcnn-vanila'; did you mean"):
        resources.read_train_config("fmnist-smallcnn-vanila")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping of settings, not list"):
        resources.read_train_config("list.yaml")
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(UserError, match="bad.yaml is not valid YAML"):
        resources.read_train_config("bad.yaml")


def test_checkpoint_files_and_templates() -> None:
    names = resources.checkpoint_names()
    assert names == shipped_checkpoints() and "fmnist-smallcnn-pat" in names
    weights, card = resources.checkpoint_files("fmnist-smallcnn-pat")
    assert weights.name == "fmnist-smallcnn-pat.safetensors" and weights.is_file()
    assert card.name == "fmnist-smallcnn-pat.json" and card.is_file()
    with pytest.raises(UserError, match="unknown shipped checkpoint 'fmnist-smallcnn-pta'"):
        resources.checkpoint_files("fmnist-smallcnn-pta")
    assert "{{" in resources.template("report.html.j2")
    with pytest.raises(FileNotFoundError, match="nope.j2"):
        resources.template("nope.j2")


def test_cli_list_filters_with_a_pattern(cli) -> None:
    code, out, _ = cli(["list", "models", "fmnist-*"])
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == list_models("fmnist-*")
    assert all("checkpoint of smallcnn" in line for line in out.splitlines())
    code, out, _ = cli(["list", "models"])
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == list_models()
    assert "architecture" in next(line for line in out.splitlines() if line.startswith("vgg16 "))
    code, out, _ = cli(["list", "checkpoints", "fmnist-smallcnn-avg-*"])
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == [
        "fmnist-smallcnn-avg-pat",
        "fmnist-smallcnn-avg-vanilla",
    ]
    code, out, _ = cli(["list", "presets", "cifar10-*"])
    assert code == 0 and out.splitlines() == [
        f"robustdissect train --config {n}" for n in resources.train_presets() if n.startswith("cifar10-")
    ]


def test_cli_train_takes_a_preset_name(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # The error names the CIFAR-10 folder that only the preset holds: the preset was read.
    code, _, err = cli(["train", "--config", "cifar10-vgg16-vanilla", "--out", "o"])
    assert code == 2 and "data/cifar-10-batches-py" in err, err
    assert not (tmp_path / "o").exists()
    code, _, err = cli(["train", "--config", "fmnist-smallcnn-vanila", "--out", "o"])
    assert code == 2 and "unknown training preset 'fmnist-smallcnn-vanila'" in err, err


def test_shipped_studies_are_the_studies_in_docs() -> None:
    """The package ships copies of the finished studies (`python -m robustdissect.studies.ship`): they
    must not drift from docs/results, where the study commands write."""
    import json

    from robustdissect.studies.ship import STUDIES

    assert set(STUDIES) == {"ig1-fmnist.json", "yu1-fmnist.json"}
    for name, source in STUDIES.items():
        shipped = resources.shipped_result(name)
        assert shipped == json.loads(source.read_text()), f"{name} differs from {source}: run studies.ship"
    assert resources.shipped_result("no-such-study.json") is None
