"""Robust and non-robust datasets (METHODS §3.2, §3.3, §6.5, §8.3 row "§3"): D̂_R, D̂_NR, the
selective D̂_R on robust units, D̂_rand, D̂_det and the back-perturbed D_bp.

- D̂_R / D̂_NR: x_r = argmin_z ‖g(z) − g(x)‖₂² from z(0) = a different, randomly drawn training
  image, g = the penultimate representation (input of the final linear layer) of a robust (R) or
  standard (NR) model; normalised ℓ2 gradient descent z ← clip[0,1](z − η ∇/‖∇‖₂), η = 0.1,
  T = 1000. This is the package's PGD loop in the ℓ2 "ball" of infinite radius around z(0)
  (MadryLab's ε = 1000), maximising −‖g(z) − g(x)‖²: no ε-ball constrains it, it matches a
  representation (`match_representation`). Selective variant: g = the standardised responses of
  the robust units R of a feature dissection.
- D̂_rand / D̂_det: targeted ℓ2 PGD on a standard model toward t (ε = 1.5, step 0.3, 100 steps),
  labelled t; t ~ Uniform{0..K−1} (all K classes) or t = (y + 1) mod K.
- D_bp: the back-perturbation of `analysis.pushback` on each training image, labelled y.

This module builds them; `data.robust_data` loads a built set. Building is batched and resumable:
each batch is written to `OUT.partial/batch-XXXXX.safetensors`,
every random draw of a batch comes from a generator seeded by (seed, batch index), so a resumed
build yields a file identical to an uninterrupted one. Under `torchrun --nproc_per_node W` (RANK /
WORLD_SIZE in the environment; a gloo group is created unless one exists) rank r builds the
missing batches b with b mod W = r into the shared OUT.partial/, and rank 0 assembles OUT once all
are written: the same tensors as one process, since no batch depends on another (bitwise as long
as every process computes with the same number of intra-op threads). The result is `OUT` (safetensors: x (N, C,
H, W) float32, y (N,) int64, source (N,) int64 = index of the source image) with a JSON card
`OUT.json` (kind, settings, seed, source model hash, dataset). `--data robust-data:OUT` trains on
it: the train split is the built set, val and test are the source dataset's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from ..analysis.features import QUICK_FEATURES, FeatureOptions, score_features
from ..analysis.pushback import UnitSets, back_perturb
from ..attacks import PGD
from ..config import check_ints
from ..data import load_dataset
from ..errors import UserError
from ..models import default_conv_layers
from ..models.resolve import resolve_model
from ..modelutil import eval_mode, model_device
from ..probe import record, spatial_reduce
from ..runs import jsonable, read_json, write_json
from ..store import model_hash
from . import distributed as ddp

log = logging.getLogger(__name__)

KINDS = ("r", "nr", "r-selective", "rand", "det", "bp")
BATCH_SALT = 1_000_003  # generator seed of batch b: seed * BATCH_SALT + b

# (x (B, C, H, W), y (B,), source (B,), generator) -> (x_new (B, C, H, W), y_new (B,))
BatchFn = Callable[[Tensor, Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class RobustDataSettings:
    """Settings of a build (§8.3 "§3" and "§6" rows); every one is recorded in the card."""

    kind: str
    n: int
    seed: int = 0
    batch: int = 250
    eta: float = 0.1  # D̂_R / D̂_NR step
    steps: int = 1000  # D̂_R / D̂_NR iterations
    eps: float = 1.5  # D̂_rand / D̂_det ℓ2 budget
    alpha: float = 0.3
    attack_steps: int = 100
    exclude_true: bool = False  # D̂_rand: draw t ≠ y
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"unknown robust-data kind '{self.kind}'; use one of {', '.join(KINDS)}")
        check_ints(self, dict.fromkeys(("n", "batch", "steps", "attack_steps"), 1), "robust-data")


class RepresentationLoss:
    """PGD loss (logits, y) → (N,) to maximise: −‖g(z) − g(x)‖² per sample, with g(z) read by a
    hook (`capture`) in the forward pass that made the logits and g(x) (N, D) set per batch."""

    __name__ = "representation-match"

    def __init__(self, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.transform = transform
        self.value: Tensor | None = None
        self.goal: Tensor | None = None

    def capture(self, _name: str, t: Tensor) -> None:
        v = t.flatten(1) if t.ndim > 2 else t
        if self.transform is not None:
            v = self.transform(t)
        self.value = v

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        del y
        if self.value is None or self.goal is None or self.value.shape[0] != logits.shape[0]:
            raise RuntimeError("the representation hook did not run in this forward pass")
        return -((self.value - self.goal.to(self.value)) ** 2).sum(1)


def match_representation(
    model: nn.Module,
    layer: str,
    x: Tensor,
    z0: Tensor,
    *,
    steps: int = 1000,
    eta: float = 0.1,
    capture: str = "input",
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """x_r (N, C, H, W) ≈ argmin_z ‖g(z) − g(x)‖² from z0 (N, C, H, W), g = the `capture`
    ("input" or "output") of `layer` (optionally mapped by `transform` (N, ...) → (N, D)).

    Not an attack: there is no ε-ball, only a representation to match. It runs the one PGD loop
    with norm ℓ2, ε = ∞ (the clip to [0, 1] is the only projection), no random start and step η:
    z ← clip[0,1](z + η ∇(−‖g(z) − g(x)‖²)/‖∇‖₂), the last iterate after `steps` steps."""
    device = model_device(model, x.device)
    loss = RepresentationLoss(transform)
    with eval_mode(model), torch.no_grad(), record(model, layer, loss.capture, keep=False, capture=capture):  # type: ignore[arg-type]
        model(x.to(device))
    loss.goal = loss.value
    pgd = PGD(math.inf, norm="l2", steps=steps, alpha=eta, loss=loss, random_start=False, keep="last")
    dummy = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    with record(model, layer, loss.capture, keep=False, detach=False, capture=capture):  # type: ignore[arg-type]
        out = pgd.perturb(model, z0.to(device), dummy, torch.Generator(device=device))
    return out.to(x.device)


def representation_batch_fn(
    model: nn.Module,
    pool: Tensor,
    settings: RobustDataSettings,
    layer: str = "fc1",
    capture: str = "input",
    transform: Callable[[Tensor], Tensor] | None = None,
) -> BatchFn:
    """D̂_R / D̂_NR batches: each image's start is another image of `pool` (N, C, H, W) drawn with
    the batch's generator (never the image itself)."""
    n = pool.shape[0]

    def fn(x: Tensor, y: Tensor, source: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        shift = torch.randint(1, max(n, 2), source.shape, generator=gen)
        z0 = pool[(source + shift) % n]
        return match_representation(model, layer, x, z0, steps=settings.steps, eta=settings.eta,
                                    capture=capture, transform=transform), y  # fmt: skip

    return fn


def draw_targets(y: Tensor, num_classes: int, kind: str, gen: torch.Generator, exclude_true: bool = False) -> Tensor:
    """Targets (N,): D̂_det t = (y + 1) mod K; D̂_rand t ~ Uniform{0..K−1} over all K classes
    (with `exclude_true`, uniform over the K − 1 classes ≠ y)."""
    if kind == "det":
        return (y + 1) % num_classes
    if kind != "rand":
        raise UserError(f"targets are drawn for rand or det, not {kind}")
    if exclude_true:
        return (y + torch.randint(1, num_classes, y.shape, generator=gen)) % num_classes
    return torch.randint(0, num_classes, y.shape, generator=gen)


def targeted_batch_fn(model: nn.Module, num_classes: int, settings: RobustDataSettings) -> BatchFn:
    """D̂_rand / D̂_det batches: targeted ℓ2 PGD toward t on a standard model, labelled t."""
    attack = PGD(settings.eps, norm="l2", steps=settings.attack_steps, alpha=settings.alpha, random_start=False)

    def fn(x: Tensor, y: Tensor, source: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        del source
        t = draw_targets(y, num_classes, settings.kind, gen, settings.exclude_true)
        return attack(model, x, y, targets=t).x_adv, t

    return fn


def _batch_path(partial: Path, b: int) -> Path:
    return partial / f"batch-{b:05d}.safetensors"


def build(
    out: str | Path,
    x: Tensor,
    y: Tensor,
    batch_fn: BatchFn,
    settings: RobustDataSettings,
    card: dict[str, Any] | None = None,
    *,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """Build OUT from images x (N, C, H, W), labels y (N,) batch by batch; resumes from the
    batches already in OUT.partial/ (written with the same settings). Under torchrun every rank
    calls this with the same arguments and builds its share of the batches (module docstring).
    Returns OUT."""
    info = ddp.dist_env()
    created = False
    if info.active and not torch.distributed.is_initialized():
        # the ranks wait for each other only at the start and at the end of the build: no timeout
        # short of a day, since one rank may still be on its last batch of a long build
        torch.distributed.init_process_group("gloo", rank=info.rank, world_size=info.world,
                                             timeout=timedelta(days=1))  # fmt: skip
        created = True
    try:
        return _build(out, x, y, batch_fn, settings, card, progress, on_batch, info.rank, info.world)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _build(
    out: str | Path,
    x: Tensor,
    y: Tensor,
    batch_fn: BatchFn,
    settings: RobustDataSettings,
    card: dict[str, Any] | None,
    progress: bool,
    on_batch: Callable[[int], None] | None,
    rank: int,
    world: int,
) -> Path:
    def barrier() -> None:
        if world > 1:
            torch.distributed.barrier()

    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    partial = out.with_name(out.name + ".partial")
    n = min(settings.n, int(x.shape[0]))
    meta = {"settings": asdict(settings), **(card or {})}
    stamp = partial / "settings.json"
    if rank == 0 and not partial.exists():
        partial.mkdir(parents=True)
        write_json(stamp, meta, sort_keys=True)
    barrier()  # the other ranks read the stamp rank 0 wrote
    if not stamp.is_file() or read_json(stamp) != json.loads(json.dumps(jsonable(meta))):
        raise UserError(f"{partial} holds a build with other settings; remove it or use the same settings")
    starts = list(range(0, n, settings.batch))
    mine = [(b, s) for b, s in enumerate(starts) if b % world == rank]
    bar: Any = None
    if progress and rank == 0:
        desc = f"robust-data {settings.kind}" + (f" (rank 0 of {world})" if world > 1 else "")
        bar = tqdm(total=len(mine), desc=desc, unit="batch")
    for b, s in mine:
        path = _batch_path(partial, b)
        if not path.is_file():
            gen = torch.Generator().manual_seed(settings.seed * BATCH_SALT + b)
            src = torch.arange(s, min(s + settings.batch, n))
            xb, yb = batch_fn(x[src], y[src], src, gen)
            tmp = path.with_suffix(".tmp")
            save_file({"x": xb.detach().cpu().float().contiguous(), "y": yb.cpu().long().contiguous(),
                       "source": src.contiguous()}, str(tmp))  # fmt: skip
            tmp.replace(path)
            if on_batch is not None:
                on_batch(b)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    barrier()  # every rank's batches are on disk
    if rank != 0:
        barrier()  # rank 0 has written OUT
        return out
    try:
        _assemble(out, partial, len(starts), settings, meta, n)
    finally:
        barrier()
    return out


def _assemble(
    out: Path, partial: Path, batches: int, settings: RobustDataSettings, meta: dict[str, Any], n: int
) -> None:
    """OUT from the batch files, its card beside it; removes OUT.partial/."""
    parts = [load_file(str(_batch_path(partial, b))) for b in range(batches)]
    tensors = {k: torch.cat([p[k] for p in parts]).contiguous() for k in ("x", "y", "source")}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"kind": settings.kind, "seed": str(settings.seed)})
    tmp.replace(out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    card_path = out.with_suffix(".json")
    write_json(card_path, {**meta, "n": n, "sha256": digest}, sort_keys=True)
    shutil.rmtree(partial)


VANILLA = "fmnist-smallcnn-vanilla"
DEFAULT_SOURCE = {"r": "fmnist-smallcnn-pat", "nr": VANILLA, "r-selective": VANILLA, "rand": VANILLA, "det": VANILLA,
                  "bp": VANILLA}  # fmt: skip


def unit_sets_for(model: nn.Module, x: Tensor, y: Tensor, x_ref: Tensor, num_classes: int, seed: int = 0) -> UnitSets:
    """Brittle and robust units (`analysis.pushback.UnitSets`) of `model` from a feature dissection
    with the default run's budgets on images x (N, C, H, W), y (N,), reference images x_ref."""
    layers = default_conv_layers(model, "conv", x[:1])
    opts = FeatureOptions(**{**QUICK_FEATURES, "n": None})
    return UnitSets.from_scores(score_features(model, x, y, x_ref, layers, opts, num_classes=num_classes, seed=seed))


def build_dataset(
    kind: str,
    n: int,
    out: str | Path,
    *,
    model: str | None = None,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    batch: int = 250,
    steps: int | None = None,
    units_n: int = 200,
    progress: bool = False,
) -> Path:
    """Build one dataset from the first n images of a seeded permutation of the training split
    (the source model defaults to PAT for D̂_R and to the vanilla smallcnn otherwise)."""
    settings = RobustDataSettings(kind, n=n, seed=seed, batch=batch)
    if steps is not None:
        settings = RobustDataSettings(kind, n=n, seed=seed, batch=batch, steps=steps, attack_steps=steps)
    name = model or DEFAULT_SOURCE[kind]
    net, _card = resolve_model(name)
    net.eval()
    ds = load_dataset(dataset, data_dir, seed=seed)
    train = ds.train.subset(n, seed=seed)
    k = ds.num_classes
    card: dict[str, Any] = {"dataset": dataset, "data_dir": data_dir, "source_model": name,
                            "source_model_hash": model_hash(net)}  # fmt: skip
    fn: BatchFn
    if kind in ("r", "nr"):
        fn = representation_batch_fn(net, train.x, settings, layer="fc1", capture="input")
        card["representation"] = "input of fc1 (penultimate, global average pool)"
    elif kind in ("rand", "det"):
        fn = targeted_batch_fn(net, k, settings)
    else:
        probe = ds.test.subset(units_n, seed=seed)
        sets = unit_sets_for(net, probe.x, probe.y, ds.train.subset(2000, seed=seed).x, k, seed)
        card.update(brittle=len(sets.brittle), robust=len(sets.robust), units_from=f"{units_n} test images")
        if kind == "bp":
            bp: dict[str, Any] = {"eps": 0.1, "steps": 50, "alpha": 0.01, "lambda_r": 1.0}
            card["back_perturbation"] = bp

            def fn(x: Tensor, y: Tensor, source: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
                del source, gen
                return back_perturb(net, x, sets, **bp), y
        else:  # r-selective: match the standardised responses of the robust units only
            layers = sets.layers
            if len(sets.robust) == 0:
                raise UserError(f"{name} has no robust (RU) unit to match")
            fn = _selective_fn(net, train.x, settings, sets, layers, spatial_reduce)
            card["representation"] = f"{len(sets.robust)} robust units of {', '.join(layers)}"
    return build(out, train.x, train.y, fn, settings, card, progress=progress)


def _selective_fn(
    net: nn.Module, pool: Tensor, settings: RobustDataSettings, sets: UnitSets, layers: list[str],
    reduce: Callable[[Tensor], Tensor],
) -> BatchFn:
    """Selective D̂_R batches: the representation is f_R, the standardised responses of the robust
    units (hooked on every layer of `sets`, gathered at the last one's forward)."""
    acts: dict[str, Tensor] = {}
    last = layers[-1]

    def keep(name: str, t: Tensor) -> None:
        acts[name] = reduce(t)

    def transform(t: Tensor) -> Tensor:
        keep(last, t)
        f: Tensor = sets.standardise(torch.cat([acts[n] for n in layers], 1))
        return f[:, sets.robust]

    def fn(x: Tensor, y: Tensor, source: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n = pool.shape[0]
        z0 = pool[(source + torch.randint(1, max(n, 2), source.shape, generator=gen)) % n]

        with record(net, layers[:-1], keep, keep=False, detach=False):
            out = match_representation(net, last, x, z0, steps=settings.steps, eta=settings.eta, capture="output",
                                       transform=transform)  # fmt: skip
        return out, y

    return fn
