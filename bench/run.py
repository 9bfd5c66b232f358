"""Wall time of `robustdissect run` (the default) and `robustdissect run --quick`, per stage.

Each variant runs as its own process, as a user would start it, into a fresh temporary run
directory. Prints one table: per stage the seconds recorded in results.json, then the process's
whole wall time (start-up, data and model loading, report) against its budget:

- default run (every stage, reduced budgets, n = 500)   budget 180 s on 2 cores
- run --quick (n = 200, lighter stage settings)          budget  60 s

and the evidence store's hits and misses (requests answered from the store / computed).

`--data cifar-like` times the user's path instead: a CIFAR-10-format dataset written here
(3×32×32, 10 classes: 500 test images, 1,000 training images; Fashion-MNIST garments tinted per class
and resized), the zoo `resnet18` trained for one epoch with the standard objective and its twin with
fast adversarial training (one epoch each, timed apart), then `run --quick --compare` (target:
10 minutes on 2 cores) and, with `--variants default,quick`, the default run too.

Usage: python bench/run.py [--variants default,quick] [--threads N] [--data builtin|cifar-like]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGETS = {"default": 180.0, "quick": 60.0}
CIFAR_LIKE_BUDGETS = {"default": 1200.0, "quick": 600.0}
FLAGS = {"default": [], "quick": ["--quick"]}
EXE = Path(sys.executable).with_name("robustdissect")


def write_cifar_like(root: Path, n_train: int = 1000, n_test: int = 500) -> Path:
    """A CIFAR-10-format folder (data_batch_1..5, test_batch) of tinted, resized Fashion-MNIST."""
    import numpy as np
    import torch

    from robustdissect.data import load_dataset

    fm = load_dataset("fashion-mnist")
    tint = torch.rand(10, 3, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.4

    def batch(x: torch.Tensor, y: torch.Tensor) -> bytes:
        big = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
        rgb = (big * tint[y].view(-1, 3, 1, 1)).clamp(0, 1)
        data = (rgb * 255).round().to(torch.uint8).reshape(len(y), -1).numpy()
        return pickle.dumps({b"data": np.ascontiguousarray(data), b"labels": [int(v) for v in y]})

    root.mkdir(parents=True, exist_ok=True)
    per = n_train // 5
    for i in range(5):
        sl = slice(i * per, (i + 1) * per)
        (root / f"data_batch_{i + 1}").write_bytes(batch(fm.train.x[sl], fm.train.y[sl]))
    (root / "test_batch").write_bytes(batch(fm.test.x[:n_test], fm.test.y[:n_test]))
    return root


def _train(folder: Path, data: Path, objective: str, env: dict[str, str]) -> float:
    """Train the zoo resnet18 for one epoch on the CIFAR-like data; returns the wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(EXE), "train", "--model", "resnet18", "--data", "cifar10", "--data-dir", str(data),
                           "--objective", objective, "--epochs", "1", "--device", "cpu", "--out", str(folder)],
                          env=env, capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"training {objective} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def cifar_like_args(tmp: Path, env: dict[str, str]) -> list[str]:
    """Write the data, train the pair, and return the `run` arguments that analyse it."""
    data = write_cifar_like(tmp / "cifar-like")
    for objective in ("vanilla", "fast"):
        seconds = _train(tmp / objective, data, objective, env)
        print(f"trained resnet18 ({objective}, 1 epoch on 1,000 images) in {seconds:.0f} s", flush=True)
    return ["--model", "resnet18", "--weights", str(tmp / "vanilla" / "model.safetensors"), "--compare",
            "robust=resnet18", "--compare-weights", str(tmp / "fast" / "model.safetensors"), "--data", "cifar10",
            "--data-dir", str(data)]  # fmt: skip


def run_variant(
    name: str, threads: int | None, extra: list[str] | None = None
) -> tuple[float, dict[str, float], dict[str, dict[str, int]]]:
    """(wall seconds, seconds per stage, evidence counts) of one variant."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = extra if extra is not None else []
        t0 = time.perf_counter()
        proc = subprocess.run([str(EXE), "run", *FLAGS[name], *args, "--out", str(out)], env=env,
                              capture_output=True, text=True, cwd=tmp)  # fmt: skip
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads((out / "results.json").read_text())
    stages = {s: float(e.get("seconds", float("nan"))) for s, e in res["stages"].items()}
    return wall, stages, res.get("evidence", {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="default,quick")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: unset)")
    ap.add_argument("--data", choices=("builtin", "cifar-like"), default="builtin")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    budgets = BUDGETS
    with tempfile.TemporaryDirectory() as tmp:
        extra = None
        if args.data == "cifar-like":
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
            extra, budgets = cifar_like_args(Path(tmp), env), CIFAR_LIKE_BUDGETS
        results = {n: run_variant(n, args.threads, extra) for n in names}
    stages: list[str] = []
    for _wall, per, _ev in results.values():
        stages += [s for s in per if s not in stages]
    head = f"{'stage':<14}" + "".join(f"{n:>12}" for n in names)
    print(f"cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} at the end")
    print(head)
    print("-" * len(head))
    for s in stages:
        print(f"{s:<14}" + "".join(f"{results[n][1].get(s, float('nan')):>11.1f}s" for n in names))
    print("-" * len(head))
    print(f"{'wall':<14}" + "".join(f"{results[n][0]:>11.1f}s" for n in names))
    print(f"{'budget':<14}" + "".join(f"{budgets[n]:>11.0f}s" for n in names))
    print(f"{'wall / budget':<14}" + "".join(f"{results[n][0] / budgets[n]:>12.2f}" for n in names))
    for n in names:
        ev = results[n][2]
        print(f"evidence ({n}): hits {ev.get('hits', {})}, computed {ev.get('misses', {})}")


if __name__ == "__main__":
    main()
