"""Cost of the robustness metric Ψ and of the landscapes.

1. Ψ against a full PGD-100 robust-accuracy evaluation of the same model and images, for the
   standard and the PGD-trained smallcnn:
   - Ψ default: K = 5 KL steps (α = ε/4), temperature calibrated on 1000 validation images; the
     calibration cache is cleared before every call, so each timing includes the calibration
     forward (its share is printed as "cal s"; "(no cal)" is Ψ default without it over PGD-100,
     the cost of a further Ψ of a model whose temperature is cached);
   - Ψ K = 20 (METHODS' K), also from scratch;
   - PGD-100: L-inf, ε = 0.1, α = 2.5ε/k, random start, early stop per image, `--restarts` runs
     (each after the first only on the images still correct) - the package's evaluation, as
     `robustdissect metric --evaluate` runs it. Target: Ψ default time / PGD-100 time <= 0.1;
   - with `--fixed` also PGD-100 without early stop (every image takes all 100 steps in each run
     it is in), timed once: the cost of an evaluation that does not stop at success.
2. Landscape grid throughput: `analysis.landscape` on N images and a G×G grid (plus its 1-D slice)
   against plain batched forwards of the same number of points in chunks of the same size.
   Target: landscape time / plain forward time <= 1.1 (points/s within 10%).

The measurements are interleaved in rounds and the medians reported, so both sides see the same
machine load; the load average is printed first.

Usage: python bench/metric.py [--n 100] [--restarts 2] [--repeats 3] [--threads 1] [--fixed]
       [--grid 41 --land-n 20]   (on a busy machine: --grid 21 --land-n 8)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from robustdissect.analysis.landscape import landscape, landscape_directions
from robustdissect.analysis.metric import DEFAULT_STEPS, clear_calibration_cache, robustness_metric
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


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """(seconds, fn(*args, **kwargs))."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fixed", action="store_true", help="also time PGD-100 without early stop (once)")
    p.add_argument("--grid", type=int, default=41)
    p.add_argument("--land-n", type=int, default=20)
    p.add_argument("--chunk", type=int, default=4096)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = load_dataset("fashion-mnist")
    test = data.test.subset(a.n, seed=0)
    x, y, x_cal = test.x, test.y, data.val.x[:1000]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average {load}; threads {torch.get_num_threads()}; {a.n} images; Ψ default K = {DEFAULT_STEPS}; "
          f"PGD-100 eps 0.1, restarts {a.restarts}, early stop; grid {a.grid}x{a.grid} on {a.land_n} "
          "images")  # fmt: skip
    print(f"{'model':<24} {'Ψ5 s':>6} {'cal s':>6} {'Ψ20 s':>6} {'PGD s':>6} {'acc':>5} {'Ψ5/PGD':>7} "
          f"{'(no cal)':>8} {'Ψ20/PGD':>8} {'target':>7} | {'grid s':>7} {'plain s':>8} {'ratio':>6} {'target':>7} "
          f"{'points/s':>9}")  # fmt: skip
    ok_psi = ok_grid = True
    fixed_lines = []
    for name in MODELS:
        model, _ = load_checkpoint(name)
        model.eval()
        pgd = PGD(0.1, steps=100, step_rule="madry", restarts=a.restarts, early_stop=True, batch_size=500)
        xl, yl = x[: a.land_n], y[: a.land_n]
        dirs = landscape_directions(model, xl, yl, direction="gradient")
        line = 201
        points = a.land_n * (a.grid * a.grid + line + 1)
        plain_x = torch.rand(min(a.chunk, points), *x.shape[1:])

        t_psi, t_cal, t_psi20, t_pgd, t_grid, t_plain = [], [], [], [], [], []
        acc = float("nan")
        for _ in range(a.repeats):
            clear_calibration_cache()
            dt, r = timed(robustness_metric, model, x, eps=0.1, calibration_x=x_cal)
            t_psi.append(dt)
            t_cal.append(r.calibration_seconds)
            clear_calibration_cache()
            t_psi20.append(timed(robustness_metric, model, x, eps=0.1, steps=20, calibration_x=x_cal)[0])
            dt, res = timed(pgd, model, x, y)
            t_pgd.append(dt)
            acc = res.robust_accuracy
            t_grid.append(timed(landscape, model, xl, yl, eps=0.1, grid=a.grid, line_points=line,
                                chunk_size=a.chunk, directions=dirs)[0])  # fmt: skip
            t_plain.append(timed(plain, model, plain_x, points, a.chunk)[0])
        med = statistics.median
        psi_s, cal_s, psi20_s, pgd_s = med(t_psi), med(t_cal), med(t_psi20), med(t_pgd)
        grid_s, plain_s = med(t_grid), med(t_plain)
        r5, r20, rg = psi_s / pgd_s, psi20_s / pgd_s, grid_s / plain_s
        ok_psi = ok_psi and r5 <= TARGET_PSI
        ok_grid = ok_grid and rg <= TARGET_GRID
        print(f"{name:<24} {psi_s:6.2f} {cal_s:6.2f} {psi20_s:6.2f} {pgd_s:6.2f} {acc:5.2f} {r5:7.3f} "
              f"{(psi_s - cal_s) / pgd_s:8.3f} {r20:8.3f} "
              f"{'<= ' + str(TARGET_PSI):>7} | {grid_s:7.2f} {plain_s:8.2f} {rg:6.2f} {'<= ' + str(TARGET_GRID):>7} "
              f"{points / grid_s:9.0f}")  # fmt: skip
        if a.fixed:
            full = PGD(0.1, steps=100, step_rule="madry", restarts=a.restarts, early_stop=False, batch_size=500)
            f_s = timed(full, model, x, y)[0]
            fixed_lines.append(f"{name:<24} PGD-100 without early stop {f_s:6.2f} s: Ψ5/that {psi_s / f_s:.3f}, "
                               f"Ψ20/that {psi20_s / f_s:.3f}")  # fmt: skip
    for s in fixed_lines:
        print(s)
    print(f"Ψ target (<= {TARGET_PSI} of early-stopped PGD-100) {'met' if ok_psi else 'missed'} on "
          f"{'every model' if ok_psi else 'at least one model'}; landscape target {'met' if ok_grid else 'missed'}")
    print(f"load average at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
