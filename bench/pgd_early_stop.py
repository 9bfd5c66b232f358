"""Robust-accuracy evaluation with PGD early stop against a peer PGD at equal settings.

On the shipped Fashion-MNIST SmallCNNs (vanilla and PAT), 1000 test images, L-inf PGD-20 at eps
0.1, alpha = 2.5 * eps / 20, uniform random start, batch 500:

- ours:    PGD(eps, steps=20, step_rule="madry", early_stop=True, batch_size=500)(model, x, y)
- peer:    torchattacks.PGD(model, eps, alpha, steps=20, random_start=True) per batch, then one
           forward for the predictions on x_adv (ours returns them)
- ours, no early stop: the same PGD with early_stop=False, for reference

The three are interleaved in rounds (the order rotates each round) so that all see the same
machine load; the table gives median wall times, ours/peer ratio and robust accuracies.
Targets: ratio <= 0.5 on vanilla, <= 0.9 on PAT, robust accuracy within 0.5 points of the peer.

Usage: python bench/pgd_early_stop.py [--repeats 3] [--threads N] [--device cuda]
Peer:  pip install -c constraints.txt --no-deps torchattacks  (it imports without torchvision)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustdissect.attacks import PGD
from robustdissect.data import load_dataset
from robustdissect.models import load_checkpoint

MODELS = ("fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat")
TARGET_RATIO = {"fmnist-smallcnn-vanilla": 0.5, "fmnist-smallcnn-pat": 0.9}
TARGET_POINTS = 0.5

Runner = Callable[[], float]  # runs one evaluation, returns the robust accuracy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, batch: int, early_stop: bool) -> Runner:
    """Robust accuracy from our PGD (predictions on x_adv come with the result)."""
    attack = PGD(eps, steps=steps, step_rule="madry", early_stop=early_stop, batch_size=batch)
    return lambda: attack(model, x, y).robust_accuracy


def peer(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, batch: int) -> Runner:
    """Robust accuracy from torchattacks' PGD, batch by batch, plus the forward for predictions."""
    import torchattacks

    attack = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)

    def run() -> float:
        torch.manual_seed(0)  # its random start draws from the global generator
        correct = 0
        for s in range(0, x.shape[0], batch):
            xb, yb = x[s : s + batch], y[s : s + batch]
            adv = attack(xb, yb)
            with torch.no_grad():
                correct += int((model(adv).argmax(1) == yb).sum())
        return correct / x.shape[0]

    return run


def bench_model(name: str, x: Tensor, y: Tensor, device: torch.device, args: argparse.Namespace) -> tuple[str, ...]:
    model, _ = load_checkpoint(name)
    model = model.to(device).eval()
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    runners: dict[str, Runner] = {
        "ours": ours(model, x, y, args.eps, args.steps, args.batch, early_stop=True),
        "peer": peer(model, x, y, args.eps, args.steps, args.batch),
        "ours-full": ours(model, x, y, args.eps, args.steps, args.batch, early_stop=False),
    }
    acc = {k: fn() for k, fn in runners.items()}  # warm-up on the real data
    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(args.repeats):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            _sync(device)
            t0 = time.perf_counter()
            a = runners[k]()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
            if a != acc[k]:
                raise RuntimeError(f"{k} on {name}: robust accuracy changed between runs ({acc[k]} vs {a})")
    t = {k: statistics.median(v) for k, v in times.items()}
    ratio, diff = t["ours"] / t["peer"], round(100 * (acc["ours"] - acc["peer"]), 6) + 0.0  # no "-0.0"
    ok = ratio <= TARGET_RATIO[name] and abs(diff) <= TARGET_POINTS
    return (
        name,
        f"{100 * clean:.1f}",
        f"{t['ours']:.2f}",
        f"{t['peer']:.2f}",
        f"{ratio:.2f}",
        f"{100 * acc['ours']:.1f}",
        f"{100 * acc['peer']:.1f}",
        f"{diff:+.1f}",
        f"{t['ours-full']:.2f}",
        f"{100 * acc['ours-full']:.1f}",
        f"<= {TARGET_RATIO[name]} {'met' if ok else 'MISSED'}",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--n", type=int, default=1000, help="test images (a seeded subset)")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; times are medians")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    split = load_dataset("fashion-mnist").test.subset(args.n, seed=0)
    x, y = split.x.to(device), split.y.to(device)
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; {args.n} test images, "
        f"L-inf PGD-{args.steps}, eps {args.eps}, alpha 2.5*eps/{args.steps}, random start, batch {args.batch}, "
        f"median of {args.repeats} interleaved rounds"
    )
    head = (
        "model",
        "clean %",
        "ours s",
        "peer s",
        "ratio",
        "rob ours %",
        "rob peer %",
        "diff pts",
        "ours no-ES s",
        "rob no-ES %",
        "target",
    )
    rows = [head] + [bench_model(name, x, y, device, args) for name in args.models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    print("peer: torchattacks PGD + one forward per batch for the predictions; no-ES: ours with early_stop=False")


if __name__ == "__main__":
    main()
