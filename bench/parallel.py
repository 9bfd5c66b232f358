"""Analysing commands under torchrun: 2 processes against 1, one thread each, on the built-in data.

For each command (default: `evaluate` and `sensitivity`, `--n 2000` test images, the run's default
budgets, no counterparts), in this order:

    OMP_NUM_THREADS=1 robustdissect CMD --n N --compare none --out DIR/one
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -- robustdissect CMD ... --out DIR/two

and prints the wall time of each, the speed-up of the whole command and of each stage (the stage
seconds in results.json), and whether the two runs agree: adversarial examples and predictions
bitwise (continuous L2 steps: within 1e-5, as batches of other sizes round the model's float
sums differently), every table cell within a relative 1e-6 (σ sums are added in another order).
Target (issue "Scale out"): speed-up >= 1.7x per command on 2 cores, exact agreement.

Usage: python bench/parallel.py [--n 2000] [--commands evaluate,sensitivity] [--procs 2] [--keep DIR] [--config YAML]
Run it on an otherwise idle machine: both processes need a core each.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from robustdissect.store import list_evidence, load_evidence

LAUNCHER = "from robustdissect.cli import main\nmain()\n"


def _run(cmd: list[str], log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    return seconds


def _cells(path: Path) -> list[list[Any]]:
    with path.open() as f:
        rows = list(csv.reader(f))
    out = []
    for r in rows:
        row: list[Any] = []
        for v in r:
            try:
                row.append(float(v))
            except ValueError:
                row.append(v)
        out.append(row)
    return out


def _agreement(one: Path, two: Path) -> tuple[int, list[str], int, int, list[str]]:
    """(evidence items equal bitwise, items equal within 1e-5, items compared, table cells
    compared, differences)."""
    problems: list[str] = []
    close: list[str] = []
    items = [e for e in list_evidence(one) if e["kind"] in ("adv", "predictions")]
    same = 0
    for e in items:
        a = load_evidence(one, e["kind"], e["key"])[0]
        try:
            b = load_evidence(two, e["kind"], e["key"])[0]
        except Exception:  # any missing item is a difference
            problems.append(f"missing in the 2-process run: {e['kind']}/{e['key'][:12]}")
            continue
        if all(torch.equal(a[k], b[k]) for k in a):
            same += 1
            continue
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())
        if worst <= 1e-5:  # a continuous step (L2) repeats the other batch's last-bit float differences
            close.append(f"{e['parts'].get('name')} (max |diff| {worst:.1e})")
        else:
            problems.append(f"differs: {e['kind']} {e['parts'].get('name')} (max |diff| {worst:.1e})")
    cells = 0
    for table in sorted((one / "tables").glob("*.csv")):
        a, b = _cells(table), _cells(two / "tables" / table.name)
        if len(a) != len(b):
            problems.append(f"{table.name}: {len(a)} vs {len(b)} rows")
            continue
        timed = {i for i, h in enumerate(a[0] if a else []) if "seconds" in str(h)}  # wall times differ, of course
        for ra, rb in zip(a, b, strict=True):
            for i, (u, v) in enumerate(zip(ra, rb, strict=False)):
                if i in timed:
                    continue
                cells += 1
                if isinstance(u, float) and isinstance(v, float):
                    if not (math.isclose(u, v, rel_tol=1e-6, abs_tol=1e-9) or (math.isnan(u) and math.isnan(v))):
                        problems.append(f"{table.name}: {u} vs {v}")
                elif u != v:
                    problems.append(f"{table.name}: {u!r} vs {v!r}")
    return same, close, len(items), cells, problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--commands", default="evaluate,sensitivity")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    ap.add_argument("--config", type=Path, default=None,
                    help="run YAML for both runs (e.g. a stage's own n: the default profile caps σ at 300 images)")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="rd-parallel-"))
    root.mkdir(parents=True, exist_ok=True)
    launcher = root / "launch.py"
    launcher.write_text(LAUNCHER)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, n {args.n}, {args.procs} processes x 1 thread")
    summary = []
    try:
        for cmd in args.commands.split(","):
            common = [str(launcher), cmd, "--n", str(args.n), "--compare", "none"]
            common += ["--config", str(args.config)] if args.config else []
            one, two = root / f"{cmd}-one", root / f"{cmd}-two"
            t1 = _run([sys.executable, *common, "--out", str(one)], root / f"{cmd}-one.log")
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(args.procs), "--"]  # fmt: skip
            t2 = _run([*torchrun, *common, "--out", str(two)], root / f"{cmd}-two.log")
            s1 = json.loads((one / "results.json").read_text())["stages"]
            s2 = json.loads((two / "results.json").read_text())["stages"]
            same, close, items, cells, problems = _agreement(one, two)
            print(f"\n== {cmd} --n {args.n}: 1 process {t1:.1f} s, {args.procs} processes {t2:.1f} s, "
                  f"speed-up {t1 / t2:.2f}x (target >= 1.7x)")  # fmt: skip
            for name in s1:
                a, b = s1[name].get("seconds", math.nan), s2.get(name, {}).get("seconds", math.nan)
                print(f"    stage {name:<12} {a:8.1f} s -> {b:8.1f} s   speed-up {a / b if b else math.nan:5.2f}x")
            near = ", ".join(close) or "-"
            print(f"    agreement: {same}/{items} evidence items bitwise equal, {len(close)} within 1e-5 ({near}), "
                  f"{cells} table cells compared, {len(problems)} differences")  # fmt: skip
            for p in problems[:10]:
                print(f"      {p}")
            summary.append((cmd, t1, t2, same + len(close) == items and not problems))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print("\ncommand        1 proc s   2 proc s   speed-up   agree")
    for cmd, t1, t2, ok in summary:
        print(f"{cmd:<14} {t1:8.1f}   {t2:8.1f}   {t1 / t2:7.2f}x   {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
