"""Streaming per-channel statistics of (clean, adversarial) activation pairs (Eq. 1 and Eq. 11 of
the neuron-sensitivity paper): `PairStats`, and `probe_pairs`, which reduces every requested layer
during one pass over the pairs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..errors import ReusedModuleError, UserError
from ..modelutil import eval_mode, model_device
from .hooks import _per_channel, gated, record

__all__ = [
    "PairBatch",
    "PairBatchStats",
    "PairStats",
    "Pairs",
    "SelectFn",
    "iter_pair_batches",
    "probe_pairs",
]

PairBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
Pairs = tuple[torch.Tensor, ...] | Sequence[Sequence[torch.Tensor]] | Iterable[Sequence[torch.Tensor]]
SelectFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _acc_device(t: torch.Tensor) -> torch.device:
    # float64 accumulators live next to the activations, except where float64 is unsupported
    return torch.device("cpu") if t.device.type == "mps" else t.device


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
                if rec.calls[name] > 1:
                    raise ReusedModuleError(rec.paths[name], rec.calls[name], name)
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
