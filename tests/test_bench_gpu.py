"""bench/gpu.py runs end to end on the CPU with --smoke: every model, data shape and stage."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_card_peaks_and_the_resnet50_factory() -> None:
    gpu = _bench()
    assert gpu.card_peaks("NVIDIA H100 80GB HBM3") == (989.0, 67.0)
    assert gpu.card_peaks("NVIDIA H100 PCIe") == (756.0, 51.0)
    assert gpu.card_peaks("cpu") is None
    model = gpu.resnet50(num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # the ResNet-50 size
    assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 1000)


def test_smoke_run_covers_every_model_shape_and_stage(capsys: Any) -> None:
    gpu = _bench()
    assert gpu.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["vgg16"], ["resnet18"], ["resnet50"])]
    table = {(r[0], r[1], r[2]): r for r in rows if len(r) >= 4 and r[1] in ("cifar", "imagenet")}
    for model in ("vgg16", "resnet18", "resnet50"):
        for data in ("cifar", "imagenet"):
            for stage in ("clean", "pgd-2", "sigma", "features"):
                r = table[(model, data, stage)]
                assert float(r[3]) > 0 and math.isfinite(float(r[3]))  # images/s
            assert float(table[(model, data, "pgd-2")][4]) >= 0  # TFLOP/s column
    assert "accuracy 1 " in out and "robust_accuracy" in out and "total" in out
