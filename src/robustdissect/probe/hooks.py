"""Forward hooks on named layers: recording (`record`, `gated`), channel interventions
(`intervene` with `ChannelEdit`s), the per-channel view of a layer output, and `call_counts`.

A module that runs more than once per forward pass (e.g. one ReLU called twice in a ResNet block)
cannot be recorded: its hook would mix the calls, so `record` raises `ReusedModuleError`;
`call_counts` finds such modules ahead of time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
from torch import nn

from ..errors import ReusedModuleError, UserError, unknown_name
from ..modelutil import eval_mode, model_device

__all__ = [
    "ChannelEdit",
    "LayerCallback",
    "Recording",
    "aliases_of",
    "call_counts",
    "gated",
    "intervene",
    "record",
    "replace_channels",
    "resolve_layer",
    "resolve_layers",
    "scale_channels",
    "spatial_reduce",
    "zero_channels",
]

def aliases_of(model: nn.Module) -> dict[str, str]:
    """alias -> module path for zoo models (empty for user models)."""
    aliases = getattr(model, "layer_aliases", None)
    return dict(aliases) if isinstance(aliases, dict) else {}


def resolve_layer(model: nn.Module, name: str) -> str:
    """Map an alias or a module path to the module path; unknown names list close matches."""
    modules = dict(model.named_modules())
    aliases = aliases_of(model)
    if name in aliases:
        return aliases[name]
    if name in modules and name != "":
        return name
    raise unknown_name("layer", name, [*aliases, *(m for m in modules if m)])


def resolve_layers(model: nn.Module, names: list[str]) -> list[str]:
    """`resolve_layer` of each name."""
    return [resolve_layer(model, n) for n in names]


T = TypeVar("T")
LayerCallback = Callable[[str, torch.Tensor], None]


# --------------------------------------------------------------------------------------------
# helpers


def _as_tensor(output: object, name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UserError(f"layer '{name}' does not output a tensor; hook a module that does")


def _per_channel(a: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C, P) view with P = prod(spatial) (1 for (B, C))."""
    if a.ndim < 2:
        raise UserError(f"layer output of shape {tuple(a.shape)} has no channel dimension")
    if a.ndim == 2:
        return a.unsqueeze(-1)
    return a.flatten(2)


def spatial_reduce(a: torch.Tensor, how: Literal["mean", "max"] = "mean") -> torch.Tensor:
    """Scalar response per image and channel: (B, C, *spatial) -> (B, C), mean or max over space."""
    flat = _per_channel(a)
    if how == "mean":
        return flat.mean(-1)
    if how == "max":
        return flat.amax(-1)
    raise UserError(f"spatial reduction must be 'mean' or 'max', got {how!r}")


# --------------------------------------------------------------------------------------------
# recording


@dataclass
class Recording:
    """What `record` captured: `outputs[name]` is a detached copy of the last output of each layer
    (when `keep=True`); `paths[name]` its module path; `calls[name]` how often its hook ran."""

    paths: dict[str, str]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    enabled: bool = True  # hooks do nothing while False (see `gated`)

    def reset(self) -> None:
        """Forget captured outputs and call counts (e.g. before the next forward pass)."""
        self.outputs.clear()
        for name in self.calls:
            self.calls[name] = 0


@contextmanager
def record(
    model: nn.Module,
    layers: str | Sequence[str],
    callback: LayerCallback | None = None,
    *,
    keep: bool = True,
    detach: bool = True,
    capture: Literal["output", "input"] = "output",
) -> Iterator[Recording]:
    """Hook the named layers for the duration of the block.

    `capture="input"` records the first positional input of each layer instead of its output
    (e.g. the input of the final linear layer, the penultimate representation).
    On every forward call of a hooked layer, `callback(name, output)` runs inside the hook (so
    a later in-place op such as `ReLU(inplace=True)` cannot alter what it sees), and with
    `keep=True` a copy of the output is stored in `Recording.outputs[name]`. Outputs are
    detached unless `detach=False`. All hooks are removed on exit, also after an exception.
    Recording never changes the model's outputs.

    A layer whose module runs more than once in one forward pass of `model` raises
    `ReusedModuleError` when that pass ends; its later calls are never recorded.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    paths = {name: resolve_layer(model, name) for name in names}
    modules = dict(model.named_modules())
    rec = Recording(paths=paths, calls=dict.fromkeys(names, 0))
    handles: list[torch.utils.hooks.RemovableHandle] = []

    if capture not in ("output", "input"):
        raise UserError(f"capture must be 'output' or 'input', got {capture!r}")

    # Calls of each layer within the current forward pass of `model` (nested passes count as one).
    depth = 0
    in_pass = dict.fromkeys(names, 0)

    def seen(name: str, value: object) -> None:
        if not rec.enabled:
            return
        if depth:
            in_pass[name] += 1
            if in_pass[name] > 1:
                return  # a reused module: reported by `check` when the pass ends
        t = _as_tensor(value, name)
        if detach:
            t = t.detach()
        rec.calls[name] += 1
        if callback is not None:
            callback(name, t)
        if keep:
            rec.outputs[name] = t.clone()

    def make_hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            seen(name, output)

        return hook

    def make_pre_hook(name: str) -> Callable[[nn.Module, object], None]:
        def pre_hook(_module: nn.Module, inputs: object) -> None:
            seen(name, inputs)

        return pre_hook

    def enter(_module: nn.Module, _inputs: object) -> None:
        nonlocal depth
        if depth == 0:
            in_pass.update(dict.fromkeys(in_pass, 0))
        depth += 1

    def check(_module: nn.Module, _inputs: object, _output: object) -> None:
        if depth == 1:
            for name, n in in_pass.items():
                if n > 1:
                    raise ReusedModuleError(paths[name], n, name)

    def leave(_module: nn.Module, _inputs: object, _output: object) -> None:
        nonlocal depth
        depth -= 1

    try:
        for name, path in paths.items():
            if capture == "output":
                handles.append(modules[path].register_forward_hook(make_hook(name)))
            else:
                handles.append(modules[path].register_forward_pre_hook(make_pre_hook(name)))
        handles.append(model.register_forward_pre_hook(enter))
        handles.append(model.register_forward_hook(check))
        # registered after `check` and always called: also runs when `check` or the forward raises
        handles.append(model.register_forward_hook(leave, always_call=True))
        yield rec
    finally:
        for h in handles:
            h.remove()


def _module_calls(model: nn.Module, x: torch.Tensor, what: str) -> list[str]:
    """The module paths called in one forward pass of the first image of x (N, C, H, W), in call
    order with repeats (eval mode, no grad). `what` names the caller's purpose in the error."""
    if x.ndim == 0 or x.shape[0] == 0:
        raise UserError(f"{what} needs at least one input image, got shape {tuple(x.shape)}")
    calls: list[str] = []

    def make_hook(path: str) -> Callable[[nn.Module, object], None]:
        def called(_module: nn.Module, _inputs: object) -> None:
            calls.append(path)

        return called

    handles = [m.register_forward_pre_hook(make_hook(path)) for path, m in model.named_modules() if path]
    try:
        with eval_mode(model), torch.no_grad():
            model(x[:1].to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return calls


def call_counts(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often each named submodule runs in one forward pass of the first image of x
    (N, C, H, W), in eval mode without grad: {module path: calls} in `named_modules()` order,
    0 for modules the pass does not call (e.g. a ModuleList container)."""
    counts = dict.fromkeys((path for path, _ in model.named_modules() if path), 0)
    for path in _module_calls(model, x, "counting module calls"):
        counts[path] += 1
    return counts


def forward_order(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """{module path: position of its first call} in one forward pass of the first image of x
    (N, C, H, W) (eval mode, no grad); modules the pass does not call are left out. This is the
    depth of a layer, whatever order `named_modules()` lists it in."""
    order: dict[str, int] = {}
    for path in _module_calls(model, x, "the forward order"):
        order.setdefault(path, len(order))
    return order


def gated(rec: Recording, items: Iterable[T]) -> Iterator[T]:
    """Iterate `items` with the recording's hooks switched off while each item is produced (a lazy
    producer, e.g. an attack, may run the same model, with gradients) and on while it is used."""
    it = iter(items)
    while True:
        rec.enabled = False
        try:
            with torch.enable_grad():
                item = next(it)
        except StopIteration:
            return
        finally:
            rec.enabled = True
        yield item


# --------------------------------------------------------------------------------------------
# interventions


@dataclass(frozen=True)
class ChannelEdit:
    """An edit of some channels of one layer's output.

    `op="scale"` multiplies the channels by `beta` (beta = 1 is skipped: outputs stay
    bit-identical); `op="zero"` sets them to 0; `op="replace"` copies them from `source`, a
    tensor shaped like the layer output (e.g. clean activations), or, when `source` is None,
    from the first half of the batch into the second half (a concatenated [clean; adversarial]
    batch of 2B images).
    """

    layer: str
    channels: tuple[int, ...]
    op: Literal["scale", "zero", "replace"] = "scale"
    beta: float = 1.0
    source: torch.Tensor | None = None

    def is_noop(self) -> bool:
        return len(self.channels) == 0 or (self.op == "scale" and self.beta == 1.0)


def scale_channels(layer: str, channels: Iterable[int], beta: float) -> ChannelEdit:
    """Multiply the given channels of `layer` by `beta`."""
    return ChannelEdit(layer, tuple(int(c) for c in channels), "scale", float(beta))


def zero_channels(layer: str, channels: Iterable[int]) -> ChannelEdit:
    """Set the given channels of `layer` to zero."""
    return ChannelEdit(layer, tuple(int(c) for c in channels), "zero")


def replace_channels(layer: str, channels: Iterable[int], source: torch.Tensor | None = None) -> ChannelEdit:
    """Replace the given channels of `layer` with `source` (or first-half activations)."""
    return ChannelEdit(layer, tuple(int(c) for c in channels), "replace", source=source)


def _apply_edit(edit: ChannelEdit, t: torch.Tensor) -> torch.Tensor:
    if edit.is_noop():
        return t
    c = t.shape[1] if t.ndim >= 2 else 0
    bad = [ch for ch in edit.channels if not 0 <= ch < c]
    if bad:
        raise UserError(f"layer '{edit.layer}' has {c} channels; cannot edit channel(s) {bad}")
    idx = torch.tensor(edit.channels, dtype=torch.long, device=t.device)
    if edit.op == "scale":
        shape = [1] * t.ndim
        shape[1] = c
        scale = torch.ones(c, dtype=t.dtype, device=t.device)
        scale[idx] = edit.beta
        return t * scale.view(shape)
    if edit.op == "zero":
        return t.index_fill(1, idx, 0.0)
    if edit.op == "replace":
        if edit.source is None:
            if t.shape[0] % 2:
                raise UserError(
                    f"replace on '{edit.layer}' without a source needs a [clean; adversarial] "
                    f"batch of even size, got {t.shape[0]}"
                )
            h = t.shape[0] // 2
            adv = t[h:].index_copy(1, idx, t[:h].index_select(1, idx))
            return torch.cat([t[:h], adv])
        src = edit.source.to(device=t.device, dtype=t.dtype)
        if src.shape != t.shape:
            raise UserError(
                f"replace on '{edit.layer}': source shape {tuple(src.shape)} does not match the "
                f"layer output {tuple(t.shape)}"
            )
        return t.index_copy(1, idx, src.index_select(1, idx))
    raise UserError(f"unknown channel edit {edit.op!r}; use scale, zero or replace")


@contextmanager
def intervene(model: nn.Module, edits: Iterable[ChannelEdit]) -> Iterator[None]:
    """Apply channel edits to layer outputs for the duration of the block.

    Edits are differentiable (attacks can run through an edited model). Edits of the same layer
    apply in the given order. Hooks are removed on exit, also after an exception.
    """
    by_path: dict[str, list[ChannelEdit]] = {}
    for e in edits:
        by_path.setdefault(resolve_layer(model, e.layer), []).append(e)
    modules = dict(model.named_modules())
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make_hook(path: str, todo: list[ChannelEdit]) -> Callable[[nn.Module, object, object], torch.Tensor | None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> torch.Tensor | None:
            if not isinstance(output, torch.Tensor):
                raise UserError(f"layer '{path}' does not output a tensor; cannot edit it")
            t = output
            for e in todo:
                t = _apply_edit(e, t)
            return None if t is output else t

        return hook

    try:
        for path, todo in by_path.items():
            if all(e.is_noop() for e in todo):
                continue
            handles.append(modules[path].register_forward_hook(make_hook(path, todo)))
        yield
    finally:
        for h in handles:
            h.remove()
