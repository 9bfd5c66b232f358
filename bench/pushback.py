"""Benchmark: the `pushback` stage computing on a user model in the default run's profile, with
the profile's previous settings (50-step back-perturbation and so on, as `--full`) against the
current reduced ones, and where the time goes.

    python bench/pushback.py --data-dir DIR --model-arg width=16 \
        --weights vanilla/model.safetensors --compare-weights fast/model.safetensors
    python bench/pushback.py --estimate        # the full-width resnet18 of bench/run.py, by parts

The data is a CIFAR-10-format folder (bench/run.py --data cifar-like writes one; a pair trained
as there, e.g. `robustdissect train --model resnet18 --model-arg width=16 --data cifar10
--data-dir DIR --epochs 1`, the twin with `--objective fast`). Each variant is one pipeline run
(stages features and pushback, n images, the default run's profile) into a fresh run directory,
so nothing is reused from the other variant's evidence store; the features stage is not timed.
Printed: per variant the pushback stage's wall seconds (results.json), the process CPU seconds
(every thread) of its computation and of its parts (the D_bp back-perturbation, the purification
table with its BPDA attacker, the ablation predictions of the reliance shift, the rest), then the
ratios current / previous, measured in this one process (CPU seconds move less than wall seconds
on a shared machine).

`--estimate` times the parts on the zoo resnet18 at full width (random weights and images: the
cost does not depend on them; one thread, process CPU seconds), each on a few images and steps, and
scales them to bench/run.py --data cifar-like's configuration (200 dissected images, the run's model
and its counterpart, the dissection's conv1 with 64 units, 32 purified images): a stage run there
takes minutes per variant.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import robustdissect.stages.pushback as stage
from robustdissect.analysis.pushback import UnitSets, ablation_predictions, back_perturb, evaluate_purification
from robustdissect.attacks import PGD
from robustdissect.config import RunConfig
from robustdissect.models.zoo import ResNet18
from robustdissect.pipeline import run_pipeline

# the default run's pushback settings before they were reduced (the back-perturbation of --full)
PREVIOUS = {"steps": 50, "alpha": 0.01, "reliance_n": None, "purify_n": 32, "bootstrap": 200, "data_n": 200}
PARTS = ("compute_pushback", "back_perturb", "evaluate_purification", "ablation_predictions")


def _timed(parts: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, adding its process CPU seconds (every thread) to parts[name]."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[name] = parts.get(name, 0.0) + time.process_time() - t0

    return wrapper


def run_variant(args: argparse.Namespace, options: dict[str, Any]) -> tuple[float, dict[str, float], dict[str, Any]]:
    """(pushback stage wall seconds, CPU seconds per part, the stage's settings) of one pipeline run."""
    model_args = dict(kv.split("=", 1) for kv in args.model_arg)
    model_args = {k: int(v) if v.isdigit() else v for k, v in model_args.items()}
    cfg = RunConfig(
        model=args.model, weights=args.weights, model_args=model_args, dataset="cifar10", data_dir=args.data_dir,
        compare=[{"model": args.model, "name": "robust", "weights": args.compare_weights}], n=args.n,
        quick=True, stages={"features": {}, "pushback": {"compute": True, **options}},
    )  # fmt: skip
    parts: dict[str, float] = {}
    originals = {name: getattr(stage, name) for name in PARTS}
    for name, fn in originals.items():
        setattr(stage, name, _timed(parts, name, fn))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = run_pipeline(cfg, Path(tmp) / "run")
            res = json.loads((out / "results.json").read_text())
    finally:
        for name, fn in originals.items():
            setattr(stage, name, fn)
    entry = res["stages"]["pushback"]
    if "pushback" not in entry:
        raise SystemExit(f"the pushback stage did not compute: {entry.get('warnings')}")
    settings = {**entry["pushback"]["settings"], "reliance images": entry["pushback"]["reliance"][0]["n"]}
    return float(entry["seconds"]), parts, settings


def _cpu(fn: Callable[[], Any]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def estimate() -> None:
    """Per-image costs of the parts on the full-width resnet18, scaled to bench/run.py's run."""
    torch.set_num_threads(1)
    model = ResNet18(width=64).eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(200, 3, 32, 32, generator=gen), torch.randint(0, 10, (200,), generator=gen)
    units = 64  # the dissection's layers on the zoo resnet18: conv1
    sets = UnitSets(["conv1"], [units], torch.arange(0, 8), torch.arange(8, 16), torch.zeros(units),
                    torch.ones(units), torch.zeros(8))  # fmt: skip
    bp = _cpu(lambda: back_perturb(model, x[:50], sets, steps=4, alpha=0.025)) / (50 * 4)
    # ablation: one forward per unit (+1) and image, in batches of the reliance images
    abl = {n: _cpu(lambda n=n: ablation_predictions(model, x[:n], ["conv1"], [6])) / (n * 7) for n in (100, 200)}
    adaptive = PGD(0.1, steps=5, step_rule="madry", random_start=True, seed=0)
    pur = _cpu(lambda: evaluate_purification(model, x[:32], y[:32], x[:32], adaptive, sets, eps=0.1, steps=2,
                                             alpha=0.05)) / (32 * 2)  # fmt: skip
    print(f"CPU per image: back-perturbation step {bp * 1e3:.1f} ms; ablation forward {abl[200] * 1e3:.1f} ms "
          f"(batches of 200), {abl[100] * 1e3:.1f} ms (100); purification table per back-perturbation step "
          f"{pur * 1e3:.1f} ms")  # fmt: skip
    totals = {}
    for name, steps, n_rel in (("previous", PREVIOUS["steps"], 200), ("current", stage.QUICK_PUSHBACK["steps"],
                                                                       stage.QUICK_PUSHBACK["reliance_n"])):
        parts = {"D_bp": 200 * steps * bp, "purification": 32 * steps * pur,
                 "ablation": 2 * n_rel * (units + 1) * abl[n_rel]}  # fmt: skip
        totals[name] = sum(parts.values())
        print(f"{name:<9} {', '.join(f'{k} {v:.0f} s' for k, v in parts.items())}; total {totals[name]:.0f} s")
    print(f"current / previous (estimated): {totals['current'] / totals['previous']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--estimate", action="store_true", help="time the parts on the full-width resnet18")
    ap.add_argument("--data-dir")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--model-arg", action="append", default=[])
    ap.add_argument("--weights")
    ap.add_argument("--compare-weights")
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    if args.estimate:
        estimate()
        return
    if not (args.data_dir and args.weights and args.compare_weights):
        ap.error("--data-dir, --weights and --compare-weights are needed (or --estimate)")
    rows = {"previous": run_variant(args, PREVIOUS), "current": run_variant(args, {})}
    keys = ("steps", "alpha", "feature_n", "purify_n", "adaptive_steps", "reliance images")
    cpu: dict[str, float] = {}
    for name, (seconds, parts, settings) in rows.items():
        cpu[name] = parts.pop("compute_pushback")
        split = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
        rest = cpu[name] - sum(parts.values())
        print(f"{name:<9} wall {seconds:7.1f} s; CPU {cpu[name]:7.1f} s ({split}, rest {rest:.1f})")
        print(f"{'':<9} {({k: settings[k] for k in keys if k in settings})}")
    wall = rows["current"][0] / rows["previous"][0]
    print(f"current / previous: wall {wall:.2f}, CPU {cpu['current'] / cpu['previous']:.2f}")


if __name__ == "__main__":
    main()
