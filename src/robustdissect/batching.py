"""Batch size by memory: `batch_size: auto` finds the largest batch that fits for a stage's
heaviest call (an input-gradient forward and backward, the attack step) by halving on
out-of-memory, once per model and input shape in a run (kept in the run's batch_sizes.json).

Forward passes, gradients, σ and feature statistics are per image or sums over images, so they
do not depend on the batch size beyond float tolerance; so are FGSM, PGD and APGD-CE, whose
random starts draw one stream in image order. Square and APGD-DLR draw their random search per
chunk, so their adversarial examples (not, in the tested runs, the accuracies) change with the
batch size; `tests/test_batching.py` checks both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .runs import read_json, write_json

log = logging.getLogger(__name__)

AUTO = "auto"
CPU_DEFAULT = 250  # the run-level batch on a CPU under auto (the stages keep their own defaults)
MAX_AUTO_BATCH = 4096
CACHE_FILE = "batch_sizes.json"


def check_batch_size(value: Any, where: str = "batch_size") -> int | str:
    """A positive integer or 'auto' (a digit string from the command line becomes an int)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if value == AUTO:
        return AUTO
    raise UserError(f"{where} must be a positive integer or auto, got {value!r}")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an accelerator (or host) allocation failure."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _release() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(step: Callable[[int], object], upper: int, lower: int = 1) -> int:
    """The largest of upper, upper/2, upper/4, ... (at least `lower`) for which `step(batch)`
    runs without running out of memory; any other error propagates. UserError when even
    `lower` does not fit."""
    if upper < lower:
        raise ValueError(f"upper {upper} < lower {lower}")
    size = upper
    while True:
        try:
            step(size)
            return size
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_out_of_memory(e):
                raise
            log.debug("batch %d runs out of memory", size)
        _release()  # outside the except block: the traceback no longer pins the failed step's tensors
        if size <= lower:
            raise UserError(f"a batch of {lower} image(s) does not fit in memory; use a smaller model or images")
        size = max(lower, size // 2)


def gradient_step(model: nn.Module, shape: tuple[int, ...], device: torch.device) -> Callable[[int], None]:
    """step(b): the model's forward and backward with respect to b input images of `shape`
    (C, H, W) on `device`, the memory profile of one attack step."""

    def step(b: int) -> None:
        was_training = model.training
        model.eval()
        try:
            x = torch.rand((b, *shape), device=device, requires_grad=True)
            logits = model(x)
            target = torch.zeros(b, dtype=torch.long, device=device)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, target), x)
            del x, logits, grad
        finally:
            model.train(was_training)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


class BatchSizes:
    """Searched batch sizes of one run, by model hash and input shape, kept in `path` (JSON)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.sizes: dict[str, int] = {}
        if path is not None and path.is_file():
            data = read_json(path)
            if isinstance(data, dict):
                self.sizes = {str(k): int(v) for k, v in data.items() if isinstance(v, int) and v > 0}

    def get(self, key: str, search: Callable[[], int]) -> int:
        if key not in self.sizes:
            self.sizes[key] = search()
            if self.path is not None:
                write_json(self.path, self.sizes)
        return self.sizes[key]


_RUN_CACHES: dict[str, BatchSizes] = {}


class RunContext(Protocol):
    """What the batch size of a run needs from a stage's `Context`."""

    @property
    def model(self) -> nn.Module: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def config(self) -> Any: ...
    @property
    def run(self) -> Any: ...
    @property
    def data(self) -> Any: ...
    @property
    def store(self) -> Any: ...
    @property
    def split(self) -> Any: ...


def resolve_batch_size(
    setting: int | str, default: int, model: nn.Module, shape: tuple[int, ...], device: torch.device,
    model_key: str, cache: BatchSizes | None = None, upper: int = MAX_AUTO_BATCH,
) -> int:
    """The batch size to use: `setting` when a number; under auto on CUDA the largest batch of
    the attack step that fits (searched once per model and shape, `cache`); else `default`."""
    if setting != AUTO:
        return int(setting)
    if device.type != "cuda":
        return default
    key = f"{model_key}:{'x'.join(str(s) for s in shape)}"

    def search() -> int:
        size = largest_batch(gradient_step(model, shape, device), upper)
        log.info("batch size auto: %d images fit one attack step of the model on %s", size, device)
        return size

    return (cache or BatchSizes(None)).get(key, search)


def run_batch_size(ctx: RunContext, default: int = CPU_DEFAULT, model: nn.Module | None = None) -> int:
    """The run's batch size for `model` (default the run's model) on its analysed images."""
    m = model if model is not None else ctx.model
    path = ctx.run.path / CACHE_FILE
    cache = _RUN_CACHES.setdefault(str(path), BatchSizes(path))
    shape = tuple(int(s) for s in ctx.data.image_shape)
    upper = max(1, min(MAX_AUTO_BATCH, 1 << max(0, len(ctx.split) - 1).bit_length()))
    return resolve_batch_size(ctx.config.batch_size, default, m, shape, ctx.device, ctx.store.model_hash(m),
                              cache, upper)  # fmt: skip


def with_batch_size(fn: object, ctx: RunContext, options: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's options with the run's batch size where the stage has a `batch_size` option
    its block does not set: the run's number, or under auto the searched size on CUDA (on the
    CPU the stage keeps its own default)."""
    out = dict(options)
    cls = getattr(fn, "options_class", None)
    if cls is None or "batch_size" in out or "batch_size" not in {f.name for f in fields(cls)}:
        return out
    setting = ctx.config.batch_size
    if setting == AUTO and ctx.device.type != "cuda":
        return out
    out["batch_size"] = run_batch_size(ctx)
    return out
