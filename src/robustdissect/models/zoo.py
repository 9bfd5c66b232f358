"""The model zoo: small CNNs for 28x28 data and the CIFAR VGG-16-BN / ResNet-18 of the papers.

Every model takes images in [0, 1] and normalises inside (`Normalize`), so attack budgets are in
pixel units. Each zoo model carries `layer_aliases`: paper-style names (conv1, relu1, pool1,
l1b1c1, fc1, ...) mapped to `named_modules()` paths. `convN` is the BN output (pre-ReLU) and
`reluN` the ReLU output, the two hook points of the neuron-sensitivity paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import Registry

MODELS: Registry[Any] = Registry("model")


class Normalize(nn.Module):
    """(x - mean) / std per channel; x: (N, C, H, W) in [0, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ConvBNReLU(nn.Module):
    """3x3 conv (padding 1) -> BatchNorm -> ReLU; hook `.bn` for conv_l and `.relu` for ReLU_l."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def _pool(kind: str, ceil_mode: bool = False) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(2, 2, ceil_mode=ceil_mode)
    if kind == "avg":
        return nn.AvgPool2d(2, 2, ceil_mode=ceil_mode)
    raise ValueError(f"pooling must be 'max' or 'avg', got {kind!r}")


class Classifier(nn.Module):
    """Base for zoo models: `normalize` first, `layer_aliases` and `arch` metadata."""

    layer_aliases: dict[str, str]
    arch: dict[str, Any]


class _ConvStack(Classifier):
    """ConvBNReLU blocks conv1..convB in stages (`STAGES`: the width multipliers of a stage's
    blocks and whether pool_i closes it), then gap and fc1. Input (N, C, H, W), H = W = 28 or 32."""

    NAME: ClassVar[str]
    STAGES: ClassVar[tuple[tuple[tuple[int, ...], bool], ...]]

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        pooling: str = "max",
        mean: Sequence[float] = (0.2860,),
        std: Sequence[float] = (0.3530,),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self._order: list[str] = []
        channels, blocks, pools = in_channels, 0, 0
        for multipliers, pooled in self.STAGES:
            for m in multipliers:
                blocks += 1
                self.add_module(f"conv{blocks}", ConvBNReLU(channels, m * width))
                self._order.append(f"conv{blocks}")
                channels = m * width
            if pooled:
                pools += 1
                self.add_module(f"pool{pools}", _pool(pooling))
                self._order.append(f"pool{pools}")
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(channels, num_classes)
        pool_names = {f"pool{i}": f"pool{i}" for i in range(1, pools + 1)}
        self.layer_aliases = _block_aliases(blocks) | pool_names | {"gap": "gap", "fc1": "fc1"}
        self.arch = {
            "name": self.NAME,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "width": width,
            "pooling": pooling,
            "mean": list(mean),
            "std": list(std),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        for name in self._order:
            x = self.get_submodule(name)(x)
        return self.fc1(self.flatten(self.gap(x)))


class SmallCNN(_ConvStack):
    """6-conv CNN (METHODS §8.2): conv1-2, pool1, conv3-4, pool2, conv5-6, pool3, gap, fc1.

    Widths w, w, 2w, 2w, 4w, 4w (default w = 16). Input (N, C, H, W), H = W = 28 or 32.
    """

    NAME = "smallcnn"
    STAGES = (((1, 1), True), ((2, 2), True), ((4, 4), True))


class SmallCNN4(_ConvStack):
    """4-conv variant of SmallCNN (METHODS §8.2): conv1, pool1, conv2, pool2, conv3-4, gap, fc1.

    Widths w, 2w, 4w, 4w (default w = 16). Input (N, C, H, W), H = W = 28 or 32.
    """

    NAME = "smallcnn4"
    STAGES = (((1,), True), ((2,), True), ((4, 4), False))


class LeNet(Classifier):
    """LeNet-5 style: conv1 (6, 5x5, pad 2), pool1, conv2 (16, 5x5), pool2, fc1 120, fc2 84, fc3."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        mean: Sequence[float] = (0.2860,),
        std: Sequence[float] = (0.3530,),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        side = ((image_size // 2) - 4) // 2
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        names = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "fc2", "relu4", "fc3"]
        self.layer_aliases = {n: n for n in names}
        self.arch = {
            "name": "lenet",
            "num_classes": num_classes,
            "in_channels": in_channels,
            "image_size": image_size,
            "mean": list(mean),
            "std": list(std),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(self.normalize(x))))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc3(self.relu4(self.fc2(x)))


_VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(Classifier):
    """CIFAR VGG-16-BN: conv1..conv13 (ConvBNReLU), pool1..pool5, Linear(512, K) as fc1.

    Pools use ceil_mode so 28x28 inputs also reach 1x1 after pool5.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        pooling: str = "max",
        width_mult: float = 1.0,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2470, 0.2435, 0.2616),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential()
        cin, conv_i, pool_i = in_channels, 0, 0
        aliases: dict[str, str] = {}
        for v in _VGG16_CFG:
            if v == "M":
                pool_i += 1
                self.features.add_module(f"pool{pool_i}", _pool(pooling, ceil_mode=True))
                aliases[f"pool{pool_i}"] = f"features.pool{pool_i}"
            else:
                conv_i += 1
                cout = max(1, int(int(v) * width_mult))
                self.features.add_module(f"conv{conv_i}", ConvBNReLU(cin, cout))
                aliases[f"conv{conv_i}"] = f"features.conv{conv_i}.bn"
                aliases[f"relu{conv_i}"] = f"features.conv{conv_i}.relu"
                cin = cout
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(cin, num_classes)
        aliases["fc1"] = "fc1"
        self.layer_aliases = aliases
        self.arch = {
            "name": "vgg16",
            "num_classes": num_classes,
            "in_channels": in_channels,
            "pooling": pooling,
            "width_mult": width_mult,
            "mean": list(mean),
            "std": list(std),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.flatten(self.features(self.normalize(x))))


class BasicBlock(nn.Module):
    """ResNet basic block; `bn1`/`bn2` are the conv hook points, `relu1`/`relu2` the ReLUs."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(Classifier):
    """CIFAR ResNet-18 (3x3 stem, no max-pool); aliases conv1, l{i}b{j}c{k}, layer4_output, fc1."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2470, 0.2435, 0.2616),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = ConvBNReLU(in_channels, width)
        aliases = {"conv1": "conv1.bn", "relu1": "conv1.relu"}
        cin = width
        layers = []
        for i, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)], start=1):
            cout = width * mult
            blocks = nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))
            for j in (1, 2):
                for k in (1, 2):
                    aliases[f"l{i}b{j}c{k}"] = f"layer{i}.{j - 1}.bn{k}"
                    aliases[f"l{i}b{j}r{k}"] = f"layer{i}.{j - 1}.relu{k}"
            layers.append(blocks)
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        aliases |= {"layer4_output": "layer4", "avgpool": "avgpool", "fc1": "fc"}
        self.layer_aliases = aliases
        self.arch = {
            "name": "resnet18",
            "num_classes": num_classes,
            "in_channels": in_channels,
            "width": width,
            "mean": list(mean),
            "std": list(std),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def _block_aliases(n: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for i in range(1, n + 1):
        out[f"conv{i}"] = f"conv{i}.bn"
        out[f"relu{i}"] = f"conv{i}.relu"
    return out


MODELS.register("smallcnn", "6-conv CNN with BN, width w (16 default), pooling max|avg; 28/32 px")(SmallCNN)
MODELS.register("smallcnn4", "4-conv variant of smallcnn (widths w, 2w, 4w, 4w), pooling max|avg")(SmallCNN4)
MODELS.register("lenet", "LeNet-5 style CNN for 28x28 inputs")(LeNet)
MODELS.register("vgg16", "CIFAR VGG-16 with BatchNorm (conv1..conv13, fc1)")(VGG16)
MODELS.register("resnet18", "CIFAR ResNet-18 (3x3 stem, no max-pool)")(ResNet18)
