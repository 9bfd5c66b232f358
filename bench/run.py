"""Wall time of `robustdissect run` (the default) and `robustdissect run --quick`, per stage.

Each variant runs as its own process, as a user would start it, into a fresh temporary run
directory. Prints one table: per stage the seconds recorded in results.json, then the process's
whole wall time (start-up, data and model loading, report) against its budget:

- default run (every stage, reduced budgets, n = 500)   budget 180 s on 2 cores
- run --quick (n = 200, lighter stage settings)          budget  60 s

and the evidence store's hits and misses (requests answered from the store / computed).

Usage: python bench/run.py [--variants default,quick] [--threads N]
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

BUDGETS = {"default": 180.0, "quick": 60.0}
FLAGS = {"default": [], "quick": ["--quick"]}


def run_variant(name: str, threads: int | None) -> tuple[float, dict[str, float], dict[str, dict[str, int]]]:
    """(wall seconds, seconds per stage, evidence counts) of one variant."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    exe = Path(sys.executable).with_name("robustdissect")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        proc = subprocess.run([str(exe), "run", *FLAGS[name], "--out", str(out)], env=env, capture_output=True,
                              text=True, cwd=tmp)  # fmt: skip
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
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    results = {n: run_variant(n, args.threads) for n in names}
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
    print(f"{'budget':<14}" + "".join(f"{BUDGETS[n]:>11.0f}s" for n in names))
    print(f"{'wall / budget':<14}" + "".join(f"{results[n][0] / BUDGETS[n]:>12.2f}" for n in names))
    for n in names:
        ev = results[n][2]
        print(f"evidence ({n}): hits {ev.get('hits', {})}, computed {ev.get('misses', {})}")


if __name__ == "__main__":
    main()
