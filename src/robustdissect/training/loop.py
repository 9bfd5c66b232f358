"""One training loop for every objective: seeded, resumable per epoch, with a progress bar.

Resume contract: the data order and augmentation of epoch e depend only on (seed, e), and the
checkpoint holds model, optimiser and scheduler state, so a run resumed after a kill ends with the
same weights as an uninterrupted one.

Under `torchrun --nproc_per_node N` the same call trains data-parallel (see `training.distributed`):
each rank takes a disjoint shard of every global batch, gradients are averaged over the global
batch, and rank 0 alone writes state.pt, the model and its card.

The model is any classifier `models.resolve.resolve_model` accepts: a zoo architecture (built for
the data's channels, classes and statistics), a checkpoint with its card (fine-tuned), or the
user's `file.py:factory` / `pkg.module:factory` with `model_args` (and `init`, a plain weights file,
as its starting weights). The card of a user model records the factory, its arguments and the
command-line arguments that load the trained weights back (`loads_with`).
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import math
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..config import is_int, path_fields, pick_device
from ..data import DATASETS, Dataset, augment, load_dataset
from ..errors import UserError, unknown_name
from ..models import MODELS, save_checkpoint
from ..models.io import LogitsOnly, shipped_checkpoints
from ..models.resolve import CHECKPOINT_SUFFIXES, list_models, resolve_model
from ..modelutil import accuracy
from ..runs import ERROR_LOG, LOCK, DirLock, atomic_write_bytes, check_writable_parent, write_json
from . import distributed as ddp
from .objectives import OBJECTIVES, Objective

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "smallcnn"  # zoo architecture, checkpoint (name or .safetensors with card) or file.py:factory
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
    # start from these weights: a checkpoint with its card (shipped name or .safetensors path), or for a
    # user factory (and a zoo model) a plain weights file (.safetensors without card, .pt, .pth)
    init: str | None = None
    channels_last: bool = False  # NHWC memory format for model and batches
    amp: str | None = None  # "bf16": bfloat16 autocast for the training forward (inner attacks stay fp32)
    compile: bool | str = False  # torch.compile the model used for the steps; a string names the backend

    def __post_init__(self) -> None:
        path_fields(self, "data_dir", "init")
        check_train_config(self)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse settings of the wrong type or range with one line (before anything is written)."""

    def need(ok: bool, what: str, value: Any) -> None:
        if not ok:
            raise UserError(f"{what}, got {value!r}")

    need(isinstance(cfg.model, str) and bool(cfg.model.strip()),
         "model must be a zoo architecture, a checkpoint or file.py:factory", cfg.model)  # fmt: skip
    need(isinstance(cfg.model_args, dict), "model_args must be a mapping", cfg.model_args)
    need(isinstance(cfg.dataset, str) and bool(cfg.dataset.strip()), "dataset must be a name", cfg.dataset)
    need(cfg.data_dir is None or isinstance(cfg.data_dir, str), "data_dir must be a path or null", cfg.data_dir)
    need(cfg.n is None or (is_int(cfg.n) and cfg.n > 0), "n must be a positive integer or null", cfg.n)
    need(is_int(cfg.epochs) and 1 <= cfg.epochs <= 100_000, "epochs must be a positive integer", cfg.epochs)
    need(is_int(cfg.batch_size) and cfg.batch_size > 0, "batch_size must be a positive integer", cfg.batch_size)
    need(_is_number(cfg.lr) and cfg.lr >= 0, "lr must be a finite, non-negative number", cfg.lr)
    need(_is_number(cfg.momentum) and 0 <= cfg.momentum < 1, "momentum must be a number in [0, 1)", cfg.momentum)
    need(
        _is_number(cfg.weight_decay) and cfg.weight_decay >= 0,
        "weight_decay must be a finite, non-negative number",
        cfg.weight_decay,
    )
    need(cfg.schedule in ("cosine", "step", "constant"), "schedule must be cosine, step or constant", cfg.schedule)
    need(cfg.augment in ("auto", "none", "crop-flip"), "augment must be auto, none or crop-flip", cfg.augment)
    need(isinstance(cfg.objective, str) and bool(cfg.objective), "objective must be a name", cfg.objective)
    need(isinstance(cfg.objective_args, dict), "objective_args must be a mapping", cfg.objective_args)
    need(is_int(cfg.seed) and 0 <= cfg.seed < 2**63, "seed must be a non-negative integer", cfg.seed)
    need(isinstance(cfg.device, str), "device must be auto, cpu, cuda, cuda:N or mps", cfg.device)
    need(cfg.init is None or isinstance(cfg.init, str), "init must be a checkpoint name or path", cfg.init)
    need(isinstance(cfg.channels_last, bool), "channels_last must be true or false", cfg.channels_last)
    need(cfg.amp in (None, "bf16"), "amp must be 'bf16' or null", cfg.amp)
    need(isinstance(cfg.compile, (bool, str)), "compile must be true, false or a backend name", cfg.compile)


def train_config_from_dict(data: Any, where: str = "training config") -> TrainConfig:
    """A validated TrainConfig from parsed YAML (unknown keys refused with close matches)."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    for key in data:
        if key not in known:
            raise unknown_name(f"setting in {where}", str(key), known)
    try:
        return TrainConfig(**data)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def saved_train_config(folder: Path) -> dict[str, Any]:
    """The configuration an interrupted run in `folder` was started with (from its state.pt)."""
    state = Path(folder) / "state.pt"
    if not state.is_file():
        raise UserError(f"nothing to resume in {folder} (no state.pt)")
    try:
        saved = torch.load(state, map_location="cpu", weights_only=True)
        config = saved["config"]
    except Exception as e:  # a truncated or foreign file is the user's file problem
        raise UserError(f"cannot read {state}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(config, dict):
        raise UserError(f"{state} holds no training configuration")
    return dict(config)


@dataclass
class TrainResult:
    model: nn.Module
    card: dict[str, Any]
    history: list[dict[str, float]]


def model_kind(spec: str) -> str:
    """How `resolve_model` reads `spec`: "checkpoint", "zoo" or "user" (file.py:factory)."""
    if spec in shipped_checkpoints() or spec.endswith(CHECKPOINT_SUFFIXES):
        return "checkpoint"
    if spec in MODELS:
        return "zoo"
    if ":" in spec:
        return "user"
    raise unknown_name("model", spec, list_models())


def _init_is_weights(cfg: TrainConfig) -> bool:
    """Whether `cfg.init` is a plain weights file applied by `resolve_model` (user factories always;
    zoo models when no card lies beside the file) rather than a checkpoint with its card."""
    if cfg.init is None:
        return False
    kind = model_kind(cfg.model)
    if kind == "user":
        return True
    path = Path(cfg.init)
    return kind == "zoo" and path.suffix in (".safetensors", ".pt", ".pth") and not path.with_suffix(".json").is_file()


def make_model_for(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """The model to train, resolved by `resolve_model` for `data` (zoo models built for its channels,
    classes and statistics; every model checked to give (N, classes) logits on its images), with
    `cfg.init` loaded. Not in eval mode: the loop sets the mode."""
    return _resolve(cfg, data)[0]


def _resolve(cfg: TrainConfig, data: Dataset) -> tuple[nn.Module, dict[str, Any]]:
    weights = cfg.init if _init_is_weights(cfg) else None
    model, card = resolve_model(cfg.model, weights, cfg.model_args, data, require_weights=False)
    if cfg.init and weights is None:
        _load_init(model, cfg.init)
    return model, card


def bare_model(model: nn.Module) -> nn.Module:
    """The user's own module inside the logits adapter `resolve_model` may add (tuple or dict
    outputs): what is saved, so the weights load back into the factory's model."""
    return model.inner if isinstance(model, LogitsOnly) else model


def _load_back(cfg: TrainConfig, out: Path, resolved: dict[str, Any]) -> dict[str, Any]:
    """Card entries for the trained model: the model spec, factory arguments and how to load it."""
    weights = out / "model.safetensors"
    kind = model_kind(cfg.model)
    entry: dict[str, Any] = {"model": {"spec": cfg.model, "kind": kind, "factory_args": dict(cfg.model_args),
                                       "init": cfg.init}}  # fmt: skip
    if kind != "user":
        entry["loads_with"] = f"--model {shlex.quote(str(weights))}"
        return entry
    target, factory = cfg.model.rsplit(":", 1)
    if target.endswith(".py"):  # an absolute path: the command works from any folder
        target = str(Path(target).resolve())
    args = "".join(f" --model-arg {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in cfg.model_args.items())
    entry.update(
        arch=resolved.get("arch", {"name": cfg.model, **cfg.model_args}),
        user_model=True,
        loads_with=f"--model {shlex.quote(f'{target}:{factory}')} --weights {shlex.quote(str(weights))}{args}",
    )
    return entry



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
    check_train_config(cfg)
    pick_device(cfg.device)
    if cfg.compile:
        _compile_backend(cfg.compile)  # an unknown backend fails before anything is written
    if data is None:
        DATASETS.get(cfg.dataset.split(":", 1)[0])  # name or name:PATH
    model_kind(cfg.model)  # an unknown name fails before anything is written
    if objective is None:
        objective = make_objective(cfg)
    info = ddp.dist_env()
    lock: DirLock | None = None
    created = False
    if info.is_main:
        lock, created = _open_out(out, resume)
    else:  # the other ranks check the same conditions, read-only, so that all of them stop together
        _check_contents(out, resume)
    try:
        data = data or load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
        train_split = data.train.subset(cfg.n, seed=cfg.seed)
        device = pick_device(cfg.device)
        if info.active and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(device)
        info = ddp.setup(info, device)
        try:
            show = progress and info.is_main
            result = _train(cfg, out, state_path, resume, show, objective, data, train_split, device, info)
        finally:
            ddp.teardown(info)
    except UserError:
        if lock is not None:
            _release(lock, out if created and not state_path.exists() else None)
        raise
    if lock is not None:
        _release(lock, None)
    return result


_OWN_FILES = {LOCK, ERROR_LOG}


def _open_out(out: Path, resume: bool) -> tuple[DirLock, bool]:
    """Check and lock the training folder; (lock, whether this call created the folder)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} is a file; name a folder for the training run")
    created = not out.exists()
    _check_contents(out, resume)  # before touching the folder: a refused one stays as it was
    if created:
        check_writable_parent(out)
        out.mkdir(parents=True)
    elif not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{out} is not writable")
    hint = f"the last finished epoch is kept in {out}; continue with: robustdissect train --resume {out}"
    had_lock_file = (out / LOCK).exists()
    try:
        lock = DirLock.acquire(out / LOCK, out, hint)
    except UserError:
        if not had_lock_file:
            (out / LOCK).unlink(missing_ok=True)
        raise
    try:
        _check_contents(out, resume)
    except BaseException:
        _release(lock, out if created else None)
        raise
    return lock, created


def _release(lock: DirLock, remove: Path | None) -> None:
    """Remove the lock file (and the folder `remove`, when it holds nothing else), then unlock."""
    lock.path.unlink(missing_ok=True)
    if remove is not None and not any(p.name not in _OWN_FILES for p in remove.iterdir()):
        shutil.rmtree(remove, ignore_errors=True)
    lock.close()


def _check_contents(out: Path, resume: bool) -> None:
    """A new run needs an empty folder (its own lock and error log aside); a resumed one, state.pt."""
    if resume and not (out / "state.pt").is_file():
        what = "no state.pt" if out.is_dir() else "no such folder"
        raise UserError(f"nothing to resume in {out} ({what})")
    if not resume and out.is_dir() and any(p.name not in _OWN_FILES for p in out.iterdir()):
        raise UserError(f"{out} is not empty; pass --resume to continue the run there, or choose another --out")


def _train(
    cfg: TrainConfig,
    out: Path,
    state_path: Path,
    resume: bool,
    progress: bool,
    objective: Objective,
    data: Dataset,
    train_split: Any,
    device: torch.device,
    info: ddp.DistInfo,
) -> TrainResult:
    torch.manual_seed(cfg.seed)
    model, resolved = _resolve(cfg, data)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if info.active:
        ddp.broadcast_state(model)
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
        now = json.loads(json.dumps(asdict(cfg)))
        if saved["config"] != now:
            diff = next(k for k in sorted(set(now) | set(saved["config"])) if now.get(k) != saved["config"].get(k))
            raise UserError(
                f"{out} was started with a different configuration ({diff}: {saved['config'].get(diff)!r} there, "
                f"{now.get(diff)!r} now); resume it with its own configuration (omit --config and the overrides)"
            )
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
                loss_value = float(step.loss.detach())
                if not math.isfinite(loss_value):
                    _non_finite(out, epoch, seen, loss_value, state_path.is_file())
                opt.zero_grad(set_to_none=True)
                step.loss.backward()  # type: ignore[no-untyped-call]
                loss_sum += loss_value * len(y)
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
        "data_dir": cfg.data_dir,
        **_load_back(cfg, out, resolved),
    }
    model.eval()
    saved = bare_model(model)
    bad = [k for k, v in saved.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"training left non-finite weights in {bad[0]}; nothing was saved as a model; lower --lr")
    if info.is_main:
        save_checkpoint(saved, out / "model.safetensors", card)
        write_json(out / "history.json", history)
    if info.active:
        ddp.barrier()
    return TrainResult(model, card, history)


def _non_finite(out: Path, epoch: int, seen: int, loss: float, have_state: bool) -> None:
    """Stop training on a NaN or infinite loss, keeping the last good checkpoint."""
    kept = (
        f"the last good checkpoint (epoch {epoch}) is kept in {out / 'state.pt'}"
        if have_state
        else "no epoch finished, nothing was saved"
    )
    raise UserError(
        f"the training loss became {loss} in epoch {epoch + 1} after {seen} images; {kept}; "
        "lower --lr or check the data"
    )


def make_objective(cfg: TrainConfig) -> Objective:
    """The registered objective `cfg.objective` built from `cfg.objective_args`; objectives that
    take a `seed` get the run's seed unless the arguments name one."""
    factory = OBJECTIVES.get(cfg.objective)
    args = dict(cfg.objective_args)
    if cfg.objective == "sns" and "reference" not in args and model_kind(cfg.model) == "user":
        # the shipped reference is a Fashion-MNIST smallcnn: a user model selects its sensitive
        # neurons on itself as training starts (its `init` weights, when given)
        args["reference"] = "initial"
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
    source, _card = resolve_model(name)
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
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
