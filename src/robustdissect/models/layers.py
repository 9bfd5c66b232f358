"""Layer names: paper-style aliases next to `named_modules()` paths, resolution and listing.

Modules that run more than once per forward pass (e.g. one ReLU called twice in a ResNet block)
cannot be hooked without mixing their calls; the default layer lists leave them out when given an
example input, and `reused_layers` names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..modelutil import eval_mode, model_device
from ..probe.hooks import aliases_of as aliases_of
from ..probe.hooks import call_counts
from ..probe.hooks import resolve_layer as resolve_layer
from ..probe.hooks import resolve_layers as resolve_layers

# an example input: images (N, C, H, W) or the shape (C, H, W) of one image
Example = torch.Tensor | Sequence[int]


def _example_input(model: nn.Module, example: Example) -> torch.Tensor:
    if isinstance(example, torch.Tensor):
        return example
    shape = tuple(int(s) for s in example)
    if not shape or any(s <= 0 for s in shape):
        raise UserError(f"an example image shape must be positive sizes such as (1, 28, 28), got {shape}")
    return torch.zeros(1, *shape, device=model_device(model))


def reused_layers(model: nn.Module, example: Example) -> list[str]:
    """Module paths of the submodules that run more than once in one forward pass of `example`
    (images (N, C, H, W), of which the first is used, or one image's shape (C, H, W)), in
    `named_modules()` order."""
    return [path for path, n in call_counts(model, _example_input(model, example)).items() if n > 1]


def default_conv_layers(model: nn.Module, hook: str = "conv", example: Example | None = None) -> list[str]:
    """The conv hook points (`conv`: BN output, `relu`: ReLU output) of a zoo model, in depth order;
    for user models every Conv2d (hook `conv`) or ReLU module (hook `relu`).

    With an `example` input (images (N, C, H, W) or one image's shape (C, H, W)), layers whose
    module runs more than once per forward pass are left out (see `reused_layers`)."""
    aliases = aliases_of(model)
    prefix = "conv" if hook == "conv" else "relu"
    named = [a for a in aliases if a.startswith(prefix) and a[len(prefix) :].isdigit()]
    if named:
        names = sorted(named, key=lambda a: int(a[len(prefix) :]))
    else:
        kind = nn.Conv2d if hook == "conv" else nn.ReLU
        names = [n for n, m in model.named_modules() if isinstance(m, kind)]
    if example is None:
        return names
    reused = set(reused_layers(model, example))
    return [n for n in names if resolve_layer(model, n) not in reused]


def hook_description(model: nn.Module, layer: str) -> str:
    """What a hook on `layer` sees, for reports: "BN output" for BatchNorm modules (the `conv`
    hook point of blocks with BatchNorm), else "<module type> output", e.g. "Conv2d output" for
    a conv layer without BatchNorm, "ReLU output", "Linear output"."""
    module = dict(model.named_modules())[resolve_layer(model, layer)]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BN output"
    return f"{type(module).__name__} output"


@dataclass(frozen=True)
class LayerInfo:
    path: str
    alias: str
    kind: str
    shape: tuple[int, ...]  # output shape without the batch dimension

    @property
    def channels(self) -> int:
        return self.shape[0] if self.shape else 0


def list_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerInfo]:
    """Every named module with its alias and output shape, from one forward pass on zeros.

    Modules that run more than once in that pass are left out (a hook on them would mix the
    calls); `reused_layers` names them."""
    path_to_alias: dict[str, str] = {}
    for alias, path in aliases_of(model).items():
        path_to_alias.setdefault(path, alias)
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    handles = []

    def make_hook(path: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            calls[path] = calls.get(path, 0) + 1
            if isinstance(out, torch.Tensor):
                shapes[path] = tuple(out.shape[1:])

        return hook

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_hook(make_hook(path)))
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_shape, device=model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return [
        LayerInfo(path, path_to_alias.get(path, ""), type(module).__name__, shapes.get(path, ()))
        for path, module in model.named_modules()
        if path and path in shapes and calls[path] == 1
    ]
