"""Shared fixtures: the real Fashion-MNIST data (required, never skipped) and tiny models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robustdissect.data import Dataset, load_dataset
from robustdissect.data.idx import FASHION_MNIST_DIR

# The suite's models are tiny: one thread avoids OpenMP overhead that dominates small convolutions.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fmnist() -> Dataset:
    """Fashion-MNIST from the Debian package; a missing dataset is a failure, not a skip."""
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            f"Fashion-MNIST is missing from {FASHION_MNIST_DIR}; run `bash scripts/setup.sh --dev` "
            "(installs the Debian package dataset-fashion-mnist)"
        )
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="session")
def shipped_vanilla() -> nn.Module:
    from robustdissect.models import load_checkpoint

    model, _card = load_checkpoint("fmnist-smallcnn-vanilla")
    return model


class TinyNet(nn.Module):
    """1x8x8 -> conv(4) -> relu -> gap -> linear(3): small enough for exact checks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))


def interrupt_at(objective: Any, epoch: int) -> Any:
    """Make `objective` raise KeyboardInterrupt when `epoch` starts: a kill between two epochs."""
    original = objective.on_epoch_start

    def on_epoch_start(model: nn.Module, e: int) -> None:
        if e == epoch:
            raise KeyboardInterrupt
        original(model, e)

    objective.on_epoch_start = on_epoch_start
    return objective


@pytest.fixture
def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def tmp_run(tmp_path: Path) -> Path:
    return tmp_path / "run"


Cli = Callable[[list[str]], tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """The console entry point run in-process: args → (exit code, stdout, stderr)."""
    from robustdissect.cli import main

    def run(args: list[str]) -> tuple[int, str, str]:
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run
