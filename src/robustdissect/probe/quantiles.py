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

import torch

from ..errors import UserError

__all__ = ["StreamingQuantile"]


class StreamingQuantile:
    """Per-channel histogram with a growing range. `update(values)` takes (C, M) values."""

    def __init__(self, bins: int = 2048) -> None:
        if bins < 2:
            raise UserError(f"a streaming quantile needs at least 2 bins, got {bins}")
        self.bins = bins
        self.lo = torch.zeros(0, dtype=torch.float64)
        self.width = torch.zeros(0, dtype=torch.float64)
        self.counts = torch.zeros(0, bins, dtype=torch.int64)

    @property
    def n(self) -> torch.Tensor:
        """(C,) values seen per channel."""
        return self.counts.sum(1)

    def update(self, values: torch.Tensor) -> None:
        """values: (C, M), M values of each channel (e.g. every position of every image)."""
        if values.ndim != 2:
            raise UserError(f"StreamingQuantile.update expects (C, M) values, got {tuple(values.shape)}")
        v = values.detach().cpu()
        if v.shape[1] == 0:
            return
        vmin, vmax = v.amin(1).double(), v.amax(1).double()  # NaN propagates into both
        if not (torch.isfinite(vmin).all() and torch.isfinite(vmax).all()):
            raise UserError("activations contain NaN or infinite values; no quantile can be taken")
        c = v.shape[0]
        if self.lo.numel() == 0:
            self.lo = vmin.clone()
            span = vmax - vmin
            floor = 1e-9 * vmax.abs().clamp_min(1.0)
            # a little headroom so that the maximum falls inside the last bin
            self.width = torch.maximum(span * (1 + 1e-6) / self.bins, floor)
            self.counts = torch.zeros(c, self.bins, dtype=torch.int64)
        elif c != self.lo.numel():
            raise UserError(f"StreamingQuantile has {self.lo.numel()} channels, got {c}")
        self._grow(vmin, vmax)
        b = ((v.double() - self.lo[:, None]) / self.width[:, None]).floor_().clamp_(0, self.bins - 1).long()
        b += torch.arange(c).unsqueeze(1) * self.bins
        self.counts += torch.bincount(b.flatten(), minlength=c * self.bins).view(c, self.bins)

    def _grow(self, vmin: torch.Tensor, vmax: torch.Tensor) -> None:
        """Widen each channel's range to cover [vmin, vmax]: shift the origin down by whole old
        bins (m) and merge 2^j old bins into one, so every old bin lies inside one new bin."""
        hi = self.lo + self.width * self.bins
        need = (vmin < self.lo) | (vmax >= hi)
        if not bool(need.any()):
            return
        for ch in need.nonzero().flatten().tolist():
            lo, w = float(self.lo[ch]), float(self.width[ch])
            m = max(0, math.ceil((lo - float(vmin[ch])) / w))
            new_lo = lo - m * w
            required = max((float(vmax[ch]) - new_lo) * (1 + 1e-9) / (self.bins * w), (self.bins + m) / self.bins, 1.0)
            f = 2 ** max(0, math.ceil(math.log2(required)))
            if (new_lo + f * w * self.bins) <= float(vmax[ch]):  # rounding at a power of two
                f *= 2
            old = torch.arange(self.bins)
            target = ((old + m) // f).clamp_(max=self.bins - 1)
            merged = torch.zeros(self.bins, dtype=torch.int64)
            merged.scatter_add_(0, target, self.counts[ch])
            self.counts[ch] = merged
            self.lo[ch] = new_lo
            self.width[ch] = w * f

    def quantile(self, q: float) -> torch.Tensor:
        """(C,) float64 estimate of `torch.quantile(values, q)` (linear interpolation), within
        `self.width` of it per channel."""
        if not 0.0 <= q <= 1.0:
            raise UserError(f"quantile must lie in [0, 1], got {q}")
        if self.lo.numel() == 0:
            raise UserError("no values were seen; no quantile can be taken")
        n = self.n.double()
        pos = q * (n - 1)
        r0 = pos.floor()
        r1 = torch.minimum(r0 + 1, n - 1)
        return self._order_stat(r0) + (pos - r0) * (self._order_stat(r1) - self._order_stat(r0))

    def _order_stat(self, r: torch.Tensor) -> torch.Tensor:
        """(C,) estimate of the r-th smallest value (0-based): a point inside the bin holding it,
        spread evenly over the bin's count."""
        cdf = self.counts.cumsum(1).double()
        b = torch.searchsorted(cdf, r.unsqueeze(1), right=True).squeeze(1).clamp_(0, self.bins - 1)
        before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp_min(0)[:, None]).squeeze(1), 0.0)
        inbin = self.counts.gather(1, b[:, None]).squeeze(1).double().clamp_min(1)
        frac = ((r - before + 0.5) / inbin).clamp(0, 1)
        return self.lo + (b.double() + frac) * self.width
