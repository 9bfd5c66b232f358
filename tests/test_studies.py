"""E12 layer-selection study on a tiny configuration (width-4 smallcnn, 256 images, 1 epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robustdissect.errors import UserError
from robustdissect.studies.sns_layers import layer_selection_study, main, read_layer_study
from robustdissect.training import TrainConfig

BASE = TrainConfig(
    model="smallcnn",
    model_args={"width": 4},
    n=256,
    epochs=1,
    batch_size=64,
    lr=0.01,
    seed=1,
    device="cpu",
    objective="sns",
    objective_args={"eps": 0.1, "steps": 2, "reference": "initial", "select_n": 32, "variant": "sen"},
)


def test_layer_selection_study_trains_each_k_and_resumes(tmp_path: Path, fmnist) -> None:
    torch.set_num_threads(1)
    kw = {"attacks": ["pgd-linf"], "pgd_steps": 3, "eval_n": 64, "data": fmnist}
    rows = layer_selection_study(BASE, [1, 2], tmp_path / "study", **kw)
    assert [r["k"] for r in rows] == [1, 2]
    assert rows[0]["layers"] == "conv6" and rows[1]["layers"] == "conv5,conv6"
    assert rows[0]["frozen"] > rows[1]["frozen"] > 0  # fewer layers trained = more frozen below them
    for r in rows:
        assert r["epochs"] == 1
        for col in ("clean", "pgd-linf"):
            assert r[f"{col}_ci_low"] <= r[col] <= r[f"{col}_ci_high"]
    saved = json.loads((tmp_path / "study" / "layer_selection.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    assert (tmp_path / "study" / "layer_selection.csv").read_text().startswith("k,layers,frozen")
    assert (tmp_path / "study" / "layer_selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_layer_study(tmp_path / "study") == saved

    # a second call loads the trained models instead of retraining, with the same numbers
    stamp = (tmp_path / "study" / "top1" / "model.safetensors").stat().st_mtime_ns
    again = layer_selection_study(BASE, [1, 2], tmp_path / "study", **kw)
    assert again == rows
    assert (tmp_path / "study" / "top1" / "model.safetensors").stat().st_mtime_ns == stamp


def test_layer_selection_study_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        layer_selection_study(BASE, [], tmp_path / "none")
    assert main(["--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2


def test_read_layer_study_rejects_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no layer-selection study"):
        read_layer_study(tmp_path)
    (tmp_path / "layer_selection.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_layer_study(tmp_path)
    (tmp_path / "layer_selection.json").write_text('[{"layers": "conv6"}]')
    with pytest.raises(UserError, match="no study rows"):
        read_layer_study(tmp_path)
