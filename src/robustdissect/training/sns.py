"""Sensitive Neuron Stabilizing (SNS): the neuron-sensitivity paper's defence (Eqs. 12-13,
Algorithm 1; METHODS §5.4 E9, §5.5 items 8 and 14).

    L_sns(x, x') = Σ_{l∈S} Σ_{m∈Ω_l} ‖F_l^m(x) − F_l^m(x')‖₁ / dim(F_l^m(x))    (mean over the batch)
    L            = L_adv(x, x', y) + λ·L_sns(x, x')                               (λ = 5 by default)

x' is L-inf PGD on the current model (the PAT setting), generated in eval mode like every
training perturbation here (see `training.robust`). S is a list of layers (names or aliases, or
"the top k conv layers"); every module that comes before the first layer of S (in module order,
which is forward order for the zoo models) is frozen: its parameters get requires_grad=False and
its BatchNorm layers stay in eval mode. The hook point is the BN output (`conv`, default) or the
ReLU output (`relu`).

Ω_l, the sensitive neurons of layer l (top `fraction` of channels by σ, Eq. 1-2), per variant:

- `sen`:  fixed, selected once on PGD pairs of `select_n` training images against a reference
          model (default the shipped vanilla checkpoint; "initial" = the model as training starts,
          e.g. the `init` checkpoint of a fine-tuning run);
- `dyn`:  as `sen` for the first epoch, then reselected at the start of every later epoch on
          `dyn_n` (200) random training images against the current model;
- `rand`: a seeded random `fraction` of the channels of each layer;
- `all`:  every channel of S;
- `brittle`: the SNS bridge of METHODS §6.5, L_adv + λ·Σ_{k∈B} ‖F_k(x) − F_k(x')‖₁ / dim(F_k) (Eq. 12
          with Ω = B): the brittle units (quadrant NRU, "non-robust & useful") of the reference
          model, found once by the feature dissection (`analysis.features`, the default run's
          budgets) on a fixed seeded probe of `units_n` training images with `units_reference_n`
          other training images for the standardisation. S = the layers holding a brittle unit,
          among `layers` (default: every conv layer at the hook point); `fraction` is unused.
          The card records Ω (layer -> unit ids) and how it was found (`units`).

Tensor shapes: x, x' (B, C, H, W) in [0, 1]; y (B,); layer outputs (B, C_l, H_l, W_l) or (B, C_l).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.features import QUICK_FEATURES, FeatureOptions, score_features
from ..analysis.pushback import UnitSets
from ..analysis.sensitivity import neuron_sensitivity, sensitive_neurons, top_k_count
from ..attacks import frozen
from ..data import Split
from ..errors import UserError
from ..models.layers import default_conv_layers, resolve_layer
from ..models.resolve import resolve_model
from .objectives import OBJECTIVES, StepOutput
from .robust import PAT

__all__ = ["SNS", "VARIANTS", "frozen_prefix", "parse_layers", "sns_loss"]

VARIANTS = ("sen", "dyn", "rand", "all", "brittle")
BASE_LOSSES = ("adv", "clean")
_TOP = re.compile(r"^top[-_ ]?(\d+)$")


def parse_layers(model: nn.Module, layers: str | int | Sequence[str], hook: str = "conv") -> list[str]:
    """S as layer names: an explicit list (aliases or module paths), a single name, or the top k
    conv layers at the hook point (`3`, "top3", "top-3"), in depth order."""
    if hook not in ("conv", "relu"):
        raise UserError(f"hook must be 'conv' or 'relu', got {hook!r}")
    k: int | None = None
    if isinstance(layers, int) and not isinstance(layers, bool):
        k = layers
    elif isinstance(layers, str):
        m = _TOP.match(layers.strip().lower())
        if m:
            k = int(m.group(1))
        else:
            layers = [layers]
    if k is not None:
        convs = default_conv_layers(model, hook)
        if not 1 <= k <= len(convs):
            raise UserError(f"cannot take the top {k} layers: the model has {len(convs)} conv layers")
        return convs[-k:]
    names = [str(n) for n in layers]  # type: ignore[union-attr]
    if not names:
        raise UserError("SNS needs at least one layer in S")
    for n in names:
        resolve_layer(model, n)
    return names


def frozen_prefix(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """Paths of the modules that come before the first layer of S in module order (excluding its
    ancestors). The unit of a hook point is its parent block when the hooked module is a norm or
    activation layer (conv4 -> `conv4.bn` -> block `conv4`), so the block's own conv stays trainable."""
    order = [name for name, _ in model.named_modules()]
    position = {name: i for i, name in enumerate(order)}
    modules = dict(model.named_modules())
    first: int | None = None
    for layer in layers:
        path = resolve_layer(model, layer)
        unit = path
        if "." in path and not isinstance(modules[path], nn.Conv2d | nn.Linear):
            unit = path.rsplit(".", 1)[0]
        first = position[unit] if first is None else min(first, position[unit])
    assert first is not None
    unit_path = order[first]
    return [n for n in order[1:first] if not unit_path.startswith(n + ".")]


@contextmanager
def _capture(model: nn.Module, paths: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that keep the (differentiable) outputs of `paths`; removed on exit."""
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for p in paths:

        def hook(_m: nn.Module, _i: object, out: object, p: str = p) -> None:
            if isinstance(out, torch.Tensor):
                outputs[p] = out

        handles.append(modules[p].register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def sns_loss(features: dict[str, torch.Tensor], omega: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """Eq. 12 on a concatenated forward: `features[path]` (2B, C, ...) holds the clean half then the
    adversarial half; `omega[path]` the selected channel ids. Sum over layers and neurons of the
    mean absolute difference per neuron, averaged over the B pairs; a scalar."""
    total: torch.Tensor | None = None
    for path, idx in omega.items():
        f = features[path]
        if f.shape[0] != 2 * batch:
            raise UserError(f"layer {path} returned a batch of {f.shape[0]}, expected {2 * batch}")
        diff = (f[:batch].index_select(1, idx) - f[batch:].index_select(1, idx)).abs().float()
        per = diff.flatten(2).mean(dim=2) if diff.dim() > 2 else diff  # (B, |Ω_l|)
        term = per.sum(dim=1).mean()
        total = term if total is None else total + term
    assert total is not None
    return total


@OBJECTIVES.register("sns", "Sensitive Neuron Stabilizing: L_adv + lambda * L_sns on the sensitive neurons of S "
                     "(variant brittle: the SNS bridge, Omega = the brittle units)")  # fmt: skip
class SNS(PAT):
    """SNS (see the module docstring). Options: layers (names, or k / "topk"; default "top3", or every
    conv layer of a model with fewer; for `brittle` every conv layer), variant (sen, dyn, rand, all,
    brittle), lam (λ, 5.0), hook (conv | relu), fraction (0.1), reference (checkpoint name/path or
    "initial"), select_n (training images for `sen`, None = all), dyn_n (200), freeze (True),
    base_loss ("adv": the PAT loss of `mix`; "clean": CE on clean images only), units_n (200) /
    units_reference_n (2000) / units_options (FeatureOptions overrides) for `brittle`, plus PAT's
    eps, steps, alpha, step_rule, random_start, mix, seed."""

    name = "sns"

    def __init__(
        self,
        eps: float = 0.1,
        steps: int = 10,
        lam: float = 5.0,
        layers: str | int | Sequence[str] | None = None,
        variant: str = "sen",
        hook: str = "conv",
        fraction: float = 0.1,
        reference: str = "fmnist-smallcnn-vanilla",
        select_n: int | None = 2000,
        dyn_n: int = 200,
        freeze: bool = True,
        base_loss: str = "adv",
        units_n: int = 200,
        units_reference_n: int = 2000,
        units_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(eps=eps, steps=steps, **kwargs)
        if variant not in VARIANTS:
            raise UserError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if base_loss not in BASE_LOSSES:
            raise UserError(f"base_loss must be one of {', '.join(BASE_LOSSES)}, got {base_loss!r}")
        if not 0 < fraction <= 1:
            raise UserError(f"fraction must be in (0, 1], got {fraction}")
        for name, v in (("units_n", units_n), ("units_reference_n", units_reference_n)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 2:
                raise UserError(f"{name} must be an integer >= 2, got {v!r}")
        self.lam = float(lam)
        self.layers_spec: str | int | list[str] | None = (
            layers if layers is None or isinstance(layers, str | int) else list(layers)
        )
        self.variant = variant
        self.hook = hook
        self.fraction = float(fraction)
        self.reference = reference
        self.select_n = select_n
        self.dyn_n = int(dyn_n)
        self.freeze = bool(freeze)
        self.base_loss = base_loss
        self.units_n = units_n
        self.units_reference_n = units_reference_n
        self.units_options = dict(units_options or {})
        self.units: dict[str, Any] = {}  # how Ω was found (variant brittle)
        self.layers: list[str] = []
        self.paths: list[str] = []
        self.frozen: list[str] = []
        self.omega: dict[str, torch.Tensor] = {}  # module path -> channel ids (|Ω_l|,) int64
        self._frozen_bn: list[nn.Module] = []
        self._train: Split | None = None

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, model: nn.Module, train: Split, device: torch.device) -> None:
        """Resolve S, freeze the layers below it and select Ω (called once before training)."""
        self._train = train
        brittle: dict[str, list[int]] = {}
        if self.variant == "brittle":
            brittle = self._brittle(self._reference(model), train, device)
            self.layers = list(brittle)
        else:
            self.layers = parse_layers(model, self._default_layers(model) if self.layers_spec is None
                                       else self.layers_spec, self.hook)  # fmt: skip
        self.paths = [resolve_layer(model, n) for n in self.layers]
        modules = dict(model.named_modules())
        self.frozen = frozen_prefix(model, self.layers) if self.freeze else []
        self._frozen_bn = []
        for name in self.frozen:
            mod = modules[name]
            for p in mod.parameters(recurse=False):
                p.requires_grad_(False)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                self._frozen_bn.append(mod)
        self._freeze_bn()
        channels = self._channels(model, train.x[:1].to(device))
        if self.variant == "all":
            self.omega = {p: torch.arange(c, device=device) for p, c in channels.items()}
        elif self.variant == "brittle":
            self.omega = {p: torch.tensor(brittle[n], dtype=torch.long, device=device)
                          for n, p in zip(self.layers, self.paths, strict=True)}  # fmt: skip
        elif self.variant == "rand":
            g = torch.Generator().manual_seed(self.seed)
            self.omega = {
                p: torch.randperm(c, generator=g)[: top_k_count(c, None, self.fraction)].sort().values.to(device)
                for p, c in channels.items()
            }
        else:
            ref = self._reference(model)
            self.omega = self._select(ref, train, self.select_n, self.seed, device)

    def _default_layers(self, model: nn.Module) -> str:
        """S by default: the top three conv layers at the hook point, or every one of a model with
        fewer (a small user model)."""
        count = len(default_conv_layers(model, self.hook))
        return f"top{min(3, count)}" if count else "top3"

    def _freeze_bn(self) -> None:
        for m in self._frozen_bn:
            m.eval()

    def _channels(self, model: nn.Module, x1: torch.Tensor) -> dict[str, int]:
        with _capture(model, self.paths) as feats, frozen(model), torch.no_grad():
            model(x1)
        return {p: int(feats[p].shape[1]) for p in self.paths}

    def _reference(self, model: nn.Module) -> nn.Module:
        if self.reference == "initial":
            ref = copy.deepcopy(model)
        else:
            ref, _card = resolve_model(self.reference)
            for n in self.layers:
                resolve_layer(ref, n)
            ref = ref.to(next(model.parameters()).device)
        return ref.eval()

    def _brittle(self, ref: nn.Module, train: Split, device: torch.device) -> dict[str, list[int]]:
        """Ω = B: layer -> sorted channel ids of the brittle (NRU) units of `ref`, by the feature
        dissection on the first `units_n` images of a seeded permutation of the training split
        (labels y), standardised on the next `units_reference_n` (all of them, if none are left)."""
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(train), generator=g)
        probe, rest = perm[: self.units_n], perm[self.units_n : self.units_n + self.units_reference_n]
        if len(rest) == 0:
            rest = perm[: self.units_reference_n]
        x, y = train.x[probe].to(device), train.y[probe].to(device)
        if self.layers_spec is None:
            layers = default_conv_layers(ref, self.hook, x[:1])
        else:
            layers = parse_layers(ref, self.layers_spec, self.hook)
        with torch.no_grad(), frozen(ref):
            k = int(ref(x[:1]).shape[1])
        opts = FeatureOptions(**{**QUICK_FEATURES, "n": None, "bootstrap": 0, "reference_n": len(rest),
                                 **self.units_options})  # fmt: skip
        with frozen(ref):
            fs = score_features(ref, x, y, train.x[rest].to(device), layers, opts, num_classes=k, seed=self.seed,
                                model_name=str(self.reference))  # fmt: skip
        sets = UnitSets.from_scores(fs)
        layer_of, unit = fs.layer_of, fs.unit
        found: dict[str, list[int]] = {}
        for i in sets.brittle.tolist():
            found.setdefault(layers[int(layer_of[i])], []).append(int(unit[i]))
        if not found:
            raise UserError(f"the reference model {self.reference} has no brittle (NRU) unit in {', '.join(layers)}; "
                            "the SNS bridge has nothing to stabilise")  # fmt: skip
        self.units = {
            "set": "brittle (NRU) units of the reference model", "probe": f"{len(probe)} training images",
            "reference_images": len(rest), "analysed_layers": layers, "tau_rho": fs.scores.tau_rho,
            "brittle": len(sets.brittle), "robust": len(sets.robust), "analysed_units": len(fs.scores.quadrant),
            "options": {k: v for k, v in fs.options.items() if k != "compare"},
        }  # fmt: skip
        return {n: sorted(found[n]) for n in layers if n in found}

    def _select(
        self, ref: nn.Module, train: Split, n: int | None, seed: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Ω: the top `fraction` of each layer of S by σ (Eq. 1) on PGD pairs of `n` random
        training images against `ref`."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(train), generator=g)[: (len(train) if n is None else n)]
        noise = torch.Generator(device=device).manual_seed(seed)
        xs, xas = [], []
        for start in range(0, len(idx), 256):
            sel = idx[start : start + 256]
            x, y = train.x[sel].to(device), train.y[sel].to(device)
            xs.append(x)
            xas.append(self.attack.perturb(ref, x, y, noise))
        with frozen(ref):
            result = neuron_sensitivity(ref, (torch.cat(xs), torch.cat(xas)), self.layers)
        picked = sensitive_neurons(result, fraction=self.fraction)
        return {
            path: torch.as_tensor(np.sort(picked[name]), dtype=torch.long, device=device)
            for name, path in zip(self.layers, self.paths, strict=True)
        }

    # -- training ------------------------------------------------------------------------------
    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        super().on_epoch_start(model, epoch)
        self._freeze_bn()
        if self.variant == "dyn" and epoch > 0:
            if self._train is None:
                raise UserError("sns: setup(model, train_split, device) must run before training")
            device = next(model.parameters()).device
            self.omega = self._select(model, self._train, self.dyn_n, self.seed * 1_000_003 + epoch, device)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        if not self.omega:
            raise UserError("sns: setup(model, train_split, device) must run before training")
        self._freeze_bn()
        x_adv = self.pgd(model, x, y)
        with _capture(model, self.paths) as feats:
            logits = model(torch.cat([x, x_adv]))
        clean, adv = logits[: len(x)], logits[len(x) :]
        if self.base_loss == "clean":
            base = F.cross_entropy(clean, y)
        elif self.mix == "adv":
            base = F.cross_entropy(adv, y)
        else:
            base = 0.5 * F.cross_entropy(clean, y) + 0.5 * F.cross_entropy(adv, y)
        l_sns = sns_loss(feats, self.omega, len(x))
        return StepOutput(base + self.lam * l_sns, clean, {"sns": float(l_sns.detach())})

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "lam": self.lam,
            "variant": self.variant,
            "layers": list(self.layers) or self.layers_spec,
            "hook": self.hook,
            "fraction": self.fraction,
            "reference": self.reference,
            "select_n": self.select_n,
            "dyn_n": self.dyn_n,
            "frozen": list(self.frozen),
            "base_loss": self.base_loss,
            **({"units": self.units} if self.variant == "brittle" else {}),
            "omega": {
                n: self.omega[p].tolist() for n, p in zip(self.layers, self.paths, strict=True) if p in self.omega
            },
        }
