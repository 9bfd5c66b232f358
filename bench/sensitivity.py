"""Benchmark: all-layer neuron sensitivity σ + σ_Ratio against two plain forward passes, and peak
memory against the number of pairs.

    python bench/sensitivity.py                      # timing (N = 512) and memory (2000 vs 10000)
    python bench/sensitivity.py --n 2000 --repeats 9 --forward-sizes 64 128

Bounds (issue 4): σ + ratio of all conv and ReLU hook points within 1.15 × the two plain forward
passes over the same pairs; peak memory for N = 2000 and N = 10000 within 10%.

Timing compares passes that run forwards of the same size F images (the per-image cost of a CPU
forward grows with the batch once activations leave the cache): plain = 2N/F forwards of F images
(x and x_adv separately); σ = `neuron_sensitivity` with B = F/2 pairs per batch (one forward of
the concatenated [x; x_adv]). Times are process CPU seconds (one intra-op thread). Every round runs
every variant once; ratios are taken within a round and the median over rounds is reported, so the
slow drifts of a shared machine's load cancel; minimum times and wall-clock medians are printed too.

The model is the shipped `fmnist-smallcnn-vanilla` checkpoint when present, else smallcnn (width
16) with random weights; the pairs are synthetic ℓ∞ perturbations (ε = 0.1) of uniform noise
images, generated batch by batch from a seed so that the data never sits in memory whole.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from robustdissect.analysis.sensitivity import neuron_sensitivity
from robustdissect.models import build_model, load_checkpoint, shipped_checkpoints

LAYERS = [f"conv{i}" for i in range(1, 7)] + [f"relu{i}" for i in range(1, 7)]
TIME_BOUND, MEMORY_BOUND = 1.15, 0.10
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def load_model() -> tuple[nn.Module, str]:
    if "fmnist-smallcnn-vanilla" in shipped_checkpoints():
        model, _card = load_checkpoint("fmnist-smallcnn-vanilla")
        return model.eval(), "fmnist-smallcnn-vanilla"
    torch.manual_seed(0)
    return build_model("smallcnn", width=16).eval(), "smallcnn w16 (random weights)"


def pair_batches(n: int, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic cached pairs: x ~ U[0,1], x' = clip(x + 0.1·sign(noise)); (B, 1, 28, 28) each."""
    for i, s in enumerate(range(0, n, batch_size)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        b = min(batch_size, n - s)
        x = torch.rand(b, 1, 28, 28, generator=g)
        xa = (x + 0.1 * torch.randn(x.shape, generator=g).sign()).clamp(0, 1)
        yield x, xa


def rebatch(x: torch.Tensor, xa: torch.Tensor, b: int) -> Batches:
    return [(x[s : s + b], xa[s : s + b]) for s in range(0, x.shape[0], b)]


def timing(n: int, sizes: list[int], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """CPU and wall seconds per variant ("plain@F", "sigma@F") per round; every round runs every
    variant once, so slow drifts of the machine's load hit a round as a whole."""
    model, _ = load_model()
    x, xa = (torch.cat(t) for t in zip(*pair_batches(n, 256), strict=True))
    variants: dict[str, Callable[[], None]] = {}
    for f in sizes:
        plain_batches, half = rebatch(x, xa, f), rebatch(x, xa, max(1, f // 2))

        def plain(pb: Batches = plain_batches) -> None:
            with torch.no_grad():
                for xb, xab in pb:
                    model(xb)
                    model(xab)

        def sigma(b: Batches = half, bs: int = max(1, f // 2)) -> None:
            neuron_sensitivity(model, b, LAYERS, batch_size=bs)

        variants |= {f"plain@{f}": plain, f"sigma@{f}": sigma}
    for fn in variants.values():
        fn()  # warm-up
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - t0)
            wall[name].append(time.perf_counter() - w0)
    return cpu, wall


def memory_child(n: int, batch_size: int) -> None:
    """Run in a subprocess: peak RSS before and after σ over n streamed pairs (JSON on stdout)."""
    model, _ = load_model()
    neuron_sensitivity(model, pair_batches(2 * batch_size, batch_size), LAYERS, batch_size=batch_size)
    warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = neuron_sensitivity(model, pair_batches(n, batch_size, seed=1), LAYERS, batch_size=batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": res.n, "warm_kib": warm, "peak_kib": peak}))


def memory(ns: list[int], batch_size: int, threads: int) -> list[dict[str, int]]:
    out = []
    for n in ns:
        cmd = [sys.executable, __file__, "--child", str(n), "--batch-size", str(batch_size),
               "--threads", str(threads)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=512, help="pairs for the timing run")
    p.add_argument("--forward-sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--memory-n", type=int, nargs="+", default=[2000, 10000])
    p.add_argument("--batch-size", type=int, default=64, help="pairs per batch in the memory run")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        memory_child(args.child, args.batch_size)
        return

    _, name = load_model()
    print(f"model: {name}; layers: {len(LAYERS)} ({', '.join(LAYERS)}); threads: {args.threads}")
    print(f"time: N = {args.n} pairs, {args.repeats} rounds, process CPU seconds")
    cpu, wall = timing(args.n, args.forward_sizes, args.repeats)
    rounds = range(args.repeats)
    for f in args.forward_sizes:
        ratio = statistics.median(cpu[f"sigma@{f}"][i] / cpu[f"plain@{f}"][i] for i in rounds)
        print(
            f"  forwards of {f:4d} images: two plain forwards {min(cpu[f'plain@{f}']):.3f} s, "
            f"σ + ratio (B={f // 2} pairs) {min(cpu[f'sigma@{f}']):.3f} s (min); paired ratio {ratio:.3f}   "
            f"[wall medians {statistics.median(wall[f'plain@{f}']):.2f} / {statistics.median(wall[f'sigma@{f}']):.2f}]"
        )
    # per round: σ at its best forward size against the plain passes at theirs
    best = [
        min(cpu[f"sigma@{f}"][i] for f in args.forward_sizes) / min(cpu[f"plain@{f}"][i] for f in args.forward_sizes)
        for i in rounds
    ]
    q = statistics.quantiles(best, n=4)
    verdict = "OK" if statistics.median(best) <= TIME_BOUND else "OVER"
    print(
        f"time: best size vs best size, median over rounds {statistics.median(best):.3f}x "
        f"(quartiles {q[0]:.3f}-{q[2]:.3f}; bound {TIME_BOUND}) {verdict}"
    )
    mem = memory(args.memory_n, args.batch_size, args.threads)
    for m in mem:
        print(
            f"memory (B={args.batch_size}) N={m['n']}: peak RSS {m['peak_kib'] / 1024:.1f} MiB "
            f"(after a 2-batch warm-up {m['warm_kib'] / 1024:.1f} MiB)"
        )
    peaks = [m["peak_kib"] for m in mem]
    rel = (max(peaks) - min(peaks)) / min(peaks)
    verdict = "OK" if rel < MEMORY_BOUND else "OVER"
    print(f"memory: peaks differ by {100 * rel:.2f}% (bound {100 * MEMORY_BOUND:.0f}%) {verdict}")


if __name__ == "__main__":
    main()
