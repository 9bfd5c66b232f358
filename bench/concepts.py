"""Benchmark: Network Dissection of every conv hook point (224 units of the shipped smallcnn)
against one plain forward pass over the same concept images, and its working memory against the
number of images.

    python bench/concepts.py                          # timing at N = 1000, memory at 500 / 2000 / 4000
    python bench/concepts.py --n 2000 --repeats 5

Target (issue 12): dissection within 2× one plain forward pass; working memory flat in N
(streamed thresholds and tallies, no stored maps). Timing uses process CPU seconds with one
intra-op thread; every round runs each variant once and the median ratio over rounds is reported,
so the drifts of a shared machine's load cancel. Variants: the default (streaming thresholds,
100-shuffle null), a 10-shuffle null (the null's share of the cost), exact thresholds, and the
floor of the two-pass design: its two forward passes alone (hooks that do nothing, each pass
stopped after the last dissected layer as dissect's are).

Memory runs each N in a fresh process: the peak resident size during `dissect` minus the resident
size just before it (the concept set itself is input, not working memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from robustdissect.analysis.concepts import _stream, dissect
from robustdissect.data.concepts import ConceptSet, generate_concept_set
from robustdissect.models import load_checkpoint

LAYERS = [f"conv{i}" for i in range(1, 7)]
TIME_TARGET, MEMORY_TOLERANCE = 2.0, 0.10


def concept_set(n: int) -> ConceptSet:
    from robustdissect.data import load_dataset

    data = load_dataset("fashion-mnist")
    train = data.train.subset(max(n, 1000), seed=0)
    return generate_concept_set(
        n, (1, 28, 28), class_images=train.x, class_labels=train.y, class_names=data.classes, seed=0
    )


def bare_passes(m: nn.Module, cs: ConceptSet, batch: int) -> None:
    """dissect's two passes with hooks that do nothing: what any two-pass dissection costs."""
    for _ in range(2):
        _stream(m, LAYERS, cs.images, batch, lambda *_: None)


def model() -> nn.Module:
    m, _ = load_checkpoint("fmnist-smallcnn-vanilla")
    return m.eval()


def forward(m: nn.Module, x: torch.Tensor, batch: int) -> None:
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            m(x[s : s + batch])


def cpu(fn: Any) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def timing(n: int, repeats: int, batch: int) -> dict[str, Any]:
    m, cs = model(), concept_set(n)
    variants = {
        "dissect (streaming, 100 shuffles)": lambda: dissect(m, cs, LAYERS, batch_size=batch),
        "dissect (streaming, 10 shuffles)": lambda: dissect(m, cs, LAYERS, permutations=10, batch_size=batch),
        "dissect (exact, 100 shuffles)": lambda: dissect(m, cs, LAYERS, threshold="exact", batch_size=batch),
        "two bare passes (the floor)": lambda: bare_passes(m, cs, batch),
    }
    forward(m, cs.images, batch)  # warm-up
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    times: dict[str, list[float]] = {k: [] for k in ["forward", *variants]}
    for _ in range(repeats):
        f = cpu(lambda: forward(m, cs.images, batch))
        times["forward"].append(f)
        for name, fn in variants.items():
            t = cpu(fn)
            times[name].append(t)
            ratios[name].append(t / f)
    return {
        "n": n,
        "batch": batch,
        "images_per_s": {k: n / statistics.median(v) for k, v in times.items()},
        "median_ratio_to_forward": {k: statistics.median(v) for k, v in ratios.items()},
    }


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(n: int, threshold: str) -> None:
    torch.set_num_threads(1)
    m, cs = model(), concept_set(n)
    warm = ConceptSet(cs.images[:50], [p[:50] for p in cs.planes], cs.concepts, cs.categories, cs.concept_category)
    dissect(m, warm, LAYERS, threshold=threshold, permutations=2)  # warm-up: lazy imports, thread pools
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current size
    dissect(m, cs, LAYERS, threshold=threshold)  # type: ignore[arg-type]
    print(json.dumps({"n": n, "threshold": threshold, "working_mib": (_rss_kib("VmHWM") - before) / 1024}))


def memory(sizes: list[int], threshold: str) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        # large blocks from mmap and trimmed on free, so the resident size follows live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        res = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(n), "--threshold", threshold],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--memory-sizes", type=int, nargs="+", default=[500, 2000, 4000])
    ap.add_argument("--memory-child", type=int, default=None)
    ap.add_argument("--threshold", default="streaming")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.threshold)
        return
    torch.set_num_threads(1)
    if not args.skip_timing:
        t = timing(args.n, args.repeats, args.batch)
        print(f"concept dissection of {len(LAYERS)} layers (224 units), N = {t['n']} images, batch {t['batch']}")
        for name, ips in t["images_per_s"].items():
            ratio = t["median_ratio_to_forward"].get(name)
            extra = f"   {ratio:.2f}x forward (target <= {TIME_TARGET:g}x)" if ratio is not None else ""
            print(f"  {name:36s} {ips:9.0f} images/s{extra}")
    for threshold in ("streaming", "exact"):
        mem = memory(args.memory_sizes, threshold)
        base = mem[0]["working_mib"]
        print(f"working memory of dissect ({threshold} thresholds):")
        for row in mem:
            growth = row["working_mib"] / base - 1 if base > 0 else float("nan")
            print(f"  N = {row['n']:6d}: {row['working_mib']:8.1f} MiB ({growth:+.0%} vs N = {mem[0]['n']})")


if __name__ == "__main__":
    main()
