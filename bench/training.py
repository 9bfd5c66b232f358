"""Cost of the robust training objectives against plain training, on the same model and data.

Prints, per objective, the seconds per training epoch on a fixed subset, and the ratios:

- PGD-k AT epoch / ((k + 1) x vanilla epoch)     target <= 1.15
- SNS epoch / PAT epoch (same k)                 target <= 1.10 (SNS freezes conv1-conv3, which
  saves their weight gradients; `sns_all_trainable` trains every layer and isolates the cost of
  the L_sns term itself)
- fast AT epoch / PAT epoch                      (information)

The objectives step in round robin, batch by batch, so that each sees the same machine load; an
epoch's time is the median step time times the number of batches, which damps the noise of a
shared machine. SNS's one-off neuron selection is not part of its epoch time.

Usage: python bench/training.py [--n 2048] [--width 16] [--steps 10] [--repeats 2] [--threads 1]
       [--device cpu|cuda] [--channels-last] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from robustdissect.data import Split, load_dataset
from robustdissect.models import build_model, load_checkpoint
from robustdissect.training import OBJECTIVES


class _Runner:
    """One objective with its own model and optimiser, stepping through the shared batches."""

    def __init__(
        self, name: str, args: dict[str, Any], data: Split, width: int, device: torch.device, channels_last: bool
    ) -> None:
        torch.manual_seed(0)
        model = build_model("smallcnn", width=width)
        if width == 16:
            model.load_state_dict(load_checkpoint("fmnist-smallcnn-vanilla")[0].state_dict())
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = model
        self.obj = OBJECTIVES.get(name)(**args)
        if hasattr(self.obj, "setup"):
            self.obj.setup(model, data, device)  # one-off selection: not timed
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        model.train()
        self.obj.on_epoch_start(model, 0)

    def step(self, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> float:
        """Seconds of one training step on the batch x (B, C, H, W), y (B,)."""
        device = x.device
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.obj(self.model, x, y)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    data = load_dataset("fashion-mnist").train.subset(a.n, seed=0)
    k = a.steps
    runs: dict[str, tuple[str, dict[str, Any]]] = {
        "vanilla": ("vanilla", {}),
        "pat": ("pat", {"eps": 0.1, "steps": k}),
        "sns": ("sns", {"eps": 0.1, "steps": k, "layers": ["conv4", "conv5", "conv6"], "select_n": 256}),
        "sns_all_trainable": (
            "sns",
            {"eps": 0.1, "steps": k, "layers": ["conv4", "conv5", "conv6"], "select_n": 256, "freeze": False},
        ),
        "fast": ("fast", {"eps": 0.1}),
    }
    if a.width != 16:
        for key in ("sns", "sns_all_trainable"):
            runs[key][1]["reference"] = "initial"
    runners = {
        label: _Runner(name, args, data, a.width, device, a.channels_last) for label, (name, args) in runs.items()
    }
    g = torch.Generator().manual_seed(0)
    batches = [(x.to(device), y.to(device)) for x, y in data.batches(a.batch_size, shuffle=True, generator=g)]
    if a.channels_last:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    for r in runners.values():  # warm-up
        r.step(*batches[0], a.bf16)
    times: dict[str, list[float]] = {label: [] for label in runners}
    for rep in range(a.repeats):
        for x, y in batches:
            for label, r in runners.items():  # round robin: every objective sees the same load
                times[label].append(r.step(x, y, a.bf16))
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {sum(v) / (rep + 1):.2f}s" for k, v in times.items()), flush=True)
    best = {label: statistics.median(v) * len(batches) for label, v in times.items()}
    pat_ratio = best["pat"] / ((k + 1) * best["vanilla"])
    sns_ratio = best["sns"] / best["pat"]
    sns_unfrozen_ratio = best["sns_all_trainable"] / best["pat"]
    fast_ratio = best["fast"] / best["pat"]
    result = {
        "n": a.n,
        "width": a.width,
        "steps": k,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "seconds_per_epoch": {key: round(v, 3) for key, v in best.items()},
        "pat_over_(k+1)_vanilla": round(pat_ratio, 3),
        "sns_over_pat": round(sns_ratio, 3),
        "sns_all_trainable_over_pat": round(sns_unfrozen_ratio, 3),
        "fast_over_pat": round(fast_ratio, 3),
    }
    print(json.dumps(result, indent=2))
    print(
        f"PGD-{k} AT / ((k+1) x vanilla) = {pat_ratio:.3f}  (target <= 1.15: {'ok' if pat_ratio <= 1.15 else 'MISS'})"
    )
    print(f"SNS / PAT                   = {sns_ratio:.3f}  (target <= 1.10: {'ok' if sns_ratio <= 1.10 else 'MISS'})")
    print(f"SNS, nothing frozen / PAT   = {sns_unfrozen_ratio:.3f}  (the cost of L_sns alone)")
    print(f"fast / PAT                  = {fast_ratio:.3f}")


if __name__ == "__main__":
    main()
