"""Peak memory of `evaluate` and `sensitivity` on an ImageFolder as the folder grows.

Writes ImageFolder fixtures of 1,000 and 5,000 generated 224×224 PNG images (three classes; each
image a solid class colour with noise; the same 200 test images at both sizes, the rest training
images) into a temporary directory, then runs, in a fresh process per size and command,

    robustdissect evaluate --quick --n N --attacks fgsm --curves none --corruptions none \\
        --model tiny.py:make --data image-folder --data-dir DIR --image-size 64
    robustdissect sensitivity --quick --n N --steps 2 --experiments profiles ... (same data and model)

with a tiny convolutional model written here (the point is the data path), and prints each
process's peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and wall time, and the ratio of the
larger folder's peak to the smaller's (target: within 1.2x). `--eager` adds the same runs with the
images loaded whole into memory (data option lazy: false), the loader before streaming.

The 5,000-image folder hard-links the 1,000 distinct files under new names (so it costs no extra
disk); every file is still opened, its header read, and only the analysed images are decoded.
`--quick` analyses at most 200 images (here: the 200 test images at both sizes), so N is the size
of the folder, not of the analysed set; the model is seeded, so both sizes do the same attack work.

Usage: python bench/data_memory.py [--sizes 1000,5000] [--eager] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY_MODEL = '''
import torch
from torch import nn


def make(num_classes: int = 3, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)  # the same model in every process: the runs differ only in their data
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(16 * 16, num_classes),
    )
'''

# Runs the CLI in this process and reports its own peak RSS: one process per measurement, so a
# measurement never inherits another's peak.
CHILD = """
import json, resource, sys, time
from robustdissect.cli import main
t0 = time.perf_counter()
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as e:
    code = int(e.code or 0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print("MEASURE " + json.dumps({"code": code, "peak_kib": peak, "wall_s": time.perf_counter() - t0}))
"""

CLASSES = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}


def write_images(root: Path, n: int, size: int = 224, seed: int = 0) -> list[Path]:
    """n distinct PNG images size x size across the classes: a solid colour plus Gaussian noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    names = list(CLASSES)
    for i in range(n):
        cls = names[i % len(names)]
        base = np.array(CLASSES[cls], dtype=np.float32)
        img = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        f = root / cls / f"{i:05d}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(f, compress_level=1)
        files.append(f)
        if (i + 1) % 250 == 0:
            print(f"  wrote {i + 1}/{n} images", file=sys.stderr, flush=True)
    return files


TEST_IMAGES = 200


def fixture(root: Path, n: int, distinct: list[Path]) -> Path:
    """An ImageFolder of n images, DIR/train/<class>/ and DIR/test/<class>/: the same first
    TEST_IMAGES files as the test split at every size (so every size analyses the same images),
    the rest of the distinct files, cycled, as training images; hard-linked (or copied)."""
    folder = root / f"folder-{n}"
    test = min(TEST_IMAGES, len(distinct) // 2)
    for i in range(n):
        part = "test" if i < test else "train"
        src = distinct[i] if i < test else distinct[test + (i - test) % (len(distinct) - test)]
        dst = folder / part / src.parent.name / f"{i:05d}-{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            dst.write_bytes(src.read_bytes())
    return folder


def measure(args: list[str], cwd: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=cwd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEASURE ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"measurement failed ({' '.join(args[:2])}):\n{proc.stderr[-2000:]}")
    result: dict[str, float] = json.loads(lines[-1][len("MEASURE "):])
    if result["code"] != 0:
        sys.exit(f"robustdissect exited with {result['code']}:\n{proc.stderr[-2000:]}")
    return result


def command(stage: str, n: int, folder: Path, out: Path, eager: bool, cwd: Path) -> list[str]:
    args = [stage, "--quick", "--n", str(n)]
    if stage == "evaluate":
        args += ["--attacks", "fgsm", "--curves", "none", "--corruptions", "none"]
    else:
        args += ["--steps", "2", "--experiments", "profiles"]
    args += ["--model", "tiny.py:make", "--model-arg", f"num_classes={len(CLASSES)}", "--compare", "none",
             "--data", "image-folder", "--data-dir", str(folder), "--image-size", "64",
             "--out", str(out), "--overwrite", "--device", "cpu"]  # fmt: skip
    if eager:
        cfg = cwd / "eager.yaml"
        cfg.write_text("data_options:\n  lazy: false\n")
        args += ["--config", str(cfg)]
    return args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000")
    ap.add_argument("--eager", action="store_true", help="also measure the images loaded whole (lazy: false)")
    ap.add_argument("--keep", type=Path, default=None, help="write the fixtures here and keep them")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="rd-data-memory-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        (root / "tiny.py").write_text(TINY_MODEL)
        distinct_n = min(sizes[0], 1000)
        print(f"writing {distinct_n} distinct 224x224 PNG images into {root}", file=sys.stderr)
        distinct = write_images(root / "distinct", distinct_n)
        folders = {n: fixture(root, n, distinct) for n in sizes}
        modes = [False, True] if args.eager else [False]
        rows = []
        for stage in ("evaluate", "sensitivity"):
            for eager in modes:
                for n in sizes:
                    out = root / f"run-{stage}-{n}"
                    r = measure(command(stage, n, folders[n], out, eager, root), root)
                    rows.append((stage, "eager" if eager else "lazy", n, r["peak_kib"] / 1024, r["wall_s"]))
                    print(f"  {stage} {rows[-1][1]} N={n}: peak {rows[-1][3]:.0f} MiB, {r['wall_s']:.1f} s",
                          file=sys.stderr, flush=True)  # fmt: skip
    print(f"{'command':<12} {'data':<6} {'N':>6} {'peak RSS MiB':>13} {'wall s':>8}")
    for stage, mode, n, peak, wall in rows:
        print(f"{stage:<12} {mode:<6} {n:>6} {peak:>13.0f} {wall:>8.1f}")
    print()
    for stage in ("evaluate", "sensitivity"):
        for mode in ("lazy", "eager") if args.eager else ("lazy",):
            peaks = [p for s, m, _n, p, _w in rows if s == stage and m == mode]
            ratio = peaks[-1] / peaks[0]
            met = "met" if ratio <= 1.2 else "MISSED"
            verdict = "" if mode == "eager" else f"  (target <= 1.2: {met})"
            print(f"{stage} {mode}: peak RSS at N={sizes[-1]} / N={sizes[0]} = {ratio:.2f}x{verdict}")
    print(f"run at {time.strftime('%Y-%m-%d %H:%M')}, python {sys.version.split()[0]}, {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
