"""One-pass per-channel quantiles with a stated error bound, for thresholds such as Network
Dissection's top-0.5% level (METHODS §4.1 item 1).

`StreamingQuantile` keeps a fixed number of equal-width bins per channel whose range grows by
powers of two as new values arrive (old bins merge exactly into the coarser ones), so one pass
suffices and memory is (C, bins) whatever the number of images. Its `quantile`
follows `torch.quantile`'s linear interpolation between the order statistics at rank q·(n−1); each
of the two order statistics is estimated inside the bin that holds it, so

    |quantile_estimate − torch.quantile(values, q)| ≤ width   (per channel, `width` reported)

where `width` ≤ 2·(max − min)/bins once the range has grown past the first batch's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UserError

__all__ = ["StreamingQuantile", "flat_nonzero"]


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """(n,) int64 positions of the True entries of `mask` in its flattened (row-major) order:
    `mask.reshape(-1).nonzero().squeeze(1)`, through NumPy on the CPU (several times faster for
    sparse masks)."""
    if mask.device.type != "cpu":
        return mask.reshape(-1).nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


class StreamingQuantile:
    """Per-channel histogram with a growing range. `update(values)` takes (C, M) values,
    `update_maps(maps)` (B, C, *spatial) maps without reshaping them.

    `tail=t` (e.g. 0.02) bins only the upper tail exactly: once at least `t` of the values seen
    lie above it, the bins below a per-channel cut are folded into one count (`below`), and later
    values under the cut are only counted, not binned. Every bin at or above the cut holds
    exactly what the full histogram holds, so `quantile(q)` is identical to the full sketch's
    wherever `covers(q)` (the rank lies above the folded values) and raises elsewhere. This is
    the cheap form for a top-quantile threshold (Network Dissection's 0.995): a comparison per
    value instead of float64 binning of all of them.
    """

    SAMPLE = 1 << 14  # values per channel that place the first cut
    SLACK = 1 / 32  # share of the bins kept exact below the tail: each doubling of the range halves it

    def __init__(self, bins: int = 2048, tail: float | None = None) -> None:
        if bins < 2:
            raise UserError(f"a streaming quantile needs at least 2 bins, got {bins}")
        if tail is not None and not 0.0 < tail < 1.0:
            raise UserError(f"tail must lie in (0, 1), got {tail}")
        self.bins = bins
        self.tail = tail
        self.lo = torch.zeros(0, dtype=torch.float64)
        self.width = torch.zeros(0, dtype=torch.float64)
        self.counts = torch.zeros(0, bins, dtype=torch.int64)
        self.below = torch.zeros(0, dtype=torch.int64)  # values under `cut`, not binned
        self.cut = torch.zeros(0, dtype=torch.int64)  # first exact bin per channel (0: all exact)
        self._next_raise = 0

    @property
    def n(self) -> torch.Tensor:
        """(C,) values seen per channel."""
        return self.counts.sum(1) + self.below

    def update(self, values: torch.Tensor) -> None:
        """values: (C, M), M values of each channel (e.g. every position of every image)."""
        if values.ndim != 2:
            raise UserError(f"StreamingQuantile.update expects (C, M) values, got {tuple(values.shape)}")
        self._update(values, 0)

    def update_maps(self, maps: torch.Tensor, map_max: torch.Tensor | None = None) -> None:
        """maps: (B, C, *spatial), every value of channel c (dim 1) counts for channel c; the same
        as `update(maps.transpose(0, 1).reshape(C, -1))` without the copy. `map_max` (B, C): the
        maps' maxima, if the caller has them already."""
        if maps.ndim < 2:
            raise UserError(f"StreamingQuantile.update_maps expects (B, C, ...) maps, got {tuple(maps.shape)}")
        self._update(maps, 1, map_max)

    def _update(self, values: torch.Tensor, cdim: int, map_max: torch.Tensor | None = None) -> None:
        v = values.detach().cpu()
        c = int(v.shape[cdim])
        lead = math.prod(int(d) for d in v.shape[:cdim])
        v = v.reshape(lead, c, -1)  # (B, C, S): B maps of S values per channel
        if v.numel() == 0:
            return
        map_min = v.amin(2)
        map_max = v.amax(2) if map_max is None else map_max.detach().cpu().reshape(lead, c).to(v.dtype)
        vmin, vmax = map_min.amin(0).double(), map_max.amax(0).double()  # NaN propagates into both
        if not (torch.isfinite(vmin).all() and torch.isfinite(vmax).all()):
            raise UserError("activations contain NaN or infinite values; no quantile can be taken")
        if self.lo.numel() == 0:
            self.lo = vmin.clone()
            span = vmax - vmin
            floor = 1e-9 * vmax.abs().clamp_min(1.0)
            # a little headroom so that the maximum falls inside the last bin
            self.width = torch.maximum(span * (1 + 1e-6) / self.bins, floor)
            self.counts = torch.zeros(c, self.bins, dtype=torch.int64)
            self.below = torch.zeros(c, dtype=torch.int64)
            self.cut = torch.zeros(c, dtype=torch.int64)
        elif c != self.lo.numel():
            raise UserError(f"StreamingQuantile has {self.lo.numel()} channels, got {c}")
        self._grow(vmin, vmax)
        if self.tail is not None and not bool(self.cut.any()):
            # no cut yet: place one from a sample of these values at random (map, position)
            # pairs (a fixed stride would sample the same positions of every map, biased where
            # values depend on the position, e.g. at borders); whether the cut is safe is decided
            # from exact counts later (`covers`), so the sample only saves binning every value
            m_all = v.shape[0] * v.shape[2]
            if m_all > self.SAMPLE:
                pick = torch.randint(0, m_all, (self.SAMPLE,), generator=torch.Generator().manual_seed(0))
                sample = v[torch.div(pick, v.shape[2], rounding_mode="floor"), :, pick % v.shape[2]].t()  # (C, n)
            else:
                sample = v.transpose(0, 1).reshape(c, -1)
            sb = ((sample.double() - self.lo[:, None]) / self.width[:, None]).floor_().clamp_(0, self.bins - 1).long()
            sb += (torch.arange(c) * self.bins)[:, None]
            hist = torch.bincount(sb.flatten(), minlength=c * self.bins).view(c, self.bins).double()
            self._raise_cut(self.counts + hist * (v.shape[0] * v.shape[2] / sample.shape[1]), 2 * self.tail)
        if not bool(self.cut.any()):
            lo, width = self.lo.view(1, c, 1), self.width.view(1, c, 1)
            b = ((v.double() - lo) / width).floor_().clamp_(0, self.bins - 1).long()
            b += (torch.arange(c) * self.bins).view(1, c, 1)
            self.counts += torch.bincount(b.flatten(), minlength=c * self.bins).view(c, self.bins)
        else:
            self._update_tail(v, map_max)
        if self.tail is not None and int(self.n.max()) >= self._next_raise:
            self._raise_cut(self.counts, self.tail)
            self._next_raise = 2 * int(self.n.max())  # raised again once n doubled

    def _update_tail(self, v: torch.Tensor, map_max: torch.Tensor) -> None:
        """v (B, C, S): bin exactly the values at or above each channel's cut, count the rest in
        `below`. Only maps whose maximum reaches the cut are scanned."""
        c = v.shape[1]
        edge = self.lo + self.cut.double() * self.width  # the cut bin's lower edge
        # a bound under the edge in v's precision: every value whose bin is >= cut passes it (the
        # binning's two roundings move a value by far less than the margin)
        margin = 1e-9 * (self.lo.abs() + self.width * self.bins + edge.abs()) + 1e-300
        gate64 = edge - margin
        gate = gate64.to(v.dtype if v.dtype.is_floating_point else torch.float64)
        gate = torch.where(gate.double() > gate64, torch.nextafter(gate, torch.full_like(gate, -math.inf)), gate)
        gate = torch.where(self.cut > 0, gate, torch.full_like(gate, -math.inf))
        hot = flat_nonzero(map_max >= gate)  # maps b·C + c that reach the cut
        hot_c = hot % c
        sub = v.view(-1, v.shape[2]).index_select(0, hot)  # (M, S)
        sel = flat_nonzero(sub >= gate.index_select(0, hot_c)[:, None])
        ch = hot_c.index_select(0, torch.div(sel, v.shape[2], rounding_mode="floor"))
        vals = sub.view(-1).index_select(0, sel).double()
        b = ((vals - self.lo.index_select(0, ch)) / self.width.index_select(0, ch)).floor_().clamp_(0, self.bins - 1)
        keep = flat_nonzero(b >= self.cut.index_select(0, ch))
        ch = ch.index_select(0, keep)
        self.counts.view(-1).index_add_(0, ch * self.bins + b.long().index_select(0, keep), torch.ones_like(ch))
        self.below += v.shape[0] * v.shape[2] - torch.bincount(ch, minlength=c)

    def _raise_cut(self, counts: torch.Tensor, tail: float) -> None:
        """Fold the bins below the highest cut that leaves at least `tail` of the values (and 256)
        above it, less SLACK·bins bins (kept exact so that later doublings of the range, each of
        which may fold the bin that straddles the cut, stay clear of the quantile), by `counts`
        (C, bins): the exact counts, or an estimate that includes values about to be added.
        Folding moves exact counts into `below`; a cut never comes down."""
        cdf = self.below[:, None].double() + counts.double().cumsum(1)  # values up to each bin's end
        n = cdf[:, -1]
        allowed = torch.minimum(torch.floor((1.0 - tail) * n), n - 256)  # values that may fold
        slack = max(1, int(self.bins * self.SLACK))
        new_cut = torch.maximum(((cdf <= allowed[:, None]).sum(1) - slack).clamp(0, self.bins - 1), self.cut)
        if bool((new_cut > self.cut).any()):
            self._fold(new_cut)

    def _fold(self, new_cut: torch.Tensor) -> None:
        """Move the counts of every bin below `new_cut` (C,) into `below`."""
        fold = torch.arange(self.bins)[None, :] < new_cut[:, None]
        self.below += torch.where(fold, self.counts, 0).sum(1)
        self.counts.masked_fill_(fold, 0)
        self.cut = new_cut.clone()

    def _grow(self, vmin: torch.Tensor, vmax: torch.Tensor) -> None:
        """Widen each channel's range to cover [vmin, vmax]: shift the origin down by whole old
        bins (m) and merge 2^j old bins into one, so every old bin lies inside one new bin (a new
        bin that straddles the tail cut folds into `below`)."""
        hi = self.lo + self.width * self.bins
        need = ((vmin < self.lo) | (vmax >= hi)).nonzero().flatten()
        if need.numel() == 0:
            return
        shifts, factors, los, widths = [], [], [], []
        for lo, w, v0, v1 in zip(*(t[need].tolist() for t in (self.lo, self.width, vmin, vmax)), strict=True):
            m = max(0, math.ceil((lo - v0) / w))
            new_lo = lo - m * w
            required = max((v1 - new_lo) * (1 + 1e-9) / (self.bins * w), (self.bins + m) / self.bins, 1.0)
            f = 2 ** max(0, math.ceil(math.log2(required)))
            if (new_lo + f * w * self.bins) <= v1:  # rounding at a power of two
                f *= 2
            shifts.append(m)
            factors.append(f)
            los.append(new_lo)
            widths.append(w * f)
        m_t = torch.tensor(shifts, dtype=torch.int64)[:, None]
        f_t = torch.tensor(factors, dtype=torch.int64)[:, None]
        target = ((torch.arange(self.bins)[None, :] + m_t) // f_t).clamp_(max=self.bins - 1)
        merged = torch.zeros(len(need), self.bins, dtype=torch.int64).scatter_add_(1, target, self.counts[need])
        self.counts[need] = merged
        self.lo[need] = torch.tensor(los, dtype=torch.float64)
        self.width[need] = torch.tensor(widths, dtype=torch.float64)
        k0 = self.cut[need]
        if bool(k0.any()):
            # the first new bin made of exact old bins only (bins: none)
            k = torch.where(k0 > 0, -torch.div(-(k0 + m_t[:, 0]), f_t[:, 0], rounding_mode="floor"), 0)
            new_cut = self.cut.clone()
            new_cut[need] = k
            self._fold(new_cut)

    def covers(self, q: float) -> torch.Tensor:
        """(C,) bool: `quantile(q)` is available per channel (always, without `tail`)."""
        n = self.n.double()
        return self.below.double() <= (q * (n - 1)).floor()

    def quantile(self, q: float) -> torch.Tensor:
        """(C,) float64 estimate of `torch.quantile(values, q)` (linear interpolation), within
        `self.width` of it per channel."""
        if not 0.0 <= q <= 1.0:
            raise UserError(f"quantile must lie in [0, 1], got {q}")
        if self.lo.numel() == 0:
            raise UserError("no values were seen; no quantile can be taken")
        if not bool(self.covers(q).all()):
            raise UserError(f"the {q} quantile lies in the folded part of a tail sketch; use a larger tail")
        n = self.n.double()
        pos = q * (n - 1)
        r0 = pos.floor()
        r1 = torch.minimum(r0 + 1, n - 1)
        return self._order_stat(r0) + (pos - r0) * (self._order_stat(r1) - self._order_stat(r0))

    def _order_stat(self, r: torch.Tensor) -> torch.Tensor:
        """(C,) estimate of the r-th smallest value (0-based): a point inside the bin holding it,
        spread evenly over the bin's count."""
        cdf = (self.below[:, None] + self.counts.cumsum(1)).double()
        b = torch.searchsorted(cdf, r.unsqueeze(1), right=True).squeeze(1).clamp_(0, self.bins - 1)
        before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp_min(0)[:, None]).squeeze(1), 0.0)
        inbin = self.counts.gather(1, b[:, None]).squeeze(1).double().clamp_min(1)
        frac = ((r - before + 0.5) / inbin).clamp(0, 1)
        return self.lo + (b.double() + frac) * self.width
