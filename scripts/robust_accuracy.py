"""Clean, PGD-20 and FGSM accuracy of checkpoints on the full Fashion-MNIST test split, with 95%
Wilson intervals; one JSON line per checkpoint (appended to --out when given).

python scripts/robust_accuracy.py NAME_OR_PATH [NAME_OR_PATH ...] [--out FILE.jsonl] [--eps 0.1] [--n N]

PGD-20 as in the evaluation tables (METHODS §8.1): L-inf, alpha = 2.5 eps / 20, random start.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from robustdissect.attacks import make_attack
from robustdissect.data import load_dataset
from robustdissect.models import load_checkpoint
from robustdissect.stats import wilson_interval


def accuracy_row(name: str, eps: float, n: int | None = None, batch_size: int = 500) -> dict[str, object]:
    """Accuracies (percent) and intervals of one checkpoint on a seeded subset of `n` test images (all by default)."""
    model, card = load_checkpoint(name)
    model.eval()
    test = load_dataset(card.get("dataset", "fashion-mnist")).test
    test = test.subset(n)  # seeded subset; the whole split when n is None
    attacks = {
        "pgd20": make_attack("pgd-linf", eps=eps, steps=20, step_rule="madry", seed=0, batch_size=batch_size),
        "fgsm": make_attack("fgsm", eps=eps, seed=0, batch_size=batch_size),
    }
    correct = {"clean": 0, **{k: 0 for k in attacks}}
    start = time.perf_counter()
    for i in range(0, len(test), batch_size):
        x, y = test.x[i : i + batch_size], test.y[i : i + batch_size]
        with torch.no_grad():
            correct["clean"] += int((model(x).argmax(1) == y).sum())
        for key, attack in attacks.items():
            correct[key] += int(attack(model, x, y).correct.sum())
    n = len(test)
    row: dict[str, object] = {"checkpoint": name, "n": n, "eps": eps, "seconds": round(time.perf_counter() - start, 1)}
    for key, c in correct.items():
        lo, hi = wilson_interval(c, n)
        row[key] = round(100 * c / n, 2)
        row[f"{key}_ci"] = [round(100 * lo, 2), round(100 * hi, 2)]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--n", type=int, help="a seeded subset of N test images (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for name in args.checkpoints:
        line = json.dumps(accuracy_row(name, args.eps, args.n))
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
