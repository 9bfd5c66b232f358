"""Common corruptions at five severities, written in torch (JPEG through Pillow).

Severity constants are those of Hendrycks & Dietterich's CIFAR-10-C generation script
(make_cifar_c.py), the right scale for 28x28 and 32x32 images:

| corruption     | parameter per severity 1..5                   | operation                                     |
|----------------|-----------------------------------------------|-----------------------------------------------|
| gaussian-noise | sigma .04 .06 .08 .09 .10                     | x + N(0, sigma^2)                             |
|   scale=fmnist | sigma .128 .191 .255 .287 .319 (x 3.19)       | (METHODS §8.1 scaled set)                     |
| shot-noise     | photons 500 250 100 75 50                     | Poisson(x * c) / c                            |
| impulse-noise  | amount .01 .02 .03 .05 .07                    | salt & pepper on that fraction of values      |
| gaussian-blur  | sigma .4 .6 .7 .8 1.0 (px)                    | Gaussian filter, truncate 4, edges 'nearest'  |
| contrast       | factor .75 .5 .4 .3 .15                       | (x - mean_hw) * c + mean_hw                   |
| brightness     | shift .05 .1 .15 .2 .3                        | HSV value + c (grayscale: x + c)              |
| jpeg           | quality 80 65 58 50 40                        | JPEG round trip (Pillow)                      |

Every result is clipped to [0, 1] and, with `quantize=True` (default, like the released uint8
files), rounded to round(255 x) / 255. Severity 0 returns the input unchanged. Corruptions have
norm None and eps inf: they are not adversarial, only [0, 1] is guaranteed.
"""

from __future__ import annotations

import io
import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..errors import UserError
from .base import ATTACKS, Attack
from .rng import SampleRandom


class Corruption(Attack):
    """Base of the corruptions: `severity` 0..5 (0 = identity) and `quantize` to 8 bits."""

    white_box = False
    adversarial = False
    supports_targeted = False
    severities: ClassVar[tuple[float, ...]] = ()
    corruption_name: ClassVar[str] = ""

    def __init__(
        self, severity: int = 3, *, quantize: bool = True, seed: int = 0, batch_size: int | None = None
    ) -> None:
        super().__init__(name=self.corruption_name, norm=None, eps=math.inf, seed=seed, batch_size=batch_size)
        if not isinstance(severity, int) or isinstance(severity, bool) or not 0 <= severity <= 5:
            raise UserError(f"severity must be an integer in 0..5 (0 = no corruption), got {severity!r}")
        self.severity = severity
        self.quantize = bool(quantize)

    @property
    def level(self) -> float:
        """The corruption parameter at this severity."""
        return self.severities[self.severity - 1]

    def _is_identity(self) -> bool:
        return self.severity == 0

    def _corrupt(self, x: Tensor, rng: SampleRandom) -> Tensor:
        raise NotImplementedError

    def _search(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> Tensor:
        out = self._corrupt(x, rng).clamp(0.0, 1.0)
        if self.quantize:
            out = torch.round(out * 255.0) / 255.0
        return out


GAUSSIAN_SCALES: dict[str, tuple[float, ...]] = {
    "cifar10": (0.04, 0.06, 0.08, 0.09, 0.10),
    "fmnist": (0.128, 0.191, 0.255, 0.287, 0.319),
}


def noise_scale(setting: str, image_shape: tuple[int, ...]) -> str:
    """The Gaussian-noise scale of a run: `setting` itself, or for "auto" "fmnist" (the x 3.19 set)
    on 1-channel 28x28 images (C, H, W) and "cifar" (CIFAR-10-C's sigmas) otherwise."""
    if setting != "auto":
        return setting
    return "fmnist" if tuple(image_shape) == (1, 28, 28) else "cifar"


class GaussianNoise(Corruption):
    """x + N(0, sigma^2); scale "cifar10" (alias "cifar"; CIFAR-10-C sigmas) or "fmnist" (x 3.19); or sigma."""

    corruption_name = "gaussian-noise"
    severities = GAUSSIAN_SCALES["cifar10"]

    def __init__(
        self,
        severity: int = 3,
        *,
        scale: str = "cifar10",
        sigma: float | None = None,
        quantize: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(severity, quantize=quantize, seed=seed, batch_size=batch_size)
        scale = "cifar10" if scale == "cifar" else scale
        if scale not in GAUSSIAN_SCALES:
            raise UserError(f"scale must be one of {', '.join(GAUSSIAN_SCALES)}, got {scale!r}")
        if sigma is not None and not sigma >= 0:
            raise UserError(f"sigma must be >= 0, got {sigma}")
        self.scale = scale
        self.sigma = float(sigma) if sigma is not None else (GAUSSIAN_SCALES[scale][severity - 1] if severity else 0.0)

    def _is_identity(self) -> bool:
        return self.severity == 0 or self.sigma == 0

    def _corrupt(self, x: Tensor, rng: SampleRandom) -> Tensor:
        noise = rng.randn(*x.shape[1:], dtype=x.dtype)
        return x + self.sigma * noise


class ShotNoise(Corruption):
    """Poisson(x * c) / c with c photons per unit intensity."""

    corruption_name = "shot-noise"
    severities = (500.0, 250.0, 100.0, 75.0, 50.0)

    def _corrupt(self, x: Tensor, rng: SampleRandom) -> Tensor:
        c = self.level
        return torch.stack([torch.poisson(xi * c, generator=g) for xi, g in zip(x, rng.generators(), strict=True)]) / c


class ImpulseNoise(Corruption):
    """Salt and pepper: a fraction `amount` of the values set to 0 or 1 with equal chance."""

    corruption_name = "impulse-noise"
    severities = (0.01, 0.02, 0.03, 0.05, 0.07)

    def _corrupt(self, x: Tensor, rng: SampleRandom) -> Tensor:
        hit = rng.rand(*x.shape[1:]) < self.level
        salt = rng.rand(*x.shape[1:]) < 0.5
        out = torch.where(hit & salt, torch.ones_like(x), x)
        return torch.where(hit & ~salt, torch.zeros_like(x), out)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> Tensor:
    """1-D Gaussian kernel with radius int(truncate * sigma + 0.5), summing to 1 (as scipy.ndimage)."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(torch.float32)


class GaussianBlur(Corruption):
    """Separable Gaussian filter (sigma in pixels), edge values repeated ('nearest')."""

    corruption_name = "gaussian-blur"
    severities = (0.4, 0.6, 0.7, 0.8, 1.0)

    def _corrupt(self, x: Tensor, rng: SampleRandom) -> Tensor:
        k = gaussian_kernel(self.level).to(device=x.device, dtype=x.dtype)
        r = (k.numel() - 1) // 2
        c = x.shape[1]
        out = F.pad(x, (r, r, r, r), mode="replicate")
        out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class Contrast(Corruption):
    """(x - mean) * c + mean, with the mean of each image and channel."""

    corruption_name = "contrast"
    severities = (0.75, 0.5, 0.4, 0.3, 0.15)

    def _corrupt(self, x: Tensor, rng: SampleRandom) -> Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        return (x - mean) * self.level + mean


class Brightness(Corruption):
    """Add c to the HSV value V = max over channels (hue and saturation kept); grayscale: x + c."""

    corruption_name = "brightness"
    severities = (0.05, 0.1, 0.15, 0.2, 0.3)

    def _corrupt(self, x: Tensor, rng: SampleRandom) -> Tensor:
        v = x.amax(dim=1, keepdim=True)
        v_new = (v + self.level).clamp(0.0, 1.0)
        scaled = x * (v_new / v.clamp_min(1e-12))
        return torch.where(v > 0, scaled, v_new.expand_as(x))


class JPEG(Corruption):
    """JPEG compression round trip at quality 80/65/58/50/40 (1- or 3-channel images)."""

    corruption_name = "jpeg"
    severities = (80.0, 65.0, 58.0, 50.0, 40.0)

    def _corrupt(self, x: Tensor, rng: SampleRandom) -> Tensor:
        c = x.shape[1]
        if c not in (1, 3):
            raise UserError(f"jpeg needs 1- or 3-channel images, got {c} channels")
        arr = (x.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = np.empty_like(arr)
        for i, img in enumerate(arr):
            pil = Image.fromarray(np.ascontiguousarray(img[:, :, 0] if c == 1 else img))
            buf = io.BytesIO()
            pil.save(buf, format="JPEG", quality=int(self.level))
            buf.seek(0)
            dec = np.asarray(Image.open(buf).convert("L" if c == 1 else "RGB"))
            out[i] = dec[:, :, None] if c == 1 else dec
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype).permute(0, 3, 1, 2) / 255.0


CORRUPTIONS: tuple[type[Corruption], ...] = (
    GaussianNoise,
    ShotNoise,
    ImpulseNoise,
    GaussianBlur,
    Contrast,
    Brightness,
    JPEG,
)
for _cls in CORRUPTIONS:
    ATTACKS.register(_cls.corruption_name, (_cls.__doc__ or "").strip().split("\n")[0] + " (severity 1-5)")(_cls)
