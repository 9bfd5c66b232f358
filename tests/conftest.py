"""Shared fixtures: the real Fashion-MNIST data (required, never skipped) and tiny models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


# A user's own model, as a file with a factory: lazy head, in-place ReLUs, plain nn.Sequential paths.
USER_MODEL_SOURCE = '''
from torch import nn


def make(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.LazyLinear(num_classes),
    )
'''


@dataclass(frozen=True)
class UserModel:
    """A user model file with trained weights: `spec` is `DIR/nets.py:make`; `data` an .npz of
    its images (x, y, x_test, y_test) when it is not the built-in data."""

    spec: str
    weights: Path
    robust_weights: Path
    data: Path | None
    channels: int


def colour_images(x: torch.Tensor, y: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Fashion-MNIST made CIFAR-shaped: (N, 1, 28, 28) -> (N, 3, size, size), a tint per class."""
    tint = torch.rand(10, 3, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.4
    big = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return (big * tint[y].view(-1, 3, 1, 1)).clamp(0, 1)


def _train_user_model(folder: Path, x: torch.Tensor, y: torch.Tensor, channels: int, adversarial: bool) -> Path:
    """Two short epochs of standard or FGSM (ε 0.1, random start) training; returns the weights file."""
    import importlib.util

    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location(f"user_nets_{channels}", folder / "nets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.make(channels)
    model(x[:2])
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(2):
        for i in range(0, len(y), 100):
            xb, yb = x[i : i + 100], y[i : i + 100]
            if adversarial:
                xa = (xb + (torch.rand_like(xb) * 2 - 1) * 0.1).clamp(0, 1).requires_grad_()
                (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(xa), yb), xa)
                xb = (xb + 0.1 * grad.sign()).clamp(0, 1).detach()
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = folder / f"{'robust' if adversarial else 'standard'}.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def _user_model(folder: Path, fmnist: Dataset, channels: int) -> UserModel:
    import numpy as np

    (folder / "nets.py").write_text(USER_MODEL_SOURCE)
    x, y = fmnist.train.x[:2000], fmnist.train.y[:2000]
    data = None
    if channels == 3:
        x = colour_images(x, y)
        xt, yt = fmnist.test.x[:300], fmnist.test.y[:300]
        data = folder / "cifar_like.npz"

        def u8(t: torch.Tensor) -> Any:
            return (t * 255).round().to(torch.uint8).numpy()

        np.savez(data, x=u8(x), y=y.numpy(), x_test=u8(colour_images(xt, yt)), y_test=yt.numpy())
    standard = _train_user_model(folder, x, y, channels, adversarial=False)
    robust = _train_user_model(folder, x, y, channels, adversarial=True)
    return UserModel(f"{folder / 'nets.py'}:make", standard, robust, data, channels)


@pytest.fixture(scope="session")
def user_model(tmp_path_factory: pytest.TempPathFactory, fmnist: Dataset) -> UserModel:
    """A 1-channel user model (file.py:factory) trained briefly on Fashion-MNIST, with a robust twin."""
    return _user_model(tmp_path_factory.mktemp("user1"), fmnist, 1)


@pytest.fixture(scope="session")
def user_model_rgb(tmp_path_factory: pytest.TempPathFactory, fmnist: Dataset) -> UserModel:
    """A 3-channel user model on a CIFAR-shaped .npz (3×32×32, 10 classes), with a robust twin."""
    return _user_model(tmp_path_factory.mktemp("user3"), fmnist, 3)
