"""Per-image random streams for attacks: image i's draws depend only on (seed, id_i, draw number).

An attack's random start, Square's windows and signs, SPSA's directions … are drawn from a
`SampleRandom` keyed by a stable id per image (its position in the analysed split, or 0..N-1 by
default). So the adversarial example of an image does not depend on which other images share its
batch: the result is the same whatever `batch_size` splits the images into chunks, and the same
when `torchrun` splits them across processes.

The draws are counter-based (splitmix64 on int64 tensors, a fixed hash of (seed, stream, draw
number, id, element)), so they are reproducible on every device and need no generator state
per image. `spawn(tag)` opens an independent stream (e.g. one per restart); `subset(index)`
keeps the same streams for a subset of the images, continuing from the current draw number.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SampleRandom"]

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _signed(v: int) -> int:
    """A 64-bit pattern as the signed int64 torch stores."""
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


_C0, _C1, _C2 = _signed(_GOLDEN), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _mix_int(z: int) -> int:
    """splitmix64's finaliser on a Python int (the reference the tensor version must equal)."""
    z = (z + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _srl(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 words (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic)."""
    z = z + _C0
    z = (z ^ _srl(z, 30)) * _C1
    z = (z ^ _srl(z, 27)) * _C2
    return z ^ _srl(z, 31)


class SampleRandom:
    """Random draws with one independent stream per image.

    keys (N,) int64: a stable id per image; `seed` and `stream` select the family of streams.
    Every draw returns a tensor (N, *shape) whose row i depends only on (seed, stream, the draw's
    number, keys[i])."""

    def __init__(self, keys: Tensor, seed: int = 0, stream: int = 0, draws: int = 0) -> None:
        if keys.dim() != 1:
            raise ValueError(f"keys must be one id per image (N,), got shape {tuple(keys.shape)}")
        self.keys = keys.to(torch.int64)
        self.seed = int(seed)
        self.stream = int(stream)
        self.draws = int(draws)

    @classmethod
    def for_images(cls, n: int, seed: int, device: torch.device | str, ids: Tensor | None = None) -> SampleRandom:
        """Streams for n images keyed by `ids` (N,) or by their positions 0..n-1."""
        keys = torch.arange(n, dtype=torch.int64) if ids is None else ids.detach().to(torch.int64).cpu()
        if keys.shape != (n,):
            raise ValueError(f"ids must hold one id per image ({n},), got shape {tuple(keys.shape)}")
        return cls(keys.to(device), seed)

    @classmethod
    def coerce(cls, source: SampleRandom | torch.Generator, n: int, device: torch.device | str) -> SampleRandom:
        """`source` itself, or streams for n images keyed by ids drawn from a torch.Generator."""
        if isinstance(source, SampleRandom):
            if source.n != n:
                raise ValueError(f"the random streams are for {source.n} images, not {n}")
            return source
        keys = torch.randint(0, 2**62, (n,), generator=source, device=source.device)
        return cls(keys.to(device))

    @property
    def n(self) -> int:
        return int(self.keys.shape[0])

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def subset(self, index: Tensor | slice) -> SampleRandom:
        """The same streams for the images `index` selects, at the current draw number."""
        return SampleRandom(self.keys[index], self.seed, self.stream, self.draws)

    def spawn(self, tag: int) -> SampleRandom:
        """An independent family of streams for the same images (e.g. restart `tag`)."""
        return SampleRandom(self.keys, self.seed, _signed(_mix_int(self.stream * 1_000_003 + tag + 1)))

    def _words(self, m: int) -> Tensor:
        """(N, m) random 64-bit words (int64); advances the draw number."""
        salt = _signed(_mix_int(_mix_int(self.seed) ^ _mix_int(self.stream + 0x5DEECE66D) ^ self.draws))
        self.draws += 1
        base = _mix(self.keys ^ salt)
        j = torch.arange(m, device=self.device, dtype=torch.int64)
        return _mix(base[:, None] + j[None, :] * _C0)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Uniform [0, 1) of shape (N, *shape)."""
        m = math.prod(shape)
        w = self._words(m)
        if dtype == torch.float64:
            u = _srl(w, 11).to(torch.float64) * 2.0**-53
        else:
            u = (_srl(w, 40).to(torch.float32) * 2.0**-24).to(dtype)
        return u.reshape(self.n, *shape)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal of shape (N, *shape) (Box-Muller on two uniforms in float64)."""
        m = math.prod(shape)
        w = self._words(2 * m)
        u1 = 1.0 - _srl(w[:, :m], 11).to(torch.float64) * 2.0**-53  # (0, 1]
        u2 = _srl(w[:, m:], 11).to(torch.float64) * 2.0**-53
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return z.to(dtype).reshape(self.n, *shape)

    def randint(self, low: int, high: int, *shape: int) -> Tensor:
        """Integers uniform in [low, high) of shape (N, *shape), int64."""
        if high <= low:
            raise ValueError(f"randint needs low < high, got [{low}, {high})")
        u = _srl(self._words(math.prod(shape)), 11).to(torch.float64) * 2.0**-53
        k = (u * (high - low)).floor().to(torch.int64).clamp_(max=high - low - 1) + low
        return k.reshape(self.n, *shape)

    def signs(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """±1 with equal probability, shape (N, *shape)."""
        return (self.randint(0, 2, *shape) * 2 - 1).to(dtype)

    def generators(self) -> list[torch.Generator]:
        """One torch.Generator per image, seeded from its stream (for draws torch has no
        counter-based form of, e.g. Poisson); advances the draw number."""
        seeds = _srl(self._words(1)[:, 0], 1).tolist()
        out = []
        for s in seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(s))
            out.append(g)
        return out
