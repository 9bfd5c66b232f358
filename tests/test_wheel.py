"""The package as a user installs it: a wheel built from this tree, installed with --no-deps into a
fresh virtual environment and run from a directory outside the tree. Presets, shipped checkpoints
and the report template must all come from the installed package.

The fresh environment sees the already installed dependencies (torch, ...) through a .pth file
that names this environment's site-packages. A plain path line in a .pth file does not make that
folder a site directory, so its own .pth files, among them the editable install's, stay inactive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from robustdissect import resources
from robustdissect.models import list_models, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "src" / "robustdissect" / "configs" / "train"
WEIGHTS = REPO / "src" / "robustdissect" / "weights"
TEMPLATES = REPO / "src" / "robustdissect" / "report" / "templates"
RESULTS = REPO / "src" / "robustdissect" / "results"


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path
    script: Path
    site: Path
    cwd: Path  # outside the tree: nothing in it can shadow the installed package
    env: dict[str, str]


def _run(cmd: list[str | Path], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600, rc: int = 0) -> str:
    """Run cmd; any other exit status fails the test with the command's whole output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != rc:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {proc.returncode} (expected {rc})\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}",
            pytrace=False,
        )
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy so that no build/ or egg-info is left in (or reused from) the tree.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = root / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, source],
        cwd=root,
    )
    wheels = sorted(dist.glob("robustdissect-*.whl"))
    assert len(wheels) == 1, wheels

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    # Installed before the dependencies become visible, so pip sees an empty environment.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheels[0]], cwd=root)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_robustdissect_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))

    cwd = root / "elsewhere"
    cwd.mkdir()
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONNOUSERSITE": "1"}
    return Installed(wheels[0], python, venv / "bin" / "robustdissect", site, cwd, env)


def test_wheel_holds_every_resource(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {
        *(f"robustdissect/configs/train/{p.name}" for p in PRESETS.glob("*.yaml")),
        *(f"robustdissect/weights/{p.name}" for p in WEIGHTS.iterdir() if p.suffix in (".json", ".safetensors")),
        *(f"robustdissect/report/templates/{p.name}" for p in TEMPLATES.glob("*.j2")),
        *(f"robustdissect/results/{p.name}" for p in RESULTS.glob("*.json")),
        "robustdissect/py.typed",
    }
    assert len(expected) > 30
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.startswith("configs/")]  # no top-level copy of the presets


def test_the_installed_package_is_used_not_the_tree(installed: Installed) -> None:
    code = "import json, sys, robustdissect, torch; print(json.dumps([robustdissect.__file__, sys.path]))"
    file, path = json.loads(_run([installed.python, "-c", code], cwd=installed.cwd, env=installed.env))
    assert Path(file).is_relative_to(installed.site), file
    assert str(REPO / "src") not in path and str(REPO) not in path, path


def test_cli_lists_models_and_reads_a_preset(installed: Installed) -> None:
    out = _run([installed.script, "list", "models"], cwd=installed.cwd, env=installed.env)
    assert [line.split()[0] for line in out.splitlines()] == list_models()
    out = _run([installed.script, "list", "models", "fmnist-*"], cwd=installed.cwd, env=installed.env)
    assert [line.split()[0] for line in out.splitlines()] == list_models("fmnist-*")
    assert len(out.splitlines()) == len(list_models("fmnist-*")) >= 10
    out = _run([installed.script, "list", "presets"], cwd=installed.cwd, env=installed.env)
    assert out.splitlines() == [f"robustdissect train --config {n}" for n in resources.train_presets()]
    # The preset is found and read: the error names the CIFAR-10 folder that only the preset holds.
    out = _run(
        [installed.script, "train", "--config", "cifar10-vgg16-vanilla", "--out", "o"],
        cwd=installed.cwd,
        env=installed.env,
        rc=2,
    )
    assert "data/cifar-10-batches-py" in out and not (installed.cwd / "o").exists(), out
    out = _run(
        [installed.script, "train", "--config", "fmnist-smallcnn-vanila", "--out", "o"],
        cwd=installed.cwd,
        env=installed.env,
        rc=2,
    )
    assert "did you mean: fmnist-smallcnn-vanilla" in out, out
    assert "--config" in _run([installed.script, "train", "--help"], cwd=installed.cwd, env=installed.env)


def test_checkpoint_preset_and_report_template_load_from_the_wheel(installed: Installed) -> None:
    run = installed.cwd / "report-run"
    script = textwrap.dedent(
        f"""
        import json
        from pathlib import Path

        import torch

        from robustdissect import resources
        from robustdissect.models import resolve_model
        from robustdissect.report import render_report

        model, card = resolve_model("fmnist-smallcnn-vanilla")
        x = torch.linspace(0, 1, 4 * 28 * 28).reshape(4, 1, 28, 28)
        with torch.no_grad():
            logits = model(x).tolist()
        run = Path({str(run)!r})
        run.mkdir()
        results = {{"schema_version": 1, "model": "fmnist-smallcnn-vanilla", "dataset": {{"name": "fashion-mnist"}}}}
        (run / "results.json").write_text(json.dumps({{**results, "stages": {{}}}}))
        print(json.dumps({{
            "logits": logits,
            "card": card["name"],
            "weights": str(resources.resource("weights")),
            "preset": resources.read_train_config("fmnist-smallcnn-pat"),
            "report": str(render_report(run)),
            "studies": sorted(resources.shipped_result(n)["settings"] is not None
                              for n in ("ig1-fmnist.json", "yu1-fmnist.json")),
        }}))
        """
    )
    got = json.loads(_run([installed.python, "-c", script], cwd=installed.cwd, env=installed.env))
    reference, _card = load_checkpoint("fmnist-smallcnn-vanilla")
    x = torch.linspace(0, 1, 4 * 28 * 28).reshape(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(torch.tensor(got["logits"]), reference(x), atol=1e-5)
    assert got["card"] == "fmnist-smallcnn-vanilla"
    assert Path(got["weights"]).is_relative_to(installed.site), got["weights"]
    assert got["preset"] == yaml.safe_load((PRESETS / "fmnist-smallcnn-pat.yaml").read_text())
    assert got["studies"] == [True, True]  # the metric and diagnose stages find their studies
    report = Path(got["report"])
    assert report == run / "report.html"
    assert "<title>robustdissect report: fmnist-smallcnn-vanilla on fashion-mnist</title>" in report.read_text()


@pytest.mark.slow
def test_quick_run_from_the_wheel(installed: Installed) -> None:
    out = installed.cwd / "run"
    _run([installed.script, "run", "--quick", "--n", "50", "--out", out], cwd=installed.cwd, env=installed.env)
    assert (out / "results.json").is_file() and (out / "report.html").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "fmnist-smallcnn-vanilla"


def test_wheel_requires_ranges_never_exact_pins(installed: Installed) -> None:
    """The package installs beside the user's PyTorch: every Requires-Dist is a range, none `==`;
    the exact pin lives only in the setup's constraints.txt."""
    with zipfile.ZipFile(installed.wheel) as wheel:
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in wheel.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]  # fmt: skip
    assert any(r.startswith("torch") for r in requires)
    pinned = [r for r in requires if "==" in r.split(";")[0]]  # (a marker such as extra == "dev" is no pin)
    assert pinned == [], f"exact pins in the wheel's requirements: {pinned}"
    torch_req = next(r for r in requires if r.split(">")[0].split("<")[0].split(";")[0].strip() == "torch")
    assert ">=" in torch_req
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text()
