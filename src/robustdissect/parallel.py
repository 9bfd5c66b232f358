"""Processes under `torchrun`: who am I, which images are mine, and how shards come back together.

`train` and every analysing command detect a launch by `torchrun --nproc_per_node N` (also
multi-node: `--nnodes`, `--rdzv-endpoint`) from the environment (RANK, WORLD_SIZE, LOCAL_RANK),
initialise the default process group (nccl on CUDA, gloo otherwise) and split their work into
contiguous, disjoint shards (`shard`). An analysing command splits the images of each
adversarial-example or prediction request across the ranks (`gather_shards` puts the per-image
results back together in image order on every rank), so every rank holds the same evidence and
runs the same stages; rank 0 alone writes the run directory, logs and shows progress.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistInfo",
    "all_ranks_agree",
    "barrier",
    "broadcast_object",
    "dist_env",
    "gather_shards",
    "is_main_process",
    "merged",
    "setup",
    "shard",
    "sharded",
    "teardown",
    "world",
]


@dataclass(frozen=True)
class DistInfo:
    """rank / world size / local rank of this process; `created` when this process made the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistInfo:
    """The launch described by the environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(info: DistInfo, device: torch.device) -> DistInfo:
    """Initialise the default process group for `info` unless one exists; returns `info` with
    `created` set when this call created it."""
    if not info.active or dist.is_initialized():
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world)
    return DistInfo(info.rank, info.world, info.local_rank, created=True)


def teardown(info: DistInfo) -> None:
    if info.created and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, rank: int, world: int) -> slice:
    """The contiguous part of a global batch of `n` items that `rank` of `world` takes."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and when no process group exists)."""
    return world()[0] == 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (itself when there is one process)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_agree(flag: bool) -> bool:
    """True when `flag` is true on every rank (a logical AND over the ranks)."""
    if world()[1] == 1:
        return flag
    box: list[Any] = [None] * world()[1]
    dist.all_gather_object(box, bool(flag))
    return all(box)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] with one process)."""
    if world()[1] == 1:
        return [obj]
    box: list[Any] = [None] * world()[1]
    dist.all_gather_object(box, obj)
    return box


class _Mergeable(Protocol):
    def merge(self, other: Any) -> Any: ...


M = TypeVar("M", bound=_Mergeable)


def merged(reducer: M) -> M:
    """`reducer` (a streaming statistic with `merge`, e.g. `probe.RunningTopK`) combined over
    every rank's share, in rank order, on every rank; itself with one process."""
    shares = gather_objects(reducer)
    out = shares[0]
    for other in shares[1:]:
        out = out.merge(other)
    return out


def gather_shards(local: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """Every rank's per-image tensors (n_r, ...), concatenated in rank order along dim 0, on
    every rank (on the CPU); None from a rank with no images. Shapes beyond dim 0 and dtypes
    must agree across ranks."""
    mine = None if local is None else {k: v.detach().cpu() for k, v in local.items()}
    if world()[1] == 1:
        return mine or {}
    box: list[Any] = [None] * world()[1]
    dist.all_gather_object(box, mine)
    parts = [part for part in box if part is not None]
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]} if parts else {}


def sharded(n: int, compute: Callable[[slice], Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """`compute(part)` for this rank's contiguous part of n images, gathered back into (n, ...)
    tensors in image order on every rank: the single-process result when `compute` treats each
    image independently of the others."""
    rank, size = world()
    if size == 1:
        return gather_shards(compute(slice(0, n)))
    part = shard(n, rank, size)
    return gather_shards(compute(part) if part.stop > part.start else None)
