"""Benchmark: feature scoring (METHODS §6.1) against one plain forward pass over the same images,
and peak memory of the streamed reference statistics against the number of images.

    python bench/features.py                        # timing (N = 2000) and memory (2000 vs 20000 vs 60000)
    python bench/features.py --n 1000 --rounds 3

Timed variants, each over the same N images in batches of 250 (process CPU seconds, one intra-op
thread; every round runs every variant once and ratios are taken within a round, so the slow
drifts of a shared machine's load cancel; the median over rounds is printed):

- forward: one plain forward pass of the model (no hooks, no grad);
- reference: `reference_statistics` — μ, s (Welford) and the CDF sketch of every unit of
  conv1..conv6 (224 units), streamed;
- score f, q: `responses` of every unit, standardised (f) and ranked by the sketch (q);
- phi: `gradient_x_activation` — responses and gradient × activation (one forward + backward).

Memory: `reference_statistics` over N images generated batch by batch (the data never sits in
memory whole), in a fresh process per N; printed are the peak RSS above the RSS before the call and
the numbers the CDF sketch holds per unit (at most 2 · capacity + 1, whatever N).

The model is the shipped `fmnist-smallcnn-vanilla` checkpoint; images are uniform noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch

from robustdissect.analysis.features import gradient_x_activation, reference_statistics, responses
from robustdissect.models import load_checkpoint

LAYERS = [f"conv{i}" for i in range(1, 7)]
BATCH = 250


def batches(n: int, seed: int = 0) -> Iterator[torch.Tensor]:
    for i, s in enumerate(range(0, n, BATCH)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        yield torch.rand(min(BATCH, n - s), 1, 28, 28, generator=g)


def cpu_time(fn: Callable[[], object]) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def timing(n: int, rounds: int) -> None:
    torch.set_num_threads(1)
    model, _ = load_checkpoint("fmnist-smallcnn-vanilla")
    model.eval()
    x = torch.cat(list(batches(n)))
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(1))
    ref = reference_statistics(model, x, LAYERS, BATCH)

    def forward() -> None:
        with torch.no_grad():
            for s in range(0, n, BATCH):
                model(x[s : s + BATCH])

    def score() -> None:
        a = responses(model, x, LAYERS, BATCH)
        ref.standardise(a)
        ref.percentile(a)

    variants: dict[str, Callable[[], object]] = {
        "forward": forward,
        "reference": lambda: reference_statistics(model, x, LAYERS, BATCH),
        "score f, q": score,
        "phi": lambda: gradient_x_activation(model, x, y, LAYERS, BATCH),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        got = {k: cpu_time(fn) for k, fn in variants.items()}
        for k, t in got.items():
            times[k].append(t)
            ratios[k].append(t / got["forward"])
    print(f"feature scoring, N = {n} images, batches of {BATCH}, {rounds} rounds, 1 thread (CPU seconds)")
    print(f"{'variant':<12} {'median s':>9} {'images/s':>9} {'× forward':>10}")
    for k in variants:
        med = statistics.median(times[k])
        print(f"{k:<12} {med:9.3f} {n / med:9.0f} {statistics.median(ratios[k]):10.2f}")


def status_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> None:
    """Reset the peak resident size (VmHWM) to the current one (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(n: int) -> None:
    torch.set_num_threads(1)
    model, _ = load_checkpoint("fmnist-smallcnn-vanilla")
    model.eval()
    reference_statistics(model, batches(BATCH), LAYERS, BATCH)  # warm up allocators
    before = status_kib("VmRSS")
    reset_peak()
    ref = reference_statistics(model, batches(n, seed=2), LAYERS, BATCH)
    peak = status_kib("VmHWM")
    held = ref.cdf.values_held()
    print(json.dumps({"n": n, "peak_above_kib": peak - before, "sketch_values_per_unit": held}))


def memory(sizes: list[int]) -> None:
    print("\nreference statistics memory (fresh process per N, data generated batch by batch)")
    print(f"{'N':>7} {'peak RSS above start':>21} {'sketch numbers/unit':>20}")
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(n)], capture_output=True, text=True, check=True
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['n']:>7} {r['peak_above_kib'] / 1024:>18.1f} MiB {r['sketch_values_per_unit']:>20}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory-sizes", type=int, nargs="+", default=[2000, 20000, 60000])
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    timing(args.n, args.rounds)
    memory(args.memory_sizes)


if __name__ == "__main__":
    main()
