"""Benchmark: decoder training (METHODS §1.2) against the classifier's own training throughput and
against its bound, and the `diagnose` stage's time at its reduced profile.

    python bench/diagnose.py                 # decoders for pool1 and pool3, 512 images, 3 rounds
    python bench/diagnose.py --stage         # also the diagnose stage (reduced profile) end to end
    python bench/diagnose.py --stage-full    # and the stage with its full defaults (decoders G_l)

Throughput (images/s from process CPU seconds, one intra-op thread, median over rounds; every
round runs every variant once so the drifts of a shared machine's load cancel in the ratios):

- classifier: one SGD epoch of the smallcnn (forward + backward of the whole model);
- bound: the least a decoder step can cost, the frozen prefix forward f_1..f_l (no grad) plus the
  decoder's forward and backward (λ_feat = λ_cls = 0 in `train_decoder`);
- decoder: `train_decoder` with the default losses (pixel + latent consistency + classification
  consistency), which adds a prefix and a full-model forward/backward through G_l's output.

Stage: wall and CPU seconds of `robustdissect run` with the stages overview + diagnose under the
default run's reduced profile (`quick`), on the shipped fmnist-smallcnn-vanilla; `--stage-full`
also times the stage with its own defaults (decoders trained for every layer), as
`robustdissect diagnose` runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from robustdissect.analysis.diagnose import DecoderSettings, train_decoder
from robustdissect.models import load_checkpoint


def cpu_time(fn: Callable[[], object]) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def classifier_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for s in range(0, len(x), batch):
        loss = F.cross_entropy(model(x[s : s + batch]), y[s : s + batch])
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
    model.eval()


def time_stage(quick: bool) -> float:
    """Seconds of the diagnose stage in a fresh run (its PGD computed, not read from a store)."""
    from robustdissect.config import RunConfig
    from robustdissect.pipeline import run_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(model="fmnist-smallcnn-vanilla", quick=quick, stages={"overview": {}, "diagnose": {}})
        t0, c0 = time.perf_counter(), time.process_time()
        run = run_pipeline(cfg, Path(tmp) / "run")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stage = float(json.loads((run / "results.json").read_text())["stages"]["diagnose"]["seconds"])
    profile = "reduced profile (default run)" if quick else "full defaults (decoders)"
    print(f"diagnose stage, {profile}: {stage:.1f} s (stage wall); run total {wall:.1f} s wall, {cpu:.1f} s CPU")
    return stage


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch", type=int, default=DecoderSettings().batch_size)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layers", default="pool1,pool3")
    p.add_argument("--stage", action="store_true")
    p.add_argument("--stage-full", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = load_checkpoint("fmnist-smallcnn-vanilla")
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (a.n,), generator=g)
    layers = a.layers.split(",")
    results: dict[str, list[float]] = {"classifier": []}
    for layer in layers:
        results[f"bound {layer}"] = []
        results[f"decoder {layer}"] = []
    for _ in range(a.rounds):
        clf, _ = load_checkpoint("fmnist-smallcnn-vanilla")
        results["classifier"].append(a.n / cpu_time(lambda: classifier_epoch(clf, x, y, a.batch)))  # noqa: B023
        for layer in layers:
            bound = DecoderSettings(epochs=1, batch_size=a.batch, lambda_feat=0.0, lambda_cls=0.0)
            full = DecoderSettings(epochs=1, batch_size=a.batch)
            results[f"bound {layer}"].append(a.n / cpu_time(lambda: train_decoder(model, layer, x, bound)))  # noqa: B023
            results[f"decoder {layer}"].append(a.n / cpu_time(lambda: train_decoder(model, layer, x, full)))  # noqa: B023
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"images/s (CPU seconds, {a.threads} thread(s), median of {a.rounds} rounds, {a.n} images, batch {a.batch})")
    print(f"  classifier training          {med['classifier']:9.1f}")
    for layer in layers:
        b, d = med[f"bound {layer}"], med[f"decoder {layer}"]
        print(f"  {layer:6s} bound (prefix + G)    {b:9.1f}   decoder (all losses) {d:9.1f}   "
              f"decoder/bound {d / b:5.2f}   decoder/classifier {d / med['classifier']:5.2f}")  # fmt: skip
    out: dict[str, object] = {"images_per_s": med}
    for profile, wanted in (("reduced", a.stage or a.stage_full), ("full", a.stage_full)):
        if wanted:
            out[f"stage_seconds_{profile}"] = time_stage(quick=profile == "reduced")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
