"""Cost of the robustness metric Ψ and of the landscapes.

1. Ψ against a full PGD-100 robust-accuracy evaluation of the same model and images: Ψ (K = 20 KL
   steps, α = ε/4, temperature calibrated on 1000 validation images) vs L-inf PGD-100 at ε = 0.1
   (α = 2.5ε/k, random start, early stop, `--restarts` restarts). Target: Ψ time / PGD-100 time
   <= 0.1.
2. Landscape grid throughput: `analysis.landscape` on N images and a G×G grid (plus its 1-D slice)
   against plain batched forwards of the same number of points in chunks of the same size.
   Target: landscape time / plain forward time <= 1.1 (points/s within 10%).

The measurements are interleaved in rounds and the medians reported, so both sides see the same
machine load.

Usage: python bench/metric.py [--n 500] [--restarts 2] [--repeats 3] [--threads N] [--grid 41 --land-n 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from robustdissect.analysis.landscape import landscape, landscape_directions
from robustdissect.analysis.metric import robustness_metric
from robustdissect.attacks import PGD
from robustdissect.data import load_dataset
from robustdissect.models import load_checkpoint
from robustdissect.modelutil import eval_mode

MODELS = ("fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat")
TARGET_PSI = 0.1
TARGET_GRID = 1.1


def plain(model: torch.nn.Module, x: torch.Tensor, points: int, chunk: int) -> None:
    """`points` forwards of x's images (x holds one chunk) in chunks of `chunk`, as one grid's."""
    with eval_mode(model), torch.no_grad():
        done = 0
        while done < points:
            k = min(chunk, points - done)
            model(x[:k].clone())
            done += k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--grid", type=int, default=41)
    p.add_argument("--land-n", type=int, default=20)
    p.add_argument("--chunk", type=int, default=4096)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    data = load_dataset("fashion-mnist")
    test = data.test.subset(a.n, seed=0)
    x, y, x_cal = test.x, test.y, data.val.x[:1000]
    print(f"threads {torch.get_num_threads()}, {a.n} images, PGD-100 restarts {a.restarts}, grid {a.grid}x{a.grid} "
          f"on {a.land_n} images")  # fmt: skip
    print(f"{'model':<26} {'psi s':>7} {'pgd100 s':>9} {'ratio':>6} {'target':>7} | {'grid s':>7} {'plain s':>8} "
          f"{'ratio':>6} {'target':>7} {'points/s':>9}")  # fmt: skip
    ok = True
    for name in MODELS:
        model, _ = load_checkpoint(name)
        model.eval()
        pgd = PGD(0.1, steps=100, step_rule="madry", restarts=a.restarts, early_stop=True, batch_size=500)
        xl, yl = x[: a.land_n], y[: a.land_n]
        dirs = landscape_directions(model, xl, yl, direction="gradient")
        line = 201
        points = a.land_n * (a.grid * a.grid + line + 1)
        plain_x = torch.rand(min(a.chunk, points), *x.shape[1:])


        t_psi, t_pgd, t_grid, t_plain = [], [], [], []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            robustness_metric(model, x, eps=0.1, steps=20, calibration_x=x_cal)
            t_psi.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pgd(model, x, y)
            t_pgd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            landscape(model, xl, yl, eps=0.1, grid=a.grid, line_points=line, chunk_size=a.chunk, directions=dirs)
            t_grid.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plain(model, plain_x, points, a.chunk)
            t_plain.append(time.perf_counter() - t0)
        psi_s, pgd_s = statistics.median(t_psi), statistics.median(t_pgd)
        grid_s, plain_s = statistics.median(t_grid), statistics.median(t_plain)
        r1, r2 = psi_s / pgd_s, grid_s / plain_s
        ok = ok and r1 <= TARGET_PSI and r2 <= TARGET_GRID
        print(f"{name:<26} {psi_s:7.2f} {pgd_s:9.2f} {r1:6.3f} {'<= ' + str(TARGET_PSI):>7} | {grid_s:7.2f} "
              f"{plain_s:8.2f} {r2:6.2f} {'<= ' + str(TARGET_GRID):>7} {points / grid_s:9.0f}")  # fmt: skip
    print("all targets met" if ok else "some targets missed")


if __name__ == "__main__":
    main()
