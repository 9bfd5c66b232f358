"""Layer names: paper-style aliases next to `named_modules()` paths, resolution and listing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import unknown_name


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
    return [resolve_layer(model, n) for n in names]


def default_conv_layers(model: nn.Module, hook: str = "conv") -> list[str]:
    """The conv hook points (`conv`: BN output, `relu`: ReLU output) of a zoo model, in depth order;
    for user models every Conv2d (hook `conv`) or ReLU module (hook `relu`)."""
    aliases = aliases_of(model)
    prefix = "conv" if hook == "conv" else "relu"
    named = [a for a in aliases if a.startswith(prefix) and a[len(prefix) :].isdigit()]
    if named:
        return sorted(named, key=lambda a: int(a[len(prefix) :]))
    kind = nn.Conv2d if hook == "conv" else nn.ReLU
    return [n for n, m in model.named_modules() if isinstance(m, kind)]


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
    """Every named module with its alias and output shape, from one forward pass on zeros."""
    path_to_alias: dict[str, str] = {}
    for alias, path in aliases_of(model).items():
        path_to_alias.setdefault(path, alias)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def make_hook(path: str):  # type: ignore[no-untyped-def]
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, torch.Tensor):
                shapes[path] = tuple(out.shape[1:])

        return hook

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_hook(make_hook(path)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [
        LayerInfo(path, path_to_alias.get(path, ""), type(module).__name__, shapes.get(path, ()))
        for path, module in model.named_modules()
        if path and path in shapes
    ]
