"""Forward and forward+backward throughput (images/s) of every zoo model at a few batch sizes.

The baseline later benchmarks divide by. Usage: python bench/throughput.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from robustdissect.models import MODELS, build_model

SETUPS = {  # name: (input shape, batch sizes on CPU, batch sizes on GPU)
    "smallcnn": ((1, 28, 28), (64, 256), (256, 1024)),
    "lenet": ((1, 28, 28), (64, 256), (256, 1024)),
    "vgg16": ((3, 32, 32), (16, 64), (128, 512)),
    "resnet18": ((3, 32, 32), (16, 64), (128, 512)),
}


def _time(fn, device: torch.device, min_seconds: float) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and n >= 2:
            return elapsed / n


def _forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward and one backward to the input (what an attack step costs)."""
    xr = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xr), y)
    torch.autograd.grad(loss, xr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum timing window per measurement")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'model':<10} {'batch':>6} {'fwd img/s':>12} {'fwd+bwd img/s':>14} {'bwd/fwd':>8}")
    for name in MODELS.names():
        shape, cpu_batches, gpu_batches = SETUPS[name]
        model = build_model(name, in_channels=shape[0]).to(device).eval()
        for bs in gpu_batches if device.type == "cuda" else cpu_batches:
            x = torch.rand(bs, *shape, device=device)
            y = torch.randint(0, 10, (bs,), device=device)

            tf = _time(lambda m=model, x=x: _forward(m, x), device, args.seconds)
            tb = _time(lambda m=model, x=x, y=y: _forward_backward(m, x, y), device, args.seconds)
            print(f"{name:<10} {bs:>6} {bs / tf:>12.0f} {bs / tb:>14.0f} {tb / tf:>8.2f}")


if __name__ == "__main__":
    main()
