"""Batch size by memory: the halving search on out-of-memory, its per-run cache, the option's
validation, and results that do not depend on the batch size."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robustdissect.batching import (
    AUTO,
    BatchSizes,
    check_batch_size,
    gradient_step,
    is_out_of_memory,
    largest_batch,
    resolve_batch_size,
)
from robustdissect.config import RunConfig
from robustdissect.errors import UserError


class MemoryBound(nn.Module):
    """A tiny classifier that runs out of memory above `limit` images per forward."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.calls: list[int] = []
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} images")
        return self.fc(x.flatten(1)[:, :4])


def test_halving_search_finds_the_largest_batch_that_fits() -> None:
    model = MemoryBound(limit=100)
    step = gradient_step(model, (1, 2, 2), torch.device("cpu"))
    assert largest_batch(step, 4096) == 64
    assert model.calls == [4096, 2048, 1024, 512, 256, 128, 64]
    assert largest_batch(step, 100) == 100 and largest_batch(step, 300) == 75
    assert largest_batch(gradient_step(MemoryBound(limit=1), (1, 2, 2), torch.device("cpu")), 1000) == 1
    with pytest.raises(UserError, match="does not fit"):
        largest_batch(gradient_step(MemoryBound(limit=0), (1, 2, 2), torch.device("cpu")), 8)


def test_only_out_of_memory_is_retried() -> None:
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    calls: list[int] = []

    def broken(b: int) -> None:
        calls.append(b)
        raise RuntimeError("shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        largest_batch(broken, 64)
    assert calls == [64]

    def host_oom(b: int) -> None:
        if b > 10:
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate; out of memory")

    assert largest_batch(host_oom, 40) == 10


def test_auto_is_searched_once_per_model_and_shape_and_kept_in_the_run(tmp_path: Path) -> None:
    searches: list[int] = []
    cache = BatchSizes(tmp_path / "batch_sizes.json")

    def search() -> int:
        searches.append(1)
        return 48

    assert cache.get("abc:3x32x32", search) == 48 and cache.get("abc:3x32x32", search) == 48
    assert len(searches) == 1
    assert BatchSizes(tmp_path / "batch_sizes.json").sizes == {"abc:3x32x32": 48}  # a resumed run reuses it
    cpu = torch.device("cpu")
    model = MemoryBound(limit=5)
    # a number is used as given; auto on a CPU is the stage's default (no search)
    assert resolve_batch_size(7, 250, model, (1, 2, 2), cpu, "m") == 7
    assert resolve_batch_size(AUTO, 250, model, (1, 2, 2), cpu, "m") == 250 and model.calls == []


def test_batch_size_option_values() -> None:
    assert check_batch_size("auto") == AUTO and check_batch_size("64") == 64 and check_batch_size(3) == 3
    for bad in ("0", "-3", "big", 0, True, 2.5):
        with pytest.raises(UserError, match="positive integer or auto"):
            check_batch_size(bad)
    assert RunConfig().batch_size == AUTO and RunConfig(batch_size=32).batch_size == 32
    with pytest.raises(UserError, match="batch_size"):
        RunConfig(batch_size="huge")


def _table(run: Path, name: str) -> list[dict[str, Any]]:
    with (run / "tables" / f"{name}.csv").open() as f:
        return list(csv.DictReader(f))


def test_evaluate_does_not_depend_on_the_batch_size(tmp_path: Path, cli: Any, fmnist: Any) -> None:
    """The same run with --batch-size 7 and 250: identical accuracies and adversarial examples."""
    runs = []
    for b in (7, 250):
        out = tmp_path / f"b{b}"
        code, _out, err = cli(["evaluate", "--n", "40", "--attacks", "fgsm,pgd-linf", "--steps", "5",
                               "--eps", "0.02", "--curves", "none", "--corruptions", "none", "--compare", "none",
                               "--batch-size", str(b), "--out", str(out)])  # fmt: skip
        assert code == 0, err
        runs.append(out)
    a, b = (_table(r, "robust_accuracy") for r in runs)
    assert a == b
    accuracies = [float(r["accuracy"]) for r in a]
    assert accuracies[0] > 0.5 and 0 < accuracies[2] < accuracies[0]  # a trained model, a real attack
    from robustdissect.store import list_evidence, load_evidence

    def adversarial(run: Path) -> dict[str, torch.Tensor]:
        items = [e for e in list_evidence(run) if e["kind"] == "adv"]
        return {e["parts"]["name"]: load_evidence(run, "adv", e["key"])[0]["x_adv"] for e in items}

    adv7, adv250 = adversarial(runs[0]), adversarial(runs[1])
    assert sorted(adv7) == sorted(adv250) == ["apgd-ce", "apgd-dlr", "fgsm", "pgd-linf", "square-linf"]
    for name in adv7:
        assert adv7[name].shape[1:] == (1, 28, 28) and adv7[name].shape == adv250[name].shape
    # every image draws from its own random stream: the same examples whatever the batch
    for name in adv7:
        assert torch.allclose(adv7[name], adv250[name], atol=1e-5), name
