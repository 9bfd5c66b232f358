"""The GPU path, measured: clean accuracy, PGD-10 robust accuracy, σ and the features analysis of
the zoo VGG-16 and ResNet-18 and a ResNet-50-sized user model on synthetic CIFAR-shaped
(3×32×32) and ImageNet-shaped (3×224×224) images, with images/s per stage and the PGD step's
achieved TFLOP/s against the card's dense bf16 and fp32 peaks.

One prepared script, sized to finish within 8 minutes on one H100 (`--budget-s`, default 420 s:
a stage that would start after the budget is spent is skipped and said so). Batch sizes come from
the library's `batch_size: auto` search (the largest attack-step batch that fits, halving on
out-of-memory) on CUDA, capped at the number of images.

- Data: uniform random images; labels are the model's own clean predictions (the models are
  untrained), so clean accuracy is 1 by construction and PGD's drop from it shows the attack works.
- The zoo VGG-16 is built for 32×32 inputs (its classifier takes the 512 channels of a 1×1 map);
  on 224×224 images a global average pool is put in front of the classifier.
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` on one forward and backward (with respect to
  the input) of two images, per image; the PGD-10 run does 10 of those plus one forward per image.
  Convolutions run in TF32 on Ampere and later (PyTorch's cuDNN default); the fp32 figure is the
  non-tensor-core peak, so a ratio above 1 against it means tensor cores did the work.

Usage: python bench/gpu.py [--smoke] [--device cuda] [--budget-s 420]
`--smoke` runs tiny sizes on the CPU in seconds (tests/test_bench_gpu.py runs it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# dense tensor-core bf16 and plain fp32 peaks (TFLOP/s) by device name; SXM unless named PCIe/NVL
PEAKS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
]


def card_peaks(name: str) -> tuple[float, float] | None:
    """(bf16, fp32) dense peak TFLOP/s of the card called `name`, None when unknown."""
    for key, bf16, fp32 in PEAKS:
        if key in name:
            return bf16, fp32
    return None


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (stride), 1x1 expand x4, projection shortcut when needed."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def resnet50(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """A ResNet-50-sized user model (25.5 M parameters at 1000 classes, width 64): 7x7 stride-2
    stem, max pool, bottleneck stages of 3, 4, 6, 3 blocks (widths w..8w, x4 expansion), global
    pool, fc."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
    ]
    cin = width
    for mult, blocks, stride in ((1, 3, 1), (2, 4, 2), (4, 6, 2), (8, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width * mult, stride if i == 0 else 1))
            cin = width * mult * Bottleneck.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def build(name: str, side: int, smoke: bool = False) -> nn.Module:
    """The model `name` for 3-channel images side x side; `smoke`: the same architecture at an
    eighth of the width (seconds on a CPU)."""
    from robustdissect.models import build_model

    if name == "resnet50":
        return resnet50(num_classes=10, in_channels=3, width=8 if smoke else 64)
    narrow = {"vgg16": {"width_mult": 0.125}, "resnet18": {"width": 8}}.get(name, {}) if smoke else {}
    model = build_model(name, num_classes=10, in_channels=3, **narrow)
    if name == "vgg16" and side > 32:  # see the module docstring
        model.flatten = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # type: ignore[assignment]
    return model


@dataclass(frozen=True)
class Shape:
    name: str
    side: int
    n: int  # images for clean accuracy, PGD and σ
    features_n: int  # images for the features analysis
    reference_n: int  # clean reference images of the features analysis


FULL = [Shape("cifar", 32, 4096, 256, 512), Shape("imagenet", 224, 512, 64, 128)]
SMOKE = [Shape("cifar", 32, 4, 2, 4), Shape("imagenet", 40, 2, 2, 2)]
FULL_MODELS = ("vgg16", "resnet18", "resnet50")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def step_flops(model: nn.Module, shape: tuple[int, int, int], device: torch.device) -> tuple[float, float]:
    """(forward, forward + input-gradient backward) FLOPs per image, counted on two images."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand((2, *shape), device=device)
    with FlopCounterMode(display=False) as fwd_counter, torch.no_grad():
        model(x)
    xg = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(model(xg), torch.zeros(2, dtype=torch.long, device=device))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fwd_counter.get_total_flops() / 2, counter.get_total_flops() / 2


def predict(model: nn.Module, x: Tensor, batch: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[s : s + batch]).argmax(1) for s in range(0, len(x), batch)])


def run_one(model_name: str, shape: Shape, device: torch.device, args: argparse.Namespace,
            deadline: float, rows: list[dict[str, Any]]) -> None:  # fmt: skip
    from robustdissect import api
    from robustdissect.analysis import neuron_sensitivity
    from robustdissect.attacks.pgd import PGD
    from robustdissect.batching import gradient_step, largest_batch

    torch.manual_seed(0)
    model = build(model_name, shape.side, args.smoke).to(device).eval()
    img = (3, shape.side, shape.side)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((shape.n, *img), generator=g).to(device)
    x_ref = torch.rand((shape.reference_n, *img), generator=g).to(device)
    label = f"{model_name} {shape.name} {shape.side}x{shape.side}"

    def row(stage: str, images: int, seconds: float, **extra: Any) -> None:
        rows.append({"model": model_name, "data": shape.name, "stage": stage, "images": images,
                     "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else float("nan"),
                     **extra})  # fmt: skip
        more = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
        print(f"  {label:<28} {stage:<10} {images:>5} img {seconds:7.2f} s {images / seconds:9.1f} img/s  {more}",
              flush=True)  # fmt: skip

    if device.type == "cuda":
        batch, t = timed(device, lambda: largest_batch(gradient_step(model, img, device), min(shape.n, 1024)))
        print(f"  {label:<28} batch size auto: {batch} ({t:.1f} s search)", flush=True)
    else:
        batch = shape.n
    fwd, fb = step_flops(model, img, device)
    # warm-up (cuDNN autotuning, allocator) outside the timings
    predict(model, x[: min(batch, 8)], batch)

    y, t = timed(device, lambda: predict(model, x, batch))
    row("clean", shape.n, t, accuracy=float((predict(model, x, batch) == y).float().mean()),
        tflops=fwd * shape.n / t / 1e12)  # fmt: skip
    if time.perf_counter() > deadline:
        print(f"  {label}: budget spent, PGD, σ and features skipped", flush=True)
        return
    steps = 2 if args.smoke else 10
    pgd = PGD(eps=8 / 255, steps=steps, batch_size=batch, seed=0)
    res, t = timed(device, lambda: pgd(model, x, y))
    achieved = (steps * fb + fwd) * shape.n / t / 1e12
    peaks = card_peaks(args.device_name)
    extra: dict[str, Any] = {"robust_accuracy": float(res.correct.float().mean()), "tflops": achieved,
                             "gflop_per_step_image": fb / 1e9}  # fmt: skip
    if peaks:
        extra |= {"of_bf16_peak": achieved / peaks[0], "of_fp32_peak": achieved / peaks[1]}
    row(f"pgd-{steps}", shape.n, t, **extra)
    if time.perf_counter() > deadline:
        print(f"  {label}: budget spent, σ and features skipped", flush=True)
        return
    sig, t = timed(device, lambda: neuron_sensitivity(model, (x, res.x_adv), batch_size=batch))
    row("sigma", shape.n, t, layers=len(sig.layers))
    if time.perf_counter() > deadline:
        print(f"  {label}: budget spent, features skipped", flush=True)
        return
    nf = shape.features_n
    options = {"n": nf, "reference_n": shape.reference_n, "feature_steps": steps, "feature_alpha": None,
               "restarts": 1, "candidates_per_bin": 1 if args.smoke else 2, "permutations": 5 if args.smoke else 100,
               "bootstrap": 5 if args.smoke else 100, "batch_size": batch}  # fmt: skip
    feats, t = timed(device, lambda: api.features(
        model, (x[:nf].cpu(), y[:nf].cpu()), reference=x_ref.cpu(), options=options,
        attacks=[PGD(eps=8 / 255, steps=steps, batch_size=batch, seed=0)], num_classes=10))  # fmt: skip
    row("features", nf, t, units=len(feats.scores.layer_rows()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds (a test runs it)")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--models", default=None, help=f"comma-separated, default {','.join(FULL_MODELS)}")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip stages that would start after this")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        args.device_name = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
        args.device_name = "cpu"
    models = [m.strip() for m in (args.models or ",".join(FULL_MODELS)).split(",") if m.strip()]
    shapes = SMOKE if args.smoke else FULL
    peaks = card_peaks(args.device_name)
    peak_text = f"peaks bf16 {peaks[0]:g} / fp32 {peaks[1]:g} TFLOP/s (dense)" if peaks else "peak unknown"
    print(f"device: {args.device_name} ({device}); {peak_text}; torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    deadline = start + args.budget_s
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        for name in models:
            if time.perf_counter() > deadline:
                print(f"  {name} {shape.name}: budget spent, skipped", flush=True)
                continue
            run_one(name, shape, device, args, deadline, rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{'model':<9} {'data':<9} {'stage':<9} {'img/s':>10} {'TFLOP/s':>8} {'%bf16':>6} {'%fp32':>6}")
    for r in rows:
        tf = r.get("tflops")
        b16, f32 = r.get("of_bf16_peak"), r.get("of_fp32_peak")
        print(f"{r['model']:<9} {r['data']:<9} {r['stage']:<9} {r['images_per_s']:>10.1f} "
              f"{'' if tf is None else f'{tf:.2f}':>8} {'' if b16 is None else f'{100 * b16:.1f}':>6} "
              f"{'' if f32 is None else f'{100 * f32:.1f}':>6}")  # fmt: skip
    total = time.perf_counter() - start
    print(f"total {total:.1f} s on {args.device_name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
