"""Record and intervene on named layers with forward hooks; streaming, mergeable statistics.

    with record(model, ["conv1", "relu1"]) as rec:
        model(x)
    rec.outputs["relu1"]                       # (B, C, H, W), a detached copy

    stats = probe_pairs(model, (x, x_adv), ["conv1", "relu1"])
    stats["conv1"].sigma()                     # (C,) Eq. 1 of the neuron-sensitivity paper

    with intervene(model, [scale_channels("relu3", [4, 9], beta=0.8)]):
        model(x)                               # channels 4 and 9 of relu3 scaled by 0.8

Layers are named by alias (zoo models: conv1, relu1, pool1, gap, fc1, ...) or by
`named_modules()` path. A *neuron* is one channel (dim 1) of a layer output of shape
(B, C, *spatial); fc outputs (B, C) have no spatial part (dim = 1).

Every reducer here keeps per-channel sums whose size does not depend on the number of images,
and `merge` combines two shards into the statistics of their union (exactly for counts and
top-k, up to float64 rounding for sums), so sharded runs combine with `functools.reduce`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypeVar

import torch
from torch import nn

from .errors import UserError
from .models.layers import resolve_layer

__all__ = [
    "ActivationStats",
    "ChannelEdit",
    "ChannelHistogram",
    "ChannelRange",
    "PairBatchStats",
    "PairStats",
    "Recording",
    "RunningTopK",
    "Welford",
    "activation_stats",
    "channel_quantiles",
    "eval_mode",
    "gated",
    "intervene",
    "iter_pair_batches",
    "model_device",
    "probe_pairs",
    "record",
    "replace_channels",
    "scale_channels",
    "spatial_reduce",
    "zero_channels",
]

T = TypeVar("T")
LayerCallback = Callable[[str, torch.Tensor], None]
PairBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
Pairs = tuple[torch.Tensor, ...] | Sequence[Sequence[torch.Tensor]] | Iterable[Sequence[torch.Tensor]]
SelectFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


# --------------------------------------------------------------------------------------------
# helpers


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for stateless modules)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each module's own training flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


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


def _acc_device(t: torch.Tensor) -> torch.device:
    # float64 accumulators live next to the activations, except where float64 is unsupported
    return torch.device("cpu") if t.device.type == "mps" else t.device


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
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    paths = {name: resolve_layer(model, name) for name in names}
    modules = dict(model.named_modules())
    rec = Recording(paths=paths, calls=dict.fromkeys(names, 0))
    handles: list[torch.utils.hooks.RemovableHandle] = []

    if capture not in ("output", "input"):
        raise UserError(f"capture must be 'output' or 'input', got {capture!r}")

    def seen(name: str, value: object) -> None:
        if not rec.enabled:
            return
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

    try:
        for name, path in paths.items():
            if capture == "output":
                handles.append(modules[path].register_forward_hook(make_hook(name)))
            else:
                handles.append(modules[path].register_forward_pre_hook(make_pre_hook(name)))
        yield rec
    finally:
        for h in handles:
            h.remove()


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


# --------------------------------------------------------------------------------------------
# pair statistics (Eq. 1 and Eq. 11)


_CHUNK_ELEMENTS = 1 << 19  # 2 MiB of float32 per chunk: mostly cache-resident


class _Scratch:
    """A reusable flat buffer (allocating large temporaries per batch costs page faults)."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        b = self.buf
        if b is None or b.numel() < numel or b.dtype != dtype or b.device != device:
            b = self.buf = torch.empty(numel, dtype=dtype, device=device)
        return b


class PairBatchStats(NamedTuple):
    """Per-image, per-channel quantities of one batch of pairs: `packed` (3, B, C) holds
    ||F(x) - F(x')||_1, ||F(x)||_1 and |sum_hw (F(x) - F(x'))| per image and channel; `dim` is
    the number of spatial positions."""

    packed: torch.Tensor
    dim: int

    @property
    def l1_diff(self) -> torch.Tensor:
        return self.packed[0]

    @property
    def l1_clean(self) -> torch.Tensor:
        return self.packed[1]

    @property
    def mean_diff(self) -> torch.Tensor:
        """|mean_hw F(x) - mean_hw F(x')|, (B, C)."""
        return self.packed[2] / self.dim


class PairStats:
    """Streaming per-channel statistics of one layer over (clean, adversarial) activation pairs.

    Keeps float64 sums of shape (C,): sum_i ||dF_i||_1, sum_i ||F(x_i)||_1, sum_i |mean dF_i|,
    and the zero-safe per-image ratio sum over images with ||F(x_i)||_1 > 0 (plus their count).
    """

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = eps
        self.n = 0
        self.dim = 0
        self.channels = 0
        # rows: sum ||dF||_1, sum ||F(x)||_1, sum |sum_hw dF|, sum of per-image ratios
        self.sums = torch.zeros(4, 0, dtype=torch.float64)
        self.n_ratio = torch.zeros(0, dtype=torch.int64)

    @property
    def sum_l1_diff(self) -> torch.Tensor:
        return self.sums[0]

    @property
    def sum_l1_clean(self) -> torch.Tensor:
        return self.sums[1]

    @property
    def sum_mean_diff(self) -> torch.Tensor:
        return self.sums[2] / max(self.dim, 1)

    @property
    def sum_ratio(self) -> torch.Tensor:
        return self.sums[3]

    @staticmethod
    def batch_stats(clean: torch.Tensor, adv: torch.Tensor, scratch: _Scratch | None = None) -> PairBatchStats:
        """Per-image quantities of a batch: clean, adv (B, C, *spatial) -> packed (3, B, C).

        Works through the batch in cache-sized chunks with one reusable scratch buffer, so the
        cost stays a small fraction of the forward pass that produced the activations."""
        if clean.shape != adv.shape:
            raise UserError(
                f"clean and adversarial activations differ in shape: {tuple(clean.shape)} vs {tuple(adv.shape)}"
            )
        a, b = _per_channel(clean), _per_channel(adv)
        n_img, c, dim = a.shape
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        packed = torch.empty(3, n_img, c, dtype=acc, device=a.device)
        limit = _CHUNK_ELEMENTS if a.device.type == "cpu" else _CHUNK_ELEMENTS << 8
        chunk = max(1, min(n_img, limit // max(1, c * dim)))
        buf = (scratch or _Scratch()).get(chunk * c * dim, a.dtype, a.device)
        for s in range(0, n_img, chunk):
            e = min(n_img, s + chunk)
            d = buf[: (e - s) * c * dim].view(e - s, c, dim)
            torch.sub(a[s:e], b[s:e], out=d)
            torch.sum(d, -1, dtype=acc, out=packed[2, s:e])
            torch.sum(d.abs_(), -1, dtype=acc, out=packed[0, s:e])
            torch.sum(torch.abs(a[s:e], out=d), -1, dtype=acc, out=packed[1, s:e])
        packed[2].abs_()
        return PairBatchStats(packed, dim)

    @classmethod
    def concat_stats(cls, output: torch.Tensor, scratch: _Scratch | None = None) -> PairBatchStats:
        """Per-image quantities of a concatenated [clean; adversarial] output of 2B rows."""
        if output.shape[0] % 2:
            raise UserError(f"expected a [clean; adversarial] batch, got {output.shape[0]} rows")
        h = output.shape[0] // 2
        return cls.batch_stats(output[:h], output[h:], scratch)

    def add(self, b: PairBatchStats, mask: torch.Tensor | None = None) -> None:
        """Accumulate a batch; `mask` (B,) bool keeps only some images."""
        packed = b.packed
        if mask is not None:
            packed = packed[:, mask.to(packed.device)]
        if self.channels == 0:
            self.channels, self.dim = packed.shape[2], b.dim
            dev = _acc_device(packed)
            self.sums = torch.zeros(4, self.channels, dtype=torch.float64, device=dev)
            self.n_ratio = torch.zeros(self.channels, dtype=torch.int64, device=dev)
        elif (packed.shape[2], b.dim) != (self.channels, self.dim):
            raise UserError(
                f"activation shape changed between batches: {self.channels} channels x {self.dim} positions, "
                f"then {packed.shape[2]} x {b.dim}"
            )
        p = packed.to(self.sums.device, torch.float64)
        d, c = p[0], p[1]
        valid = c > 0
        ratio = torch.where(valid, d / (c + self.eps), 0.0).sum(0, keepdim=True)
        self.n += int(p.shape[1])
        self.sums += torch.cat([p.sum(1), ratio])
        self.n_ratio += valid.sum(0)

    def update(self, clean: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate clean and adversarial activations, each (B, C, *spatial)."""
        self.add(self.batch_stats(clean, adv), mask)

    def merge(self, other: PairStats) -> PairStats:
        """Statistics of the union of both shards (a new object)."""
        if self.channels == 0:
            return other.copy()
        if other.channels == 0:
            return self.copy()
        if (self.channels, self.dim) != (other.channels, other.dim):
            raise UserError("cannot merge statistics of layers with different shapes")
        out = self.copy()
        out.n += other.n
        out.sums += other.sums.to(out.sums.device)
        out.n_ratio += other.n_ratio.to(out.n_ratio.device)
        return out

    def copy(self) -> PairStats:
        out = PairStats(self.eps)
        out.n, out.dim, out.channels = self.n, self.dim, self.channels
        out.sums, out.n_ratio = self.sums.clone(), self.n_ratio.clone()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that round-trip through `from_state_dict` (e.g. via safetensors)."""
        return {
            "meta": torch.tensor([self.n, self.dim, self.channels], dtype=torch.int64),
            "eps": torch.tensor([self.eps], dtype=torch.float64),
            "sums": self.sums.cpu(),
            "n_ratio": self.n_ratio.cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> PairStats:
        out = cls(float(state["eps"][0]))
        out.n, out.dim, out.channels = (int(v) for v in state["meta"].tolist())
        out.sums = state["sums"].to(torch.float64).clone()
        out.n_ratio = state["n_ratio"].to(torch.int64).clone()
        return out

    def sigma(self) -> torch.Tensor:
        """Eq. 1: (1/N) sum_i ||F(x_i) - F(x'_i)||_1 / dim, shape (C,) float64."""
        if self.n == 0:
            return self.sum_l1_diff.cpu().clone()
        return (self.sum_l1_diff / (self.n * self.dim)).cpu()

    def sigma_mindarmour(self) -> torch.Tensor:
        """(1/N) sum_i |mean_hw F(x_i) - mean_hw F(x'_i)|, shape (C,); MindArmour's NeuronMetric
        reports N times this (a sum over the batch)."""
        if self.n == 0:
            return self.sums[2].cpu().clone()
        return (self.sums[2] / (self.n * self.dim)).cpu()

    def ratio_mean(self) -> torch.Tensor:
        """Eq. 11 as the mean of per-image ratios ||dF||_1 / (||F(x)||_1 + eps) over images with
        ||F(x)||_1 > 0; 0 for channels where no image qualifies. Shape (C,)."""
        n = self.n_ratio.to(torch.float64)
        return torch.where(n > 0, self.sum_ratio / n.clamp_min(1), torch.zeros_like(n)).cpu()

    def ratio_of_sums(self) -> torch.Tensor:
        """sum_i ||dF_i||_1 / sum_i ||F(x_i)||_1 (0 where the denominator is 0). Shape (C,)."""
        den = self.sum_l1_clean
        return torch.where(den > 0, self.sum_l1_diff / den.clamp_min(self.eps), torch.zeros_like(den)).cpu()

    def ratio_count(self) -> torch.Tensor:
        """Per channel, the number of images that entered `ratio_mean`. Shape (C,) int64."""
        return self.n_ratio.cpu().clone()


def iter_pair_batches(pairs: Pairs, batch_size: int = 256) -> Iterator[PairBatch]:
    """Normalise pair inputs to (x, x_adv, y or None) batches.

    `pairs` is either a tuple of full tensors `(x, x_adv)` or `(x, x_adv, y)` (split into
    batches of `batch_size`), or an iterable of such batches.
    """
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if isinstance(pairs, (tuple, list)) and len(pairs) in (2, 3) and all(isinstance(p, torch.Tensor) for p in pairs):
        x, xa = pairs[0], pairs[1]
        y = pairs[2] if len(pairs) == 3 else None
        assert isinstance(x, torch.Tensor) and isinstance(xa, torch.Tensor)
        if x.shape != xa.shape:
            raise UserError(f"clean and adversarial images differ in shape: {tuple(x.shape)} vs {tuple(xa.shape)}")
        for s in range(0, x.shape[0], batch_size):
            yb = y[s : s + batch_size] if isinstance(y, torch.Tensor) else None
            yield x[s : s + batch_size], xa[s : s + batch_size], yb
        return
    for batch in pairs:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise UserError("each pair batch must be (x, x_adv) or (x, x_adv, y)")
        x, xa = batch[0], batch[1]
        if x.shape != xa.shape:
            raise UserError(f"clean and adversarial images differ in shape: {tuple(x.shape)} vs {tuple(xa.shape)}")
        yield x, xa, (batch[2] if len(batch) == 3 else None)


def probe_pairs(
    model: nn.Module,
    pairs: Pairs,
    layers: Sequence[str],
    *,
    batch_size: int = 64,
    select: SelectFn | None = None,
    eps: float = 1e-12,
) -> dict[str, PairStats]:
    """Per-layer `PairStats` over (clean, adversarial) pairs, in one pass over the data.

    Each batch of B pairs runs as ONE forward pass of the concatenated [x; x_adv] (2B images,
    model in eval mode, no grad); the hook of each layer splits its output in halves and reduces
    it to (B, C) on the spot, so memory does not grow with N. `select(logits_clean, logits_adv,
    y) -> (B,) bool` keeps only some pairs (e.g. the successful ones).
    Returns {layer name: PairStats}.
    """
    names = list(dict.fromkeys(layers))
    if not names:
        raise UserError("no layers given; name at least one layer")
    device = model_device(model)
    stats = {name: PairStats(eps) for name in names}
    scratch = _Scratch()  # shared: the hooks run one after the other
    pending: dict[str, PairBatchStats] = {}

    def on_output(name: str, out: torch.Tensor) -> None:
        pending[name] = PairStats.concat_stats(out, scratch)

    with eval_mode(model), torch.no_grad(), record(model, names, on_output, keep=False) as rec:
        for x, xa, y in gated(rec, iter_pair_batches(pairs, batch_size)):
            if x.shape[0] == 0:
                continue
            rec.reset()
            pending.clear()
            h = x.shape[0]
            logits = model(torch.cat([x, xa]).to(device))
            for name in names:
                if rec.calls[name] != 1:
                    raise UserError(
                        f"layer '{name}' ran {rec.calls[name]} times in one forward pass; "
                        "hook a module that runs exactly once per pass"
                    )
            mask = None
            if select is not None:
                mask = select(logits[:h], logits[h:], None if y is None else y.to(device))
            for name in names:
                stats[name].add(pending[name], mask)
    return stats


# --------------------------------------------------------------------------------------------
# generic per-channel reducers


class Welford:
    """Streaming per-channel mean and variance of (B, C) values (Chan et al.'s parallel form)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = torch.zeros(0, dtype=torch.float64)
        self.m2 = torch.zeros(0, dtype=torch.float64)

    def update(self, values: torch.Tensor) -> None:
        """values: (B, C) (e.g. `spatial_reduce(activation)`)."""
        if values.ndim != 2:
            raise UserError(f"Welford.update expects (B, C) values, got {tuple(values.shape)}")
        v = values.detach().to(torch.float64)
        nb = int(v.shape[0])
        if nb == 0:
            return
        bmean = v.mean(0)
        bm2 = ((v - bmean) ** 2).sum(0)
        self._combine(nb, bmean, bm2)

    def _combine(self, nb: int, bmean: torch.Tensor, bm2: torch.Tensor) -> None:
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, bmean.clone(), bm2.clone()
            return
        bmean, bm2 = bmean.to(self.mean.device), bm2.to(self.mean.device)
        n = self.n + nb
        delta = bmean - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + bm2 + delta**2 * (self.n * nb / n)
        self.n = n

    def merge(self, other: Welford) -> Welford:
        out = Welford()
        out.n, out.mean, out.m2 = self.n, self.mean.clone(), self.m2.clone()
        if other.n:
            out._combine(other.n, other.mean, other.m2)
        return out

    def variance(self, ddof: int = 0) -> torch.Tensor:
        """Per-channel variance (C,); 0 where fewer than ddof + 1 values were seen."""
        if self.n <= ddof:
            return torch.zeros_like(self.mean).cpu()
        return (self.m2 / (self.n - ddof)).cpu()

    def std(self, ddof: int = 0) -> torch.Tensor:
        return self.variance(ddof).sqrt()


class RunningTopK:
    """Per-channel running top-k of (B, C) scores with the indices of the images they came from.

    Ties are broken by the smaller image index, so results do not depend on batching or sharding.
    `values` and `indices` are (C, k') with k' = min(k, images seen), best first.
    """

    def __init__(self, k: int, largest: bool = True) -> None:
        if k <= 0:
            raise UserError(f"top-k needs k >= 1, got {k}")
        self.k, self.largest = k, largest
        self.values = torch.zeros(0, 0)
        self.indices = torch.zeros(0, 0, dtype=torch.long)
        self.seen = 0

    def update(self, scores: torch.Tensor, index: torch.Tensor | int | None = None) -> None:
        """scores (B, C); `index` = (B,) global image indices, or the offset of the first image
        (default: continue after the images seen so far)."""
        if scores.ndim != 2:
            raise UserError(f"RunningTopK.update expects (B, C) scores, got {tuple(scores.shape)}")
        s = scores.detach().float().cpu()
        b, c = s.shape
        if index is None or isinstance(index, int):
            start = self.seen if index is None else index
            idx = torch.arange(start, start + b, dtype=torch.long)
        else:
            idx = index.detach().long().cpu()
        self.seen += b
        vals = s.t()
        inds = idx.unsqueeze(0).expand(c, b)
        if self.values.numel():
            vals = torch.cat([self.values, vals], 1)
            inds = torch.cat([self.indices, inds], 1)
        self.values, self.indices = self._select(vals, inds)

    def _select(self, vals: torch.Tensor, inds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o1 = torch.argsort(inds, dim=1, stable=True)
        vals, inds = vals.gather(1, o1), inds.gather(1, o1)
        o2 = torch.argsort(vals, dim=1, descending=self.largest, stable=True)[:, : self.k]
        return vals.gather(1, o2), inds.gather(1, o2)

    def merge(self, other: RunningTopK) -> RunningTopK:
        out = RunningTopK(self.k, self.largest)
        out.seen = self.seen + other.seen
        parts = [t for t in (self, other) if t.values.numel()]
        if not parts:
            return out
        vals = torch.cat([p.values for p in parts], 1)
        inds = torch.cat([p.indices for p in parts], 1)
        out.values, out.indices = out._select(vals, inds)
        return out


class ChannelRange:
    """Per-channel min and max over every value of (B, C, *spatial) activations."""

    def __init__(self) -> None:
        self.lo = torch.zeros(0, dtype=torch.float64)
        self.hi = torch.zeros(0, dtype=torch.float64)

    def update(self, a: torch.Tensor) -> None:
        flat = _per_channel(a.detach()).transpose(0, 1).reshape(a.shape[1], -1)
        if flat.shape[1] == 0:
            return
        lo, hi = flat.amin(1).double().cpu(), flat.amax(1).double().cpu()
        if self.lo.numel() == 0:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def merge(self, other: ChannelRange) -> ChannelRange:
        out = ChannelRange()
        parts = [p for p in (self, other) if p.lo.numel()]
        if parts:
            out.lo = torch.stack([p.lo for p in parts]).amin(0)
            out.hi = torch.stack([p.hi for p in parts]).amax(0)
        return out


class ChannelHistogram:
    """Per-channel fixed-bin histogram of every activation value, for streaming quantiles.

    Bins span [lo, hi] per channel (values outside are clamped into the end bins); `quantile`
    interpolates linearly inside a bin, so its error is at most one bin width (hi - lo) / bins.
    Counts merge exactly when the bin edges agree.
    """

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, bins: int = 2048) -> None:
        if bins < 1:
            raise UserError(f"histogram needs at least one bin, got {bins}")
        self.lo = lo.detach().double().cpu().clone()
        self.hi = torch.maximum(hi.detach().double().cpu(), self.lo)
        self.bins = bins
        self.counts = torch.zeros(self.lo.numel(), bins, dtype=torch.int64)

    def update(self, a: torch.Tensor) -> None:
        c = self.lo.numel()
        if a.shape[1] != c:
            raise UserError(f"histogram has {c} channels, activation has {a.shape[1]}")
        v = _per_channel(a.detach()).transpose(0, 1).reshape(c, -1).double().cpu()
        width = self.hi - self.lo
        scale = torch.where(width > 0, self.bins / width.clamp_min(1e-300), torch.zeros_like(width))
        b = ((v - self.lo[:, None]) * scale[:, None]).floor().clamp_(0, self.bins - 1).long()
        b += torch.arange(c).unsqueeze(1) * self.bins
        self.counts += torch.bincount(b.flatten(), minlength=c * self.bins).view(c, self.bins)

    def merge(self, other: ChannelHistogram) -> ChannelHistogram:
        if not (torch.equal(self.lo, other.lo) and torch.equal(self.hi, other.hi)):
            raise UserError("cannot merge histograms with different bin edges")
        out = ChannelHistogram(self.lo, self.hi, self.bins)
        out.counts = self.counts + other.counts
        return out

    def quantile(self, q: float) -> torch.Tensor:
        """Per-channel q-quantile (C,) float64, 0 <= q <= 1."""
        if not 0.0 <= q <= 1.0:
            raise UserError(f"quantile must lie in [0, 1], got {q}")
        counts = self.counts.double()
        total = counts.sum(1)
        cdf = counts.cumsum(1)
        target = q * total
        b = torch.searchsorted(cdf, target.unsqueeze(1)).squeeze(1).clamp_(0, self.bins - 1)
        before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp_min(0)[:, None]).squeeze(1), 0.0)
        inbin = counts.gather(1, b[:, None]).squeeze(1)
        frac = torch.where(inbin > 0, (target - before) / inbin.clamp_min(1), torch.zeros_like(inbin))
        width = (self.hi - self.lo) / self.bins
        return self.lo + (b.double() + frac.clamp(0, 1)) * width


def channel_quantiles(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    q: float,
    *,
    channels: Sequence[int] | None = None,
    batch_size: int = 256,
    bins: int = 4096,
) -> torch.Tensor:
    """Per-channel q-quantile of every activation value of `layer` over images x (N, C, H, W).

    Two streaming passes (range, then histogram); returns (C,) or (len(channels),) float64.
    """
    device = model_device(model)
    sel = None if channels is None else torch.tensor(list(channels), dtype=torch.long)

    def acts() -> Iterator[torch.Tensor]:
        with eval_mode(model), torch.no_grad(), record(model, [layer]) as rec:
            for s in range(0, x.shape[0], batch_size):
                model(x[s : s + batch_size].to(device))
                a = rec.outputs[layer]
                yield a if sel is None else a.index_select(1, sel.to(a.device))

    rng = ChannelRange()
    for a in acts():
        rng.update(a)
    if rng.lo.numel() == 0:
        raise UserError("no images given for the quantile")
    hist = ChannelHistogram(rng.lo, rng.hi, bins)
    for a in acts():
        hist.update(a)
    if math.isclose(q, 1.0):
        return rng.hi.clone()
    if q == 0.0:
        return rng.lo.clone()
    return hist.quantile(q)


@dataclass
class ActivationStats:
    """Streaming statistics of one layer over images: `moments` (Welford) and `top` (running
    top-k with image indices) of the per-channel scalar response, `range` of all values."""

    moments: Welford
    range: ChannelRange
    top: RunningTopK | None


def activation_stats(
    model: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    layers: Sequence[str],
    *,
    how: Literal["mean", "max"] = "mean",
    top_k: int = 0,
    batch_size: int = 128,
) -> dict[str, ActivationStats]:
    """One streaming pass over images x (N, C, H, W) (or an iterable of batches): per layer the
    mean/variance and (with `top_k` > 0) the top-k images of each channel's scalar response
    (`how`: mean or max over space), and the range of all activation values."""
    names = list(dict.fromkeys(layers))
    out = {n: ActivationStats(Welford(), ChannelRange(), RunningTopK(top_k) if top_k > 0 else None) for n in names}
    device = model_device(model)
    batches: Iterable[torch.Tensor] = (
        (images[s : s + batch_size] for s in range(0, images.shape[0], batch_size))
        if isinstance(images, torch.Tensor)
        else images
    )

    def on_output(name: str, a: torch.Tensor) -> None:
        st = out[name]
        r = spatial_reduce(a, how)
        st.moments.update(r)
        st.range.update(a)
        if st.top is not None:
            st.top.update(r)

    with eval_mode(model), torch.no_grad(), record(model, names, on_output, keep=False) as rec:
        for xb in gated(rec, batches):
            model(xb.to(device))
    return out
