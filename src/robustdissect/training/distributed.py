"""Data-parallel training under `torchrun` (one process per device).

`train` detects a launch by `torchrun --nproc_per_node N` from the environment (RANK, WORLD_SIZE,
LOCAL_RANK) and then:

- initialises the default process group (backend nccl on CUDA, gloo otherwise) unless the caller
  already did, and tears it down again at the end if it created it;
- starts every rank from rank 0's initial weights (broadcast);
- splits every global batch of the epoch's seeded permutation into `world` contiguous, disjoint
  shards (sizes differ by at most one image), so the global batch equals the single-process batch;
  augmentation is drawn for the whole global batch before sharding, so it is the same as well;
- after each backward, replaces every rank's gradient by the global-batch gradient
  Σ_r (n_r / N)·g_r with one all-reduce of the flattened gradients; for losses that average over
  the batch this is exactly the single-process gradient (up to summation order) as long as the
  model has no BatchNorm in train mode (each rank normalises with its own shard's statistics);
- averages the BatchNorm running statistics over the ranks after each step, so the running means
  equal the global-batch ones and all ranks evaluate (and attack) with the same statistics;
- writes state.pt, the model and its card on rank 0 only; every rank resumes from state.pt.

This is what DistributedDataParallel does, written out: the objectives run inner attacks
(input-gradient backward passes in eval mode) and forward hooks on the bare model, which a
DistributedDataParallel wrapper does not tolerate (its reducer expects every backward to produce
parameter gradients, and the wrapper renames every module).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..parallel import DistInfo, barrier, dist_env, setup, shard, teardown

__all__ = [
    "DistInfo", "average_batchnorm_stats", "average_gradients", "barrier", "dist_env", "setup", "shard",
    "sum_scalars", "teardown",
]


def broadcast_state(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def average_gradients(model: nn.Module, local_n: int, global_n: int) -> None:
    """Replace each trainable parameter's gradient g_r by Σ_r (n_r / N)·g_r, with one all-reduce.

    Parameters without a gradient on this rank (empty shard, unused branch) contribute zeros."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).mul_(float(local_n))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(float(max(global_n, 1)))
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def average_batchnorm_stats(model: nn.Module) -> None:
    """Average the float running statistics of every BatchNorm layer over the ranks (one
    all-reduce); a no-op for models without BatchNorm."""
    bufs = [
        b
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in (m.running_mean, m.running_var)
        if isinstance(b, torch.Tensor) and b.is_floating_point()
    ]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(float(dist.get_world_size()))
    offset = 0
    with torch.no_grad():
        for b in bufs:
            n = b.numel()
            b.copy_(flat[offset : offset + n].view_as(b))
            offset += n


def sum_scalars(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a list of numbers over the ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def broadcast_scalars(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's numbers on every rank."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return [float(v) for v in t.tolist()]
