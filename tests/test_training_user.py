"""`train` on the user's own `file.py:factory` model: PAT on a CIFAR-format fixture (card, load
back, evaluate), SNS on a 1-channel user model on Fashion-MNIST, and torchrun data parallelism."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Cli

from robustdissect.data import Dataset, load_dataset
from robustdissect.models.resolve import resolve_model
from robustdissect.modelutil import accuracy
from robustdissect.training import TrainConfig, train

NET = '''
from torch import nn


def make(in_channels=3, num_classes=10):
    """Two conv layers and a linear head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
'''


def write_net(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "net.py"
    path.write_text(NET)
    return path


def write_cifar(root: Path, per_batch: int = 60, n_test: int = 100, seed: int = 0) -> Path:
    """The CIFAR-10 python-pickle layout (data_batch_1..5, test_batch: dicts with b"data" (N, 3072)
    uint8 and b"labels"), with images whose mean colour depends on the class (learnable)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = rng.uniform(0.2, 0.8, size=(10, 3))

    def batch(n: int) -> bytes:
        labels = rng.integers(0, 10, size=n)
        x = palette[labels][:, :, None, None] + rng.normal(0, 0.15, size=(n, 3, 32, 32))
        data = (np.clip(x, 0, 1) * 255).astype(np.uint8).reshape(n, -1)
        return pickle.dumps({b"data": data, b"labels": [int(v) for v in labels]})

    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(batch(per_batch))
    (root / "test_batch").write_bytes(batch(n_test))
    return root


def test_pat_on_a_user_model_with_cifar_data_loads_back_and_evaluates(tmp_path: Path, cli: Cli) -> None:
    net, data_dir, run = write_net(tmp_path / "code"), write_cifar(tmp_path / "cifar"), tmp_path / "run"
    spec = f"{net}:make"
    code, out, err = cli(["train", "--model", spec, "--data", "cifar10", "--data-dir", str(data_dir),
                          "--objective", "pat", "--eps", "8/255", "--objective-arg", "steps=2", "--epochs", "1",
                          "--batch-size", "64", "--device", "cpu", "--out", str(run)])  # fmt: skip
    assert code == 0, err
    assert f"wrote {run}/model.safetensors" in out
    card = json.loads((run / "model.json").read_text())
    assert card["user_model"] is True and card["arch"] == {"name": spec}
    assert card["model"] == {"spec": spec, "kind": "user", "factory_args": {}, "init": None}
    assert card["dataset"] == "cifar10" and card["data_dir"] == str(data_dir) and card["epochs"] == 1
    assert card["objective"]["name"] == "pat" and card["objective"]["eps"] == pytest.approx(8 / 255)
    assert card["objective"]["steps"] == 2
    assert card["loads_with"] == f"--model {net.resolve()}:make --weights {run / 'model.safetensors'}"
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1]

    # the saved weights load back into the factory's model (the card's load line) and give its accuracy
    ds = load_dataset("cifar10", str(data_dir))
    model, _card = resolve_model(spec, str(run / "model.safetensors"), data=ds)
    assert accuracy(model, ds.test.x, ds.test.y) == pytest.approx(card["test_accuracy"], abs=1e-4)

    # evaluate with the arguments the card names
    ev = tmp_path / "ev"
    code, _out, err = cli(["evaluate", *shlex.split(card["loads_with"]), "--data", "cifar10", "--data-dir",
                           str(data_dir), "--n", "50", "--attacks", "fgsm", "--curves", "none", "--corruptions",
                           "none", "--out", str(ev)])  # fmt: skip
    assert code == 0, err
    results = json.loads((ev / "results.json").read_text())
    expected = accuracy(model, ds.test.x[:50], ds.test.y[:50])
    assert results["clean_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= results["robust_accuracy"]["fgsm"] <= results["clean_accuracy"]

    # as a checkpoint with its card, a user model is refused with the line that loads it
    code, _out, err = cli(["evaluate", "--model", str(run / "model.safetensors"), "--data", "cifar10",
                           "--data-dir", str(data_dir), "--n", "10", "--out", str(tmp_path / "ev2")])  # fmt: skip
    assert code == 2 and "holds a user model" in err and "--weights" in err and len(err.strip().splitlines()) == 1


def test_sns_on_a_one_channel_user_model(tmp_path: Path, cli: Cli) -> None:
    """SNS finds the user model's conv layers by layer resolution (two Conv2d: S = both), selects
    its sensitive neurons on the model itself (no shipped reference fits it) and trains."""
    net, run = write_net(tmp_path / "code"), tmp_path / "sns"
    spec = f"{net}:make"
    code, _out, err = cli(["train", "--model", spec, "--model-arg", "in_channels=1", "--data", "fashion-mnist",
                           "--objective", "sns", "--objective-arg", "steps=2", "--objective-arg", "select_n=64",
                           "--objective-arg", "fraction=0.25", "--n", "128", "--epochs", "1", "--batch-size", "64",
                           "--device", "cpu", "--out", str(run)])  # fmt: skip
    assert code == 0, err
    card = json.loads((run / "model.json").read_text())
    obj = card["objective"]
    assert obj["name"] == "sns" and obj["reference"] == "initial" and obj["layers"] == ["0", "2"]
    assert obj["frozen"] == [] and obj["variant"] == "sen"
    assert {k: len(v) for k, v in obj["omega"].items()} == {"0": 2, "2": 2}  # 25% of 8 channels
    assert all(0 <= u < 8 for v in obj["omega"].values() for u in v)
    assert card["model"]["factory_args"] == {"in_channels": 1}
    assert card["loads_with"].endswith("--model-arg in_channels=1")
    ds = load_dataset("fashion-mnist")
    model, _card = resolve_model(spec, str(run / "model.safetensors"), {"in_channels": 1}, ds)
    assert accuracy(model, ds.test.x, ds.test.y) == pytest.approx(card["test_accuracy"], abs=1e-4)
    # the card's load line, factory arguments included, works on an analysing command
    ev = tmp_path / "ev"
    code, _out, err = cli(["evaluate", *shlex.split(card["loads_with"]), "--data", "fashion-mnist", "--n", "40",
                           "--attacks", "fgsm", "--curves", "none", "--corruptions", "none",
                           "--out", str(ev)])  # fmt: skip
    assert code == 0, err
    results = json.loads((ev / "results.json").read_text())
    assert results["clean_accuracy"] == pytest.approx(accuracy(model, ds.test.x[:40], ds.test.y[:40]), abs=1e-6)


def test_user_model_errors_are_one_line(tmp_path: Path, cli: Cli) -> None:
    net = write_net(tmp_path / "code")
    base = ["train", "--data", "fashion-mnist", "--n", "64", "--epochs", "1", "--device", "cpu"]
    # a 3-channel factory on 1-channel data: the shape check of resolve_model, nothing left behind
    code, _out, err = cli([*base, "--model", f"{net}:make", "--out", str(tmp_path / "a")])
    assert code == 2 and "fails on inputs of shape (N, 1, 28, 28)" in err and not (tmp_path / "a").exists()
    code, _out, err = cli([*base, "--model", f"{net}:nothing", "--out", str(tmp_path / "b")])
    assert code == 2 and "'nothing' is not a callable" in err and not (tmp_path / "b").exists()
    code, _out, err = cli([*base, "--model", f"{net}:make", "--model-arg", "in_channels=1", "--objective-arg",
                           "bad", "--out", str(tmp_path / "c")])  # fmt: skip
    assert code == 2 and "--objective-arg expects KEY=VALUE" in err


def test_user_model_starts_from_weights(tmp_path: Path, fmnist: Dataset) -> None:
    """`init` (--weights) of a user factory is a plain weights file: with lr 0 the trained model
    is exactly the starting one."""
    net = write_net(tmp_path / "code")
    cfg = TrainConfig(model=f"{net}:make", model_args={"in_channels": 1}, n=64, epochs=1, batch_size=64,
                      lr=0.0, weight_decay=0.0, device="cpu")  # fmt: skip
    first = train(cfg, tmp_path / "a", data=fmnist)
    start = TrainConfig(**{**cfg.__dict__, "seed": 5, "init": str(tmp_path / "a" / "model.safetensors")})
    second = train(start, tmp_path / "b", data=fmnist)
    sa, sb = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((tmp_path / "b" / "model.json").read_text())["model"]["init"] == start.init


def test_torchrun_trains_a_user_model_as_one_process(tmp_path: Path, fmnist: Dataset) -> None:
    """2 ranks (gloo) against one process: the user model has no BatchNorm, so the weights agree up
    to summation order (see tests/test_distributed.py)."""
    import yaml

    net = write_net(tmp_path / "code")
    cfg = TrainConfig(model=f"{net}:make", model_args={"in_channels": 1}, n=256, epochs=1, batch_size=64,
                      seed=0, device="cpu")  # fmt: skip
    single = train(cfg, tmp_path / "single", data=fmnist)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(dict(cfg.__dict__)))
    launcher = tmp_path / "launch.py"
    launcher.write_text("from robustdissect.cli import main\nmain()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
           "train", "--config", str(config), "--out", str(tmp_path / "ddp")]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp, _card = resolve_model(f"{net}:make", str(tmp_path / "ddp" / "model.safetensors"), {"in_channels": 1})
    sa, sb = single.model.state_dict(), ddp.state_dict()
    assert sa.keys() == sb.keys()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-5
    card = json.loads((tmp_path / "ddp" / "model.json").read_text())
    assert card["user_model"] is True and card["model"]["factory_args"] == {"in_channels": 1}
