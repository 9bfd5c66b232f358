"""The calling conventions of torchvision, timm and RobustBench models, on stand-in modules (the
library never imports those packages): `pkg.module:factory --model-arg ...`, ImageNet-normalised
inputs through --normalize, in-place ReLUs reused inside residual blocks, a loader that normalises
inside the model. Clean predictions must be the ones the model gives by hand, in pixel space."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Cli, UserModel

THIRDPARTY = Path(__file__).parent / "thirdparty"
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))


@pytest.fixture
def thirdparty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(THIRDPARTY))


def _test_images(user: UserModel, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    assert user.data is not None
    with np.load(user.data) as d:
        return torch.tensor(d["x_test"][:n]).float() / 255, torch.tensor(d["y_test"][:n]).long()


def _trained_resnet(user: UserModel, folder: Path, normalised_inputs: bool) -> Path:
    """One epoch of the stand-in ResNet on the CIFAR-shaped data; returns its state dict file."""
    from fakevision.models import resnet_tiny

    assert user.data is not None
    with np.load(user.data) as d:
        x, y = torch.tensor(d["x"][:1200]).float() / 255, torch.tensor(d["y"][:1200]).long()
    torch.manual_seed(0)
    model = resnet_tiny(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    mean, std = IMAGENET
    for i in range(0, len(y), 100):
        xb = (x[i : i + 100] - mean) / std if normalised_inputs else x[i : i + 100]
        loss = torch.nn.functional.cross_entropy(model(xb), y[i : i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = folder / "resnet_tiny.pt"
    torch.save(model.eval().state_dict(), path)
    return path


def test_torchvision_form_with_imagenet_normalisation(
    tmp_path: Path, cli: Cli, user_model_rgb: UserModel, thirdparty: None
) -> None:
    from fakevision.models import resnet_tiny

    weights = _trained_resnet(user_model_rgb, tmp_path, normalised_inputs=True)
    out = tmp_path / "run"
    code, _o, err = cli(["run", "--quick", "--n", "40", "--model", "fakevision.models:resnet_tiny",
                         "--model-arg", "num_classes=10", "--model-arg", f"weights={weights}", "--normalize",
                         "imagenet", "--data", "npz", "--data-dir", str(user_model_rgb.data), "--config",
                         str(_stages(tmp_path)), "--out", str(out)])  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    x, y = _test_images(user_model_rgb, 40)
    model = resnet_tiny(weights=str(weights), num_classes=10).eval()
    mean, std = IMAGENET
    with torch.no_grad():
        by_hand = float((model((x - mean) / std).argmax(1) == y).float().mean())
    assert by_hand > 0.3  # trained: well above chance, so agreement is informative
    assert results["clean_accuracy"] == pytest.approx(by_hand)
    assert results["model_card"]["normalize"] == "imagenet"
    sens = results["stages"]["sensitivity"]
    # the block ReLUs are one module called twice per forward: left out with a warning, the rest measured
    assert any("layer1.relu" in w and "several times" in w for w in sens["warnings"])
    assert results["model"] == "models:resnet_tiny"


def test_robustbench_form_normalises_inside(
    tmp_path: Path, cli: Cli, user_model_rgb: UserModel, thirdparty: None
) -> None:
    from fakebench.utils import Normalised, load_model
    from fakevision.models import resnet_tiny

    model_dir = tmp_path / "models"
    (model_dir / "cifar10" / "Linf").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(Normalised(resnet_tiny(num_classes=10)).state_dict(), model_dir / "cifar10" / "Linf" / "Standard.pt")
    out = tmp_path / "run"
    code, _o, err = cli(["evaluate", "--quick", "--n", "30", "--attacks", "fgsm", "--curves", "none",
                         "--corruptions", "none", "--model", "fakebench.utils:load_model",
                         "--model-arg", "model_name=Standard", "--model-arg", f"model_dir={model_dir}",
                         "--model-arg", "dataset=cifar10", "--model-arg", "threat_model=Linf",
                         "--data", "npz", "--data-dir", str(user_model_rgb.data), "--out", str(out)])  # fmt: skip
    assert code == 0, err
    x, y = _test_images(user_model_rgb, 30)
    with torch.no_grad():
        by_hand = float((load_model("Standard", str(model_dir)).eval()(x).argmax(1) == y).float().mean())
    results = json.loads((out / "results.json").read_text())
    assert results["clean_accuracy"] == pytest.approx(by_hand)
    code, _o, err = cli(["evaluate", "--model", "fakebench.utils:load_model", "--model-arg", "dataset=imagenet",
                         "--data", "npz", "--data-dir", str(user_model_rgb.data), "--out", str(tmp_path / "r2")])
    assert code == 2 and "unknown dataset/threat model" in err and len(err.strip().splitlines()) == 1


def _stages(folder: Path) -> Path:
    path = folder / "stages.yaml"
    path.write_text("stages: [overview, evaluate, sensitivity]\n")
    return path
