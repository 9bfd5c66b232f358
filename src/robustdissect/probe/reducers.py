"""Generic streaming, mergeable per-channel reducers (Welford moments, running top-k, range,
fixed-bin histograms for quantiles) and the one-pass drivers `channel_quantiles` and
`activation_stats`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import UserError
from ..modelutil import eval_mode, model_device
from .hooks import _per_channel, gated, record, spatial_reduce

__all__ = [
    "ActivationStats",
    "ChannelHistogram",
    "ChannelRange",
    "RunningTopK",
    "Welford",
    "activation_stats",
    "channel_quantiles",
]


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
