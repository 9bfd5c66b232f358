from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np


def _one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("robustdissect: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_run_quick_writes_a_complete_run_directory(tmp_path: Path, cli, fmnist) -> None:
    out = tmp_path / "run"
    cfg = tmp_path / "overview.yaml"
    cfg.write_text("stages: [overview]\nn: 500\n")
    code, _, err = cli(["run", "--config", str(cfg), "--out", str(out)])
    assert code == 0, err
    for rel in (
        "config.yaml",
        "env.json",
        "results.json",
        "report.html",
        "tables/confusion_matrix.csv",
        "tables/clean_accuracy_per_class.csv",
        "figures/confusion_matrix.png",
        "figures/samples.png",
    ):
        assert (out / rel).is_file(), rel
    res = json.loads((out / "results.json").read_text())
    assert res["schema_version"] == 1 and res["model"] == "fmnist-smallcnn-vanilla"
    assert res["dataset"]["name"] == "fashion-mnist" and res["dataset"]["analysed_n"] == 500
    assert 0.9 < res["clean_accuracy"] <= 1.0
    assert "overview" in res["stages"]
    cm = np.array(res["stages"]["overview"]["confusion_matrix"])
    assert cm.sum() == 500 and abs(np.trace(cm) / 500 - res["clean_accuracy"]) < 1e-9
    assert not (tmp_path / "run.partial").exists()

    # an existing run directory is not overwritten silently
    code, _, err = cli(["run", "--config", str(cfg), "--out", str(out)])
    _one_line_error(code, err, "already exists")

    # the report can be rebuilt from the files alone
    (out / "report.html").unlink()
    code, _, err = cli(["report", str(out)])
    assert code == 0 and "fmnist-smallcnn-vanilla" in (out / "report.html").read_text()


def test_user_errors_exit_2_with_one_line_and_leave_nothing(tmp_path: Path, cli) -> None:
    out = tmp_path / "bad"
    code, _, err = cli(["run", "--quick", "--model", "no-such-model", "--out", str(out)])
    _one_line_error(code, err, "unknown model 'no-such-model'")
    assert not out.exists() and not (tmp_path / "bad.partial").exists()

    code, _, err = cli(["run", "--quick", "--data-dir", str(tmp_path / "missing"), "--out", str(out)])
    _one_line_error(code, err, "does not exist")
    assert not out.exists() and not (tmp_path / "bad.partial").exists()

    code, _, err = cli(["layers", "--model", "smallcnn", "--model-arg", "widthh=3"])
    _one_line_error(code, err, "bad arguments for model")

    (tmp_path / "cfg.yaml").write_text("modle: smallcnn\n")
    code, _, err = cli(["run", "--config", str(tmp_path / "cfg.yaml"), "--out", str(out)])
    _one_line_error(code, err, "did you mean: model")


def test_class_count_mismatch_via_cli(cli, tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((30, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "three.npz", x=x, y=np.arange(30) % 3)
    code, _, err = cli(
        ["run", "--quick", "--data", "npz", "--data-dir", str(tmp_path / "three.npz"), "--out", str(tmp_path / "r")]
    )
    _one_line_error(code, err, "outputs 10 classes but the dataset has 3")
    code, _, err = cli(
        [
            "run",
            "--quick",
            "--model",
            "smallcnn",
            "--weights",
            "src/robustdissect/weights/fmnist-smallcnn-vanilla.safetensors",
            "--data",
            "npz",
            "--data-dir",
            str(tmp_path / "three.npz"),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    _one_line_error(code, err, "the model expects (3,)")


def test_layers_and_list(cli) -> None:
    code, out, _ = cli(["layers"])
    assert code == 0 and "conv6.bn" in out and "relu6" in out
    code, out, _ = cli(["list", "checkpoints"])
    assert code == 0 and "fmnist-smallcnn-vanilla" in out
    code, _, err = cli(["list", "nonsense"])
    _one_line_error(code, err, "cannot list")


def test_quick_caps_n_at_200_and_says_so_once(tmp_path: Path, cli, fmnist, caplog) -> None:
    cfg = tmp_path / "overview.yaml"
    cfg.write_text("stages: [overview]\n")
    out = tmp_path / "q"
    with caplog.at_level(logging.INFO):
        code, _, err = cli(["run", "--quick", "--config", str(cfg), "--n", "10000000", "--out", str(out)])
    assert code == 0, err
    capped = [m for m in caplog.messages if "--quick analyses" in m]
    assert capped == ["--quick analyses 200 images, not 10000000; drop --quick to analyse them all"], caplog.messages
    assert json.loads((out / "results.json").read_text())["dataset"]["analysed_n"] == 200
    code, help_text, _ = cli(["run", "--help"])
    assert code == 0 and "200" in help_text and "300" not in help_text


def test_help_starts_without_loading_torch() -> None:
    """`robustdissect --help` and a command's --help answer without importing torch (about 1.5 s
    here): the commands import their library calls when they run."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from robustdissect.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\n"
    )
    for args in (["--help"], ["evaluate", "--help"]):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().endswith("torch not loaded"), (args, out.stdout[-300:])
