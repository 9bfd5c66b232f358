"""The attack base class: one final `__call__` that enforces every invariant; subclasses search.

For every attack, `attack(model, x, y)`:

- validates the input: x float (N, C, H, W) in [0, 1], y int (N,) with labels < K (UserError);
- runs the search with the model in eval mode and every parameter's `requires_grad` off, and
  restores each module's training flag and each parameter's flag afterwards, also on exceptions;
  it registers no hooks;
- passes per-image random streams (`SampleRandom`, keyed by `seed` — default the attack's `seed`,
  0 — and a stable id per image: `ids`, default the positions 0..N-1) to the search, so the same
  seed gives the same output, whatever batches or processes the images are split into;
- projects the result onto B(x, eps) ∩ [0, 1] (final safety projection); eps == 0 returns x
  bitwise; corruptions (norm None) are only clipped to [0, 1];
- returns the clean point where the attack failed but x already succeeds, or where x_adv is
  classified correctly but x is not (adversarial attacks only), so that per sample, correct on
  x_adv implies correct on x, and robust accuracy <= clean accuracy;
- computes logits (N, K) on x_adv and the per-sample success flags.

Subclasses implement only `_search(model, x, y, targets, rng)`, which returns x_adv
(N, C, H, W) or a `SearchOutput` that also carries logits it already computed.
"""

from __future__ import annotations

import inspect
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, final

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..modelutil import model_device
from ..registry import Registry
from ..runs import jsonable
from .losses import is_success
from .rng import SampleRandom
from .threat import get_threat

ATTACKS: Registry[Callable[..., Attack]] = Registry("attack")

TARGET_MODES = ("random", "least-likely")
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class SearchOutput:
    """What a search returns: x_adv (N, C, H, W) and, when already computed, logits on x_adv and
    on the clean x (both (N, K)), which spare the base class a forward pass."""

    x_adv: Tensor
    logits: Tensor | None = None
    clean_logits: Tensor | None = None


@dataclass(frozen=True)
class AttackResult:
    """Outcome of one attack call.

    x_adv: (N, C, H, W), same shape/dtype/device as the input. success: bool (N,), misclassified
    (untargeted) or predicted as the target (targeted). logits: (N, K) on x_adv. correct: bool
    (N,), prediction on x_adv equals y. targets: (N,) int64 or None.
    """

    x_adv: Tensor
    success: Tensor
    logits: Tensor
    correct: Tensor
    targets: Tensor | None
    settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def robust_accuracy(self) -> float:
        """Fraction of samples still classified correctly on x_adv."""
        return float(self.correct.float().mean()) if self.correct.numel() else float("nan")

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if self.success.numel() else float("nan")

    def describe(self) -> dict[str, Any]:
        """The attack's settings plus seed, sample count, success rate and robust accuracy."""
        return {
            **self.settings,
            "seed": self.seed,
            "n": int(self.success.numel()),
            "targeted": self.targets is not None,
            "success_rate": self.success_rate,
            "robust_accuracy": self.robust_accuracy,
        }


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and requires_grad=False for the duration; each module's training flag and each
    parameter's requires_grad are restored afterwards, also when the body raises."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


@contextmanager
def cpu_channels_last(model: nn.Module, x: Tensor, enabled: bool = True) -> Iterator[Tensor]:
    """On the CPU, a convolutional model's 4-D weights in channels-last layout for the duration
    (oneDNN's faster convolutions: 0.6-0.8x the time per step on the zoo's LeNet and ResNet-18),
    restored afterwards; values never change. The layout is left as it is when not `enabled`, on
    other devices, for narrow convolutions (a conv after the first with < 16 input channels), when
    the model already uses channels-last, and when a forward pass fails in it (a model that
    `.view`s its activations). Yields the logits (1, K) of one forward pass on
    x[:1] in the layout used (the probe of the number of classes)."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # narrow convolutions (LeNet-5's 6 channels) run faster in the default layout (bench/attacks.py)
    wide = bool(convs) and all(c.in_channels >= 16 for c in convs[1:])
    use = (
        enabled
        and wide
        and x.device.type == "cpu"
        and x.dim() == 4
        and bool(weights)
        and all(p.is_contiguous() for p in weights)
    )
    probe: Tensor | None = None
    if use:
        _set_layout(model, torch.channels_last)
        try:
            probe = _forward(model, x[:1])
        except RuntimeError:  # e.g. a .view of a channels-last activation
            _set_layout(model, torch.contiguous_format)
            use = False
        except BaseException:
            _set_layout(model, torch.contiguous_format)
            raise
    try:
        yield probe if probe is not None else _forward(model, x[:1])
    finally:
        if use:
            _set_layout(model, torch.contiguous_format)


def _set_layout(model: nn.Module, layout: torch.memory_format) -> None:
    """Store every 4-D parameter and buffer of `model` in `layout` (same values, same objects)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=layout)


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """UserError unless value > 0 (>= 0 with allow_zero); NaN and non-numbers are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{name} must be a number, got {value!r}")
    ok = value >= 0 if allow_zero else value > 0
    if not ok or math.isnan(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"{name} must be {bound}, got {value}")


def check_int(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


class Attack(ABC):
    """Base class of every attack and corruption; see the module docstring for the contract.

    Attributes: `name` (registry name), `norm` ("linf", "l2" or None for corruptions), `eps`
    (pixel units; inf when unbounded), `white_box` (uses gradients), `seed`, `target` (None,
    "random" or "least-likely"), `batch_size` (split large inputs into chunks; None = one batch).
    """

    white_box: ClassVar[bool] = True
    adversarial: ClassVar[bool] = True
    supports_targeted: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:
            raise TypeError(f"{cls.__name__} must not override Attack.__call__; implement _search")

    def __init__(
        self,
        *,
        name: str,
        norm: str | None,
        eps: float,
        seed: int = 0,
        batch_size: int | None = None,
        target: str | None = None,
    ) -> None:
        if norm is not None and norm not in NORMS:
            raise UserError(f"unknown norm '{norm}'; use one of: {', '.join(NORMS)}")
        eps = float(eps)
        check_positive("eps", eps, allow_zero=True)
        check_int("seed", seed, minimum=0)
        if batch_size is not None:
            check_int("batch_size", batch_size)
        if target is not None:
            if not self.supports_targeted:
                raise UserError(f"attack '{name}' has no targeted mode")
            if target not in TARGET_MODES:
                raise UserError(f"target must be one of {', '.join(TARGET_MODES)} (or None), got {target!r}")
        self.name = name
        self.norm = norm
        self.eps = eps
        self.seed = seed
        self.batch_size = batch_size
        self.target = target

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def describe(self) -> dict[str, Any]:
        """Every setting of the attack as strict JSON values (an unbounded eps is null)."""
        out: dict[str, Any] = {"name": self.name, "norm": self.norm, "eps": self.eps, "white_box": self.white_box}
        out.update((k, v) for k, v in vars(self).items() if not k.startswith("_"))
        return jsonable(out)

    def _is_identity(self) -> bool:
        """True when the attack cannot move the input (eps == 0)."""
        return self.eps == 0

    @abstractmethod
    def _search(
        self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, rng: SampleRandom
    ) -> Tensor | SearchOutput:
        """Find x_adv (N, C, H, W) for x (N, C, H, W) in [0, 1] and labels y (N,); targets (N,) or None;
        rng: the images' random streams (draws are (N, ...), row i for image i).

        Runs with gradients enabled (white-box) or disabled (black-box); the model is in eval mode
        with parameters frozen. The base class projects the result afterwards.
        """

    @final
    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        targets: Tensor | None = None,
        seed: int | None = None,
        ids: Tensor | None = None,
    ) -> AttackResult:
        """Attack `model` on x (N, C, H, W) in [0, 1] with labels y (N,); targets (N,) for a
        targeted attack; ids (N,) int: a stable id per image that keys its random stream
        (default 0..N-1; pass the images' positions in a dataset to make a subset's result
        equal the full set's). Returns an AttackResult with x_adv on the device and dtype of x."""
        if not isinstance(model, nn.Module):
            raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        x, y, targets = validate_inputs(x, y, targets)
        if targets is not None and not self.supports_targeted:
            raise UserError(f"attack '{self.name}' has no targeted mode; do not pass targets")
        seed = self.seed if seed is None else seed
        check_int("seed", seed, minimum=0)
        out_device = x.device
        device = model_device(model, x.device)
        if ids is not None and tuple(ids.shape) != (x.shape[0],):
            raise UserError(f"ids must hold one id per image ({x.shape[0]},), got shape {tuple(ids.shape)}")
        rng = SampleRandom.for_images(x.shape[0], seed, device, ids)
        with torch.inference_mode(False), frozen(model):
            xw, yw = _normal(x.detach().to(device)), _normal(y.to(device))
            tw = _normal(targets.to(device)) if targets is not None else None
            # an identity attack keeps the model's layout, so its logits equal a plain forward pass
            with cpu_channels_last(model, xw, enabled=not self._is_identity()) as probe:
                num_classes = int(probe.shape[1])
                _check_labels("y", yw, num_classes)
                if tw is not None:
                    _check_labels("targets", tw, num_classes)
                n = xw.shape[0]
                step = self.batch_size or n
                parts = [
                    self._run_chunk(
                        model,
                        xw[s : s + step],
                        yw[s : s + step],
                        tw[s : s + step] if tw is not None else None,
                        rng.subset(slice(s, s + step)),
                        num_classes,
                    )
                    for s in range(0, n, step)
                ]
        x_adv = torch.cat([p[0] for p in parts]).to(out_device)
        logits = torch.cat([p[1] for p in parts]).to(out_device)
        success = torch.cat([p[2] for p in parts]).to(out_device)
        resolved = [p[3] for p in parts]
        final_targets = (
            None if resolved[0] is None else torch.cat([t for t in resolved if t is not None]).to(out_device)
        )
        correct = logits.argmax(dim=1) == y.to(out_device)
        return AttackResult(x_adv, success, logits, correct, final_targets, self.describe(), seed)

    def _run_chunk(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        targets: Tensor | None,
        rng: SampleRandom,
        num_classes: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        clean_logits: Tensor | None = None
        if targets is None and self.target is not None:
            if num_classes < 2:
                raise UserError("a targeted attack needs at least 2 classes")
            if self.target == "random":
                shift = rng.randint(1, num_classes)
                targets = (y + shift) % num_classes
            else:  # least-likely
                clean_logits = _forward(model, x)
                targets = clean_logits.argmin(dim=1)
        logits: Tensor | None = None
        if self._is_identity():
            x_adv = x.clone()
        else:
            with torch.enable_grad() if self.white_box else torch.no_grad():
                out = self._search(model, x, y, targets, rng)
            if isinstance(out, Tensor):
                out = SearchOutput(out)
            raw = out.x_adv.detach()
            if raw.shape != x.shape:
                raise RuntimeError(
                    f"{type(self).__name__}._search returned shape {tuple(raw.shape)}, expected {tuple(x.shape)}"
                )
            raw = raw.to(x.dtype)
            x_adv = self._final_projection(raw, x)
            if out.logits is not None and torch.equal(x_adv, raw):
                logits = out.logits.detach()
            if clean_logits is None and out.clean_logits is not None:
                clean_logits = out.clean_logits.detach()
        if logits is None:
            logits = _forward(model, x_adv)
        success = is_success(logits, y, targets)
        if self.adversarial and not self._is_identity():
            x_adv, logits, success = _keep_clean_failures(model, x, y, targets, x_adv, logits, success, clean_logits)
        return x_adv, logits, success, targets

    def _final_projection(self, x_adv: Tensor, x: Tensor) -> Tensor:
        if self.norm is None:
            return x_adv.clamp(0.0, 1.0)
        return get_threat(self.norm).project(x_adv, x, self.eps)


def _keep_clean_failures(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    targets: Tensor | None,
    x_adv: Tensor,
    logits: Tensor,
    success: Tensor,
    clean_logits: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return the clean point where it serves the attack better: where the attack failed but x
    already succeeds, or where x_adv is classified correctly but x is not."""
    correct = logits.argmax(dim=1) == y
    need = (~success | correct).nonzero().squeeze(1)
    if need.numel() == 0:
        return x_adv, logits, success
    cl = clean_logits[need] if clean_logits is not None else _forward(model, x[need])
    clean_ok = is_success(cl, y[need], targets[need] if targets is not None else None)
    clean_correct = cl.argmax(dim=1) == y[need]
    use_clean = (clean_ok & ~success[need]) | (correct[need] & ~clean_correct)
    if not bool(use_clean.any()):
        return x_adv, logits, success
    idx = need[use_clean]
    x_adv, logits, success = x_adv.clone(), logits.clone(), success.clone()
    x_adv[idx] = x[idx]
    logits[idx] = cl[use_clean].to(logits.dtype)
    success[idx] = clean_ok[use_clean]
    return x_adv, logits, success


def _normal(t: Tensor) -> Tensor:
    """A copy usable by autograd when t was created under torch.inference_mode."""
    return t.clone() if t.is_inference() else t


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(x)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise UserError(f"the model must return logits of shape (N, classes), got {shape}")
    return out


def _check_labels(what: str, labels: Tensor, num_classes: int) -> None:
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise UserError(f"{what} must lie in [0, {num_classes - 1}] for a {num_classes}-class model, got [{lo}, {hi}]")


def validate_inputs(x: Any, y: Any, targets: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    if not isinstance(x, Tensor):
        raise UserError(f"x must be a torch.Tensor of images (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise UserError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise UserError(f"x must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise UserError("x holds no images (N = 0)")
    if not bool(torch.isfinite(x).all()):
        raise UserError("x contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise UserError(
            f"x must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; pass raw images and put the "
            "normalisation inside the model"
        )
    y = _validate_labels("y", y, x.shape[0])
    if targets is not None:
        targets = _validate_labels("targets", targets, x.shape[0])
    return x, y, targets


def _validate_labels(what: str, labels: Any, n: int) -> Tensor:
    if not isinstance(labels, Tensor):
        raise UserError(f"{what} must be a torch.Tensor of class indices (N,), got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise UserError(f"{what} must have shape ({n},) to match x, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"{what} must hold integer class indices, got dtype {labels.dtype}")
    return labels.long()


A = TypeVar("A", bound=Attack)


def variant(**fixed: Any) -> Callable[[type[A]], type[A]]:
    """Class decorator: the decorated subclass is its parent with the keyword options `fixed` set
    (e.g. `@variant(norm="l2")` on a PGD subclass). Its signature, the one `make_attack` checks
    options against, is the parent's without them; giving one of them is an error."""

    def wrap(cls: type[A]) -> type[A]:
        parent_init: Callable[..., None] = vars(cls.__mro__[1])["__init__"]
        sig = inspect.signature(parent_init)

        def __init__(self: A, *args: Any, **kwargs: Any) -> None:
            clash = sorted(set(kwargs) & set(fixed))
            if clash:
                raise UserError(f"{cls.__name__} fixes {', '.join(f'{k}={fixed[k]!r}' for k in clash)}")
            parent_init(self, *args, **kwargs, **fixed)

        __init__.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[p for name, p in sig.parameters.items() if name not in fixed]
        )
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        setattr(cls, "__init__", __init__)  # noqa: B010 (mypy refuses assigning a method)
        return cls

    return wrap


def make_attack(name: str, **kwargs: Any) -> Attack:
    """Build a registered attack by name, e.g. make_attack("pgd-linf", eps=0.1, steps=20)."""
    factory = ATTACKS.get(name)
    params = inspect.signature(factory).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = ", ".join(p for p in params if p != "self")
        raise UserError(f"attack '{name}' has no parameter(s) {', '.join(unknown)}; it takes: {known}")
    return factory(**kwargs)
