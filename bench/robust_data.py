"""Benchmark: back-perturbation (METHODS §6.5) and D̂_R construction (§3.2) against their bound,
`steps` × one forward+backward pass with respect to the input on the same batch.

    python bench/robust_data.py                      # N = 250, 20 steps, 3 rounds; sharding check on 500
    python bench/robust_data.py --n 500 --steps 50 --rounds 5 --shard-n 60000 --shard-steps 1000

Timed (process CPU seconds, one intra-op thread; ratios are taken within a round so the slow
drifts of a shared machine's load cancel; the median over rounds is printed):

- bound: `steps` × (forward + backward of the CE loss to the input), no hooks;
- back-perturbation: `back_perturb` with hooks on conv1..conv6, 40 brittle and 20 robust units
  (its extra clean forward for f_R(x) included);
- D̂_R: `match_representation` on the input of fc1 (penultimate), from other images (its extra
  forward for g(x) included).

Target: ratio ≤ 1.15. The model is the shipped `fmnist-smallcnn-vanilla`; images are uniform noise.

Sharding check: `robustdissect robust-data --kind r` (D̂_R from the shipped PAT model, the first
`--shard-n` images of the seeded training permutation, `--shard-steps` iterations, batches of
`--shard-batch`) once as one process and once under `torchrun --standalone --nproc_per_node 2 --`
(gloo, CPU), both with OMP_NUM_THREADS=1; prints the wall times and the max |difference| of the
tensors (0 and equal labels/sources = the same dataset). `--shard-n 0` skips it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from robustdissect.analysis.features import responses
from robustdissect.analysis.pushback import UnitSets, back_perturb
from robustdissect.models import load_checkpoint
from robustdissect.training.robust_data import match_representation

LAYERS = [f"conv{i}" for i in range(1, 7)]


def cpu_time(fn: Callable[[], object]) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=250)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-n", type=int, default=500, help="images of the sharding check (0: skip)")
    ap.add_argument("--shard-steps", type=int, default=20)
    ap.add_argument("--shard-batch", type=int, default=50)
    args = ap.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1, 5, 15 min), "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    torch.set_num_threads(1)
    model, _ = load_checkpoint("fmnist-smallcnn-vanilla")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.n, 1, 28, 28, generator=g)
    z0 = torch.rand(args.n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.n,), generator=g)
    channels = [int(responses(model, x[:1], [name]).shape[1]) for name in LAYERS]
    u = sum(channels)
    perm = torch.randperm(u, generator=g)
    sets = UnitSets(LAYERS, channels, perm[:40], perm[40:60], torch.zeros(u), torch.ones(u), torch.zeros(40))

    def bound() -> None:
        for _ in range(args.steps):
            xi = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xi), y), xi)

    def bp() -> None:
        back_perturb(model, x, sets, steps=args.steps, batch_size=args.n)

    def dr() -> None:
        match_representation(model, "fc1", x, z0, steps=args.steps)

    ratios: dict[str, list[float]] = {"back-perturbation": [], "D_R": []}
    bounds: list[float] = []
    for _ in range(args.rounds):
        b = cpu_time(bound)
        bounds.append(b)
        ratios["back-perturbation"].append(cpu_time(bp) / b)
        ratios["D_R"].append(cpu_time(dr) / b)
    b = statistics.median(bounds)
    print(f"N = {args.n}, steps = {args.steps}, rounds = {args.rounds}; bound {b:.2f} s "
          f"({args.n * args.steps / b:.0f} image-steps/s)")  # fmt: skip
    for name, r in ratios.items():
        m = statistics.median(r)
        print(f"{name:18s} ratio to the bound {m:.3f} ({args.n / (b * m):.1f} images/s at {args.steps} steps) "
              f"{'OK' if m <= 1.15 else 'ABOVE'} target 1.15")  # fmt: skip
    if args.shard_n:
        sharding_check(args.shard_n, args.shard_steps, args.shard_batch)


def sharding_check(n: int, steps: int, batch: int) -> None:
    """D̂_R built by one process and by two torchrun processes (gloo): same tensors?"""
    from safetensors.torch import load_file

    bindir = os.path.dirname(sys.executable)
    cli, torchrun = os.path.join(bindir, "robustdissect"), os.path.join(bindir, "torchrun")
    build = ["robust-data", "--kind", "r", "--n", str(n), "--steps", str(steps), "--batch", str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tmp = tempfile.mkdtemp(prefix="bench-robust-data-")
    try:
        one, two = os.path.join(tmp, "one.safetensors"), os.path.join(tmp, "two.safetensors")
        t = time.perf_counter()
        subprocess.run([cli, *build, "--out", one], check=True, env=env, capture_output=True)
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        # "--": torchrun would read the build's --n as an abbreviation of its own options
        subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "--", cli, *build, "--out", two],
                       check=True, env=env, capture_output=True)  # fmt: skip
        t_two = time.perf_counter() - t
        a, b = load_file(one), load_file(two)
        diff = float((a["x"] - b["x"]).abs().max())
        same = torch.equal(a["y"], b["y"]) and torch.equal(a["source"], b["source"])
        print(f"D_R sharding check (N = {n}, {steps} steps, batches of {batch}, OMP_NUM_THREADS=1): one process "
              f"{t_one:.1f} s wall, torchrun 2 processes (gloo) {t_two:.1f} s wall (both with start-up); "
              f"max |x_one - x_two| = {diff:.3g}, labels and sources {'equal' if same else 'DIFFERENT'}; "
              f"{'bitwise equal' if diff == 0 and same else 'NOT EQUAL'}")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
