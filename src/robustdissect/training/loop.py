"""One training loop for every objective: seeded, resumable per epoch, with a progress bar.

Resume contract: the data order and augmentation of epoch e depend only on (seed, e), and the
checkpoint holds model, optimiser and scheduler state, so a run resumed after a kill ends with the
same weights as an uninterrupted one.

Under `torchrun --nproc_per_node N` the same call trains data-parallel (see `training.distributed`):
each rank takes a disjoint shard of every global batch, gradients are averaged over the global
batch, and rank 0 alone writes state.pt, the model and its card.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import Dataset, augment, load_dataset
from ..errors import UserError
from ..models import build_model, load_checkpoint, save_checkpoint
from ..runs import atomic_write_bytes, atomic_write_text
from . import distributed as ddp
from .objectives import OBJECTIVES, Objective

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "smallcnn"
    model_args: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    n: int | None = None  # training subset size (None = whole train split)
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    augment: str = "auto"  # auto (crop-flip for 32x32 RGB, none otherwise) | none | crop-flip
    objective: str = "vanilla"
    objective_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    init: str | None = None  # start from this checkpoint (shipped name or .safetensors path): fine-tuning
    channels_last: bool = False  # NHWC memory format for model and batches
    amp: str | None = None  # "bf16": bfloat16 autocast for the training forward (inner attacks stay fp32)
    compile: bool | str = False  # torch.compile the model used for the steps; a string names the backend


@dataclass
class TrainResult:
    model: nn.Module
    card: dict[str, Any]
    history: list[dict[str, float]]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_model_for(cfg: TrainConfig, data: Dataset) -> nn.Module:
    mean, std = data.channel_stats()
    args = {"num_classes": data.num_classes, "in_channels": data.image_shape[0], "mean": mean, "std": std}
    args.update(cfg.model_args)
    return build_model(cfg.model, **args)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` in eval mode on (x, y); restores the training flag."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i : i + batch_size].to(device)).argmax(1).cpu() == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(y))


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, [int(steps * 0.5), int(steps * 0.75)], 0.1)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    raise UserError(f"unknown schedule '{cfg.schedule}'; use cosine, step or constant")


def train(
    cfg: TrainConfig,
    out: Path,
    resume: bool = False,
    progress: bool = False,
    objective: Objective | None = None,
    data: Dataset | None = None,
) -> TrainResult:
    """Train per `cfg`, writing `out/state.pt` each epoch and `out/model.safetensors` + card.

    Launched by torchrun (WORLD_SIZE > 1 in the environment), every rank calls this with the same
    arguments; `cfg.batch_size` is the global batch, split over the ranks."""
    out = Path(out)
    state_path = out / "state.pt"
    if cfg.amp not in (None, "bf16"):
        raise UserError(f"amp must be 'bf16' or null, got {cfg.amp!r}")
    if cfg.compile:
        _compile_backend(cfg.compile)  # an unknown backend fails before anything is written
    if out.exists() and any(out.iterdir()) and not resume:
        raise UserError(f"{out} is not empty; pass --resume to continue the run there, or choose another --out")
    if resume and not state_path.is_file():
        raise UserError(f"nothing to resume in {out} (no state.pt)")
    out.mkdir(parents=True, exist_ok=True)
    data = data or load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    train_split = data.train.subset(cfg.n, seed=cfg.seed)
    device = pick_device(cfg.device)
    info = ddp.dist_env()
    if info.active and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    info = ddp.setup(info, device)
    try:
        show = progress and info.is_main
        return _train(cfg, out, state_path, resume, show, objective, data, train_split, device, info)
    finally:
        ddp.teardown(info)


def _train(
    cfg: TrainConfig,
    out: Path,
    state_path: Path,
    resume: bool,
    progress: bool,
    objective: Objective | None,
    data: Dataset,
    train_split: Any,
    device: torch.device,
    info: ddp.DistInfo,
) -> TrainResult:
    torch.manual_seed(cfg.seed)
    model = make_model_for(cfg, data)
    if cfg.init:
        _load_init(model, cfg.init)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if info.active:
        ddp.broadcast_state(model)
    if objective is None:
        objective = make_objective(cfg)
    if info.active and hasattr(objective, "rank_stream"):
        objective.rank_stream = info.rank  # distinct random starts per rank; rank 0 draws as one process
    setup = getattr(objective, "setup", None)
    if callable(setup):
        setup(model, train_split, device)
    step_model: nn.Module = model
    if cfg.compile:
        step_model = torch.compile(model, backend=_compile_backend(cfg.compile))  # type: ignore[assignment]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(train_split) // cfg.batch_size)
    sched = _scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    aug = cfg.augment
    if aug == "auto":
        aug = "crop-flip" if data.image_shape[0] == 3 and data.image_shape[1] >= 32 else "none"

    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume:
        saved = torch.load(state_path, map_location=device, weights_only=True)
        if saved["config"] != json.loads(json.dumps(asdict(cfg))):
            raise UserError(f"{out} was started with a different configuration; cannot resume it with this one")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        start_epoch = int(saved["epoch"])
        history = json.loads(saved["history"])
        log.info("resuming %s at epoch %d", out, start_epoch + 1)

    t_total = sum(h.get("seconds", 0.0) for h in history)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        objective.on_epoch_start(step_model, epoch)
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", progress)
        for x, y in train_split.batches(cfg.batch_size, shuffle=True, generator=g):
            x = augment(x, aug, g)  # (B, C, H, W): the global batch, augmented before sharding
            global_n = len(y)
            if info.active:
                part = ddp.shard(global_n, info.rank, info.world)
                x, y = x[part], y[part]
            x = x.to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device)
            if len(y):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                    step = objective(step_model, x, y)
                opt.zero_grad(set_to_none=True)
                step.loss.backward()  # type: ignore[no-untyped-call]
                loss_sum += float(step.loss.detach()) * len(y)
                correct += int((step.logits.argmax(1) == y).sum())
            else:  # this rank's shard of a short last batch is empty: it contributes zero gradients
                opt.zero_grad(set_to_none=True)
            if info.active:
                ddp.average_gradients(model, len(y), global_n)
            opt.step()
            sched.step()
            if info.active:
                ddp.average_batchnorm_stats(model)
            seen += len(y)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        t_total += seconds
        val_acc = accuracy(model, data.val.x, data.val.y) if info.is_main else 0.0
        if info.active:
            loss_sum, c, s = ddp.sum_scalars([loss_sum, float(correct), float(seen)], device)
            correct, seen = int(c), int(s)
            val_acc, seconds = ddp.broadcast_scalars([val_acc, seconds], device)
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / seen,
                "train_acc": correct / seen,
                "val_acc": val_acc,
                "seconds": seconds,
            }
        )
        if info.is_main:
            log.info(
                "epoch %d: loss %.4f train %.4f val %.4f (%.1fs)",
                epoch + 1,
                loss_sum / seen,
                correct / seen,
                val_acc,
                seconds,
            )
            _save_state(state_path, model, opt, sched, epoch + 1, history, cfg)

    test_acc = accuracy(model, data.test.x, data.test.y) if info.is_main else 0.0
    if info.active:
        (test_acc,) = ddp.broadcast_scalars([test_acc], device)
        t_total = sum(h.get("seconds", 0.0) for h in history)
    card = {
        "dataset": cfg.dataset,
        "objective": objective.describe(),
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "train_config": asdict(cfg),
        "test_accuracy": round(test_acc, 4),
        "val_accuracy": round(history[-1]["val_acc"], 4) if history else None,
        "train_seconds": round(t_total, 1),
        "classes": list(data.classes),
    }
    model.eval()
    if info.is_main:
        save_checkpoint(model, out / "model.safetensors", card)
        atomic_write_text(out / "history.json", json.dumps(history, indent=2) + "\n")
    if info.active:
        ddp.barrier()
    return TrainResult(model, card, history)


def make_objective(cfg: TrainConfig) -> Objective:
    """The registered objective `cfg.objective` built from `cfg.objective_args`; objectives that
    take a `seed` get the run's seed unless the arguments name one."""
    factory = OBJECTIVES.get(cfg.objective)
    args = dict(cfg.objective_args)
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        params = []
    takes_seed = any(p.name == "seed" or p.kind is p.VAR_KEYWORD for p in params)
    if "seed" not in args and takes_seed:
        args["seed"] = cfg.seed
    try:
        obj: Objective = factory(**args)
    except TypeError as e:
        raise UserError(f"bad objective_args for '{cfg.objective}': {e}") from None
    return obj


def _compile_backend(option: bool | str) -> str:
    """The torch.compile backend of the `compile` option (True = inductor)."""
    if option is True:
        return "inductor"
    import torch._dynamo

    backends = set(torch._dynamo.list_backends()) | {"inductor", "eager", "aot_eager"}
    if not isinstance(option, str) or option not in backends:
        raise UserError(f"compile must be true, false or a backend ({', '.join(sorted(backends))}), got {option!r}")
    return option


def _load_init(model: nn.Module, name: str) -> None:
    """Copy the weights of checkpoint `name` into `model` (same architecture required)."""
    source, _card = load_checkpoint(name)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as e:
        raise UserError(
            f"cannot start from '{name}': its architecture differs from the configured model ({e})"
        ) from None


def _save_state(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    epoch: int,
    history: list[dict[str, float]],
    cfg: TrainConfig,
) -> None:
    import io

    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epoch,
            "history": json.dumps(history),
            "config": json.loads(json.dumps(asdict(cfg))),
        },
        buf,
    )
    atomic_write_bytes(path, buf.getvalue())


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
