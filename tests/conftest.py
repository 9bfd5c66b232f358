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


# A toy model with planted robust and brittle units (METHODS §6.7), shared by the pushback and
# SNS-bridge tests.
SIZE = 8
CHECKER = (torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None, :]) % 2 * 2.0 - 1.0  # ±1


class Planted(nn.Module):
    """Two planted units in layer `feat` (a full-image conv, output (N, 2, 1, 1)): unit 0 = mean of
    the left half (robust: the classes differ by 0.4 there), unit 1 = the checkerboard coefficient
    (brittle: the classes differ by ±0.05, inside an ε = 0.1 ball). The head reads both."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(1, 2, SIZE, bias=False)
        w = torch.zeros(2, 1, SIZE, SIZE)
        w[0, 0, :, : SIZE // 2] = 1.0 / (SIZE * SIZE // 2)
        w[1, 0] = CHECKER / (SIZE * SIZE)
        with torch.no_grad():
            self.feat.weight.copy_(w)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-5.0, -40.0], [5.0, 40.0]]))
            self.head.bias.copy_(torch.tensor([2.5, -2.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feat(x).flatten(1))  # type: ignore[no-any-return]


def planted_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.full((n, 1, SIZE, SIZE), 0.5)
    x[:, 0, :, : SIZE // 2] = (0.3 + 0.4 * y.float())[:, None, None]
    x = x + 0.05 * (2 * y.float() - 1)[:, None, None, None] * CHECKER
    x = x + 0.01 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1), y


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
