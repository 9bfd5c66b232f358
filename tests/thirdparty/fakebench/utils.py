"""Mimics robustbench.utils.load_model(model_name=..., dataset=..., threat_model=...): the model
normalises inside its forward and takes pixels in [0, 1]; weights come from a model directory."""
from pathlib import Path

import torch
from fakevision.models import resnet_tiny
from torch import nn

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)


class Normalised(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mu", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x):
        return self.model((x - self.mu) / self.sigma)


def load_model(model_name: str = "Standard", model_dir: str = "./models", dataset: str = "cifar10",
               threat_model: str = "Linf") -> nn.Module:
    if dataset != "cifar10" or threat_model not in ("Linf", "L2"):
        raise ValueError(f"unknown dataset/threat model {dataset}/{threat_model}")
    model = Normalised(resnet_tiny(num_classes=10))
    path = Path(model_dir) / dataset / threat_model / f"{model_name}.pt"
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()
