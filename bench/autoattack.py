"""This tool's L-inf worst case side by side with the original AutoAttack (standard version).

For each model (default: the shipped fmnist-smallcnn-pat and fmnist-smallcnn-vanilla), on the
first --n Fashion-MNIST test images at eps --eps, in one process:

- ours: the evaluate stage's worst case with its full (`--full`) budgets, built by the stage's own
  `build_attack`: PGD-20 (early stop), FGSM, APGD-CE (100), APGD-DLR (100), each only on the points
  still robust, then Square (5,000 queries) on the points every white-box attack left robust;
- AutoAttack: the authors' package as published on PyPI (`pyautoattack`, import name
  `pyautoattack`), version="standard": APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square 5,000.

Printed per stage: points attacked and broken, cumulative robust accuracy, cumulative time; then the
final accuracies (target: ours <= AutoAttack's + 0.2 points), the time ratio ours / AutoAttack in
wall time and in process CPU time (steadier on a shared machine; target <= 0.5), and the images
each breaks that the other does not.

Install the reference for the bench only (never a dependency of the library):
    .venv/bin/python -m pip install -c constraints.txt --no-deps pyautoattack
Usage: python bench/autoattack.py [--n 500] [--eps 0.1] [--threads 2] [--models a,b]
Long: on 2 shared CPU cores AutoAttack takes many minutes per robust model; run it with nohup.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
import time
from typing import Any

import torch
from torch import Tensor, nn

from robustdissect.attacks import Attack, get_threat
from robustdissect.data import load_dataset
from robustdissect.evaluation import EvaluateOptions, build_attack
from robustdissect.models import load_checkpoint

CASCADE = ["pgd-linf", "fgsm", "apgd-ce", "apgd-dlr", "square-linf"]


def _predict(model: nn.Module, x: Tensor, bs: int = 500) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + bs]).argmax(1) for i in range(0, x.shape[0], bs)])


def ours(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int) -> tuple[Tensor, list[dict[str, Any]]]:
    """Robust flags (N,) after the cascade, and one row per stage."""
    opts = EvaluateOptions(eps=eps)
    t0, c0 = time.perf_counter(), time.process_time()
    robust = _predict(model, x) == y
    rows: list[dict[str, Any]] = [
        {"stage": "clean", "attacked": len(y), "broken": 0, "acc": float(robust.float().mean()),
         "time": time.perf_counter() - t0}
    ]  # fmt: skip
    for name in CASCADE:
        attack: Attack = build_attack(name, opts, seed)
        idx = robust.nonzero().squeeze(1)
        broken = 0
        if idx.numel():
            res = attack(model, x[idx], y[idx])
            assert float(get_threat("linf").distance(res.x_adv, x[idx]).max()) <= eps + 1e-6
            broke = ~res.correct
            robust[idx[broke]] = False
            broken = int(broke.sum())
        rows.append({"stage": name, "attacked": int(idx.numel()), "broken": broken,
                     "acc": float(robust.float().mean()), "time": time.perf_counter() - t0,
                     "cpu": time.process_time() - c0})  # fmt: skip
        print(f"    ours {name:<12} attacked {int(idx.numel()):>4}  broken {broken:>4}  "
              f"robust {100 * rows[-1]['acc']:6.2f}%  total {rows[-1]['time']:7.1f} s", flush=True)  # fmt: skip
    return robust, rows


class _Capture(logging.Handler):
    """Collects AutoAttack's 'robust accuracy after X: Y% (total time Z s)' lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.lines.append(msg)
        print(f"    autoattack: {msg}", flush=True)


def autoattack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int
) -> tuple[Tensor, list[dict[str, Any]], float, float]:
    """Robust flags (N,) on AutoAttack's x_adv, its per-stage rows, its total wall and CPU time."""
    from pyautoattack import AutoAttack

    log = logging.getLogger("auto-attack")
    log.setLevel(logging.DEBUG)
    cap = _Capture()
    log.addHandler(cap)
    try:
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", device="cpu", seed=seed)
        t0, c0 = time.perf_counter(), time.process_time()
        x_adv, _y_adv = adversary.run_standard_evaluation(x, y, batch_size=500)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        log.removeHandler(cap)
    dist = get_threat("linf").distance(x_adv, x)
    inside = dist <= eps + 1e-5
    robust = (_predict(model, x_adv) == y) | ~inside  # an image outside the budget is not broken
    rows = []
    pat = re.compile(r"robust accuracy after (\S+): ([\d.]+)% \(total time ([\d.]+) s\)")
    for line in cap.lines:
        m = pat.search(line)
        if m:
            rows.append({"stage": m.group(1), "acc": float(m.group(2)) / 100, "time": float(m.group(3))})
    return robust, rows, total, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--models", default="fmnist-smallcnn-pat,fmnist-smallcnn-vanilla")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    have_aa = importlib.util.find_spec("pyautoattack") is not None
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, n {args.n}, eps {args.eps}")
    split = load_dataset("fashion-mnist").test
    x, y = split.x[: args.n], split.y[: args.n]
    summary = []
    for name in args.models.split(","):
        model, _ = load_checkpoint(name)
        model.eval()
        print(f"\n== {name}: {args.n} test images, L-inf eps {args.eps}", flush=True)
        r_ours, rows = ours(model, x, y, args.eps, args.seed)
        t_ours = rows[-1]["time"]
        if not have_aa:
            print("    pyautoattack is not installed: pip install -c constraints.txt --no-deps pyautoattack")
            summary.append((name, rows[-1]["acc"], None, t_ours, None, None))
            continue
        r_aa, aa_rows, t_aa, cpu_aa = autoattack(model, x, y, args.eps, args.seed)
        cpu_ours = rows[-1]["cpu"]
        acc_ours, acc_aa = float(r_ours.float().mean()), float(r_aa.float().mean())
        only_ours = int((~r_ours & r_aa).sum())
        only_aa = int((r_ours & ~r_aa).sum())
        print("    stages of AutoAttack: " + ", ".join(f"{r['stage']} {100 * r['acc']:.2f}% at {r['time']:.1f} s"
                                                      for r in aa_rows))  # fmt: skip
        print(f"    worst case: ours {100 * acc_ours:.2f}% in {t_ours:.1f} s | AutoAttack {100 * acc_aa:.2f}% in "
              f"{t_aa:.1f} s | Δ {100 * (acc_ours - acc_aa):+.2f} points (target <= +0.2), time ratio "
              f"{t_ours / t_aa:.3f} wall, {cpu_ours / cpu_aa:.3f} CPU (target <= 0.5); images only ours breaks "
              f"{only_ours}, only AutoAttack breaks {only_aa}", flush=True)  # fmt: skip
        summary.append((name, acc_ours, acc_aa, t_ours, t_aa, (only_ours, only_aa)))
    print("\nmodel                        ours acc   AA acc   Δ points   ours s     AA s   ratio")
    for name, a, b, t1, t2, _ in summary:
        if b is None or t2 is None:
            print(f"{name:<28} {100 * a:8.2f}%        -          -  {t1:7.1f}        -       -")
            continue
        print(f"{name:<28} {100 * a:8.2f}% {100 * b:7.2f}% {100 * (a - b):+9.2f}  {t1:7.1f}  {t2:7.1f}  {t1 / t2:6.3f}")


if __name__ == "__main__":
    main()
