"""Analysing commands under torchrun: 2 CPU processes (gloo) write the same run directory as one
process, on the built-in data and on an ImageFolder with a 3-channel user model.

Each rank attacks and predicts its share of the images (every image draws from its own random
stream), the shards are gathered in image order, σ sums are merged across ranks, and rank 0 alone
writes files. Adversarial examples and predictions must be identical; tables and summaries equal
up to float summation order (rel 1e-6)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from robustdissect.store import list_evidence, load_evidence

STAGES: dict[str, Any] = {
    "overview": {},
    "evaluate": {"attacks": ["pgd-linf", "fgsm"], "pgd_steps": 3, "curves": False, "corruptions": [],
                 "worst_case": ["pgd-linf", "fgsm", "apgd-dlr"], "apgd_steps": 5,
                 "square_queries": 20},
    "sensitivity": {"experiments": ["profiles", "amplification", "roi"], "steps": 3},
    "features": {"reference_n": 24, "feature_steps": 2, "restarts": 1, "candidates_per_bin": 1,
                 "permutations": 5, "bootstrap": 10},
    "concepts": {"n": 30, "permutations": 5, "steps": 2, "figure_concepts": 1, "gradcam_images": 1},
}  # fmt: skip

USER_NET = '''
import torch
from torch import nn

def make(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)  # the same weights in every process
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32, num_classes),
    )
'''


def _launch(tmp_path: Path, config: dict[str, Any], out: Path, procs: int) -> None:
    cfg = tmp_path / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    launcher = tmp_path / "launch.py"
    launcher.write_text("from robustdissect.cli import main\nmain()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(launcher), "run", "--config", str(cfg), "--out", str(out)]
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        cmd += ["--", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _close(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _close(u, v, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        fa, fb = float(a), float(b)
        assert (math.isnan(fa) and math.isnan(fb)) or math.isclose(fa, fb, rel_tol=1e-6, abs_tol=1e-9), where
    else:
        assert a == b, where


def _cell(v: str) -> Any:
    try:
        return float(v)
    except ValueError:
        return v


def _same_run(one: Path, two: Path) -> None:
    """Same files, same evidence (bitwise), same tables and stage summaries (float tolerance)."""
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != ".lock")  # noqa: E731
    assert files(one) == files(two)
    assert not any(p.name.startswith("robustdissect-rank-") for p in Path(os.environ.get("TMPDIR", "/tmp")).iterdir()
                   if p.stat().st_mtime > one.stat().st_mtime)  # fmt: skip
    items = list_evidence(one)
    assert {"pgd-linf", "fgsm"} <= {e["parts"].get("name") for e in items if e["kind"] == "adv"}
    assert items and [(e["kind"], e["key"]) for e in items] == [(e["kind"], e["key"]) for e in list_evidence(two)]
    for e in items:
        if e["kind"] in ("adv", "predictions"):
            a, b = load_evidence(one, e["kind"], e["key"])[0], load_evidence(two, e["kind"], e["key"])[0]
            for k in a:
                assert torch.equal(a[k], b[k]), (e["parts"].get("name"), k)
    for table in sorted((one / "tables").glob("*.csv")):
        with table.open() as f1, (two / "tables" / table.name).open() as f2:
            _close([{k: _cell(v) for k, v in r.items()} for r in csv.DictReader(f1)],
                   [{k: _cell(v) for k, v in r.items()} for r in csv.DictReader(f2)], table.name)  # fmt: skip
    figures = sorted((one / "figures").glob("*.png"))  # the ranks render them in turns
    assert len(figures) >= 2
    for fig in figures:
        a, b = (np.asarray(Image.open(d / "figures" / fig.name).convert("RGB"), dtype=float) for d in (one, two))
        assert a.shape == b.shape and np.abs(a - b).mean() < 0.5, fig.name
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert set(r1["stages"]) == set(STAGES)
    for name in STAGES:
        _close(r1["stages"][name].get("summary"), r2["stages"][name].get("summary"), name)
    assert json.loads((two / "env.json").read_text())["processes"] == 2


def test_two_processes_equal_one_on_the_builtin_data(tmp_path: Path) -> None:
    # the PAT model keeps images robust past PGD and FGSM, so APGD-DLR and Square run in the cascade
    config = {"model": "fmnist-smallcnn-pat", "compare": [], "n": 30, "seed": 0, "device": "cpu",
              "quick": True, "stages": STAGES}  # fmt: skip
    _launch(tmp_path, config, tmp_path / "one", 1)
    _launch(tmp_path, config, tmp_path / "two", 2)
    _same_run(tmp_path / "one", tmp_path / "two")
    cascade = {e["parts"].get("name") for e in list_evidence(tmp_path / "one") if e["kind"] == "adv"}
    assert {"apgd-dlr", "square-linf"} <= cascade


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes x 12 random 20x20 RGB PNGs, with a little class signal in the red channel."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c, name in enumerate(("ant", "bee", "cow")):
        (root / name).mkdir(parents=True)
        for i in range(12):
            a = rng.integers(0, 200, (20, 20, 3), dtype=np.uint8)
            a[..., 0] = np.clip(a[..., 0].astype(int) + 25 * c, 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def test_two_processes_equal_one_on_an_image_folder(tmp_path: Path, image_folder: Path) -> None:
    (tmp_path / "net.py").write_text(USER_NET)
    config = {"model": f"{tmp_path / 'net.py'}:make", "compare": [], "dataset": "image-folder",
              "data_dir": str(image_folder), "split": "train", "n": 20, "seed": 0, "device": "cpu", "quick": True,
              "stages": STAGES}  # fmt: skip
    _launch(tmp_path, config, tmp_path / "one", 1)
    _launch(tmp_path, config, tmp_path / "two", 2)
    _same_run(tmp_path / "one", tmp_path / "two")


def test_a_share_is_kept_until_its_item_is_stored(tmp_path: Path) -> None:
    """A rank's share of an unfinished item survives an interruption and is reused; once the
    whole item is stored the share files and their folders are gone."""
    from robustdissect.store import EvidenceStore

    store = EvidenceStore(tmp_path / "evidence")
    parts = {"name": "pgd-linf", "images": "abc"}
    calls: list[int] = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"x_adv": torch.arange(6.0).view(3, 2)}

    first = store.fetch_shard("adv", parts, slice(3, 6), compute)
    assert store.shard_path("adv", parts, slice(3, 6)).is_file() and len(calls) == 1
    again = EvidenceStore(tmp_path / "evidence").fetch_shard("adv", parts, slice(3, 6), compute)  # a resumed run
    assert torch.equal(first["x_adv"], again["x_adv"]) and len(calls) == 1
    assert list_evidence(tmp_path) == []  # shares are not items
    other = {"name": "pgd-linf", "images": "def"}  # another item's share, left by an interrupted run
    store.fetch_shard("adv", other, slice(0, 3), compute)
    store.drop_shards("adv", parts)
    assert not store.shard_path("adv", parts, slice(3, 6)).exists()
    store.remove_empty_shard_folders()  # the unfinished share stays for --resume
    assert store.shard_path("adv", other, slice(0, 3)).is_file()
    store.drop_shards("adv", other)
    store.remove_empty_shard_folders()
    assert not (tmp_path / "evidence" / ".shards").exists()
