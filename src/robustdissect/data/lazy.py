"""Lazily read images: a map-style torch Dataset over a source (files decoded per item, or a
uint8 array) and `LazyImages`, an indexed view that decodes only the images it is asked for.

Images that come from 8-bit files stay uint8 (C, H, W) until a batch is taken; a batch is
converted to float32 in [0, 1] (`/ 255`), the same arithmetic the eager loaders use, so a lazy
split yields exactly the tensors an eager one holds.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ..errors import UserError

log = logging.getLogger(__name__)


class ImageSource(Protocol):
    """N images of one shape, each read on demand as a uint8 or float32 tensor (C, H, W)."""

    shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def load(self, i: int) -> torch.Tensor: ...


def resize_shorter(im: Any, size: int) -> Any:
    """A Pillow image resized (bilinear) so that its shorter side is `size`; the longer side
    keeps the aspect ratio, rounded down (a 300x200 image at 100 -> 150x100)."""
    w, h = im.size
    if min(w, h) == size:
        return im
    if w <= h:
        nw, nh = size, max(1, int(size * h / w))
    else:
        nw, nh = max(1, int(size * w / h)), size
    return im.resize((nw, nh), Image.Resampling.BILINEAR)


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of a centred `crop` x `crop` square; the offsets round
    half to even, as round() does (a 7-pixel margin splits 4 left, 3 right)."""
    if crop > width or crop > height:
        raise UserError(f"cannot centre-crop {crop}x{crop} from a {width}x{height} image; resize it first")
    left, top = round((width - crop) / 2), round((height - crop) / 2)
    return left, top, left + crop, top + crop


@contextmanager
def open_image(f: Path) -> Iterator[Image.Image]:
    """An image file opened by Pillow for the body of the `with`. Pillow's decompression-bomb
    limit (a warning above MAX_IMAGE_PIXELS, an error above twice) and any file that cannot be
    read or decoded are a UserError (the user's data problem)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as raw:
                yield raw
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(
            f"{f} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels); resize it first"
        ) from None
    except Exception as e:
        raise UserError(f"cannot read image {f}: {' '.join(str(e).split())[:200]}") from None


def read_image(f: Path, mode: str) -> Image.Image:
    """One image file (`open_image`) decoded and converted to the Pillow `mode` ("L", "RGB")."""
    with open_image(f) as raw:
        return raw.convert(mode)


def decode_image(f: Path, grayscale: bool, resize: int | None = None, crop: int | None = None) -> np.ndarray:
    """One image file (`read_image`) as uint8 (H, W) or (H, W, 3): its shorter side resized to
    `resize`, then centre-cropped to `crop` x `crop` (each optional)."""
    im = read_image(f, "L" if grayscale else "RGB")
    if resize is not None:
        im = resize_shorter(im, resize)
    if crop is not None:
        im = im.crop(center_crop_box(im.size[0], im.size[1], crop))
    return np.array(im, dtype=np.uint8)


def image_header(f: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header only (no pixels decoded); a bomb or an
    unreadable header is a UserError, as when decoding."""
    with open_image(f) as raw:
        w, h = raw.size
    return int(w), int(h)


class FileSource:
    """Image files decoded on demand, each to uint8 (C, H, W) of one common `shape`."""

    def __init__(
        self,
        files: Sequence[Path],
        shape: tuple[int, int, int],
        grayscale: bool,
        resize: int | None = None,
        crop: int | None = None,
    ) -> None:
        self.files = list(files)
        self.shape = shape
        self.grayscale, self.resize, self.crop = grayscale, resize, crop

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> torch.Tensor:
        f = self.files[i]
        a = decode_image(f, self.grayscale, self.resize, self.crop)
        t = torch.from_numpy(a).unsqueeze(0) if a.ndim == 2 else torch.from_numpy(a).permute(2, 0, 1)
        if tuple(t.shape) != self.shape:
            raise UserError(f"{f} decodes to {tuple(t.shape)}, others to {self.shape}; pass --image-size to resize all")
        return t.contiguous()


class ArraySource:
    """Images held in one array (N, C, H, W) (uint8, or float32 in [0, 1]), read one at a time;
    the array may be a numpy memory map, so only the images read are paged in."""

    def __init__(self, array: np.ndarray | torch.Tensor) -> None:
        self.array = array
        self.shape = (int(array.shape[1]), int(array.shape[2]), int(array.shape[3]))

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def load(self, i: int) -> torch.Tensor:
        item = self.array[i]
        return item if isinstance(item, torch.Tensor) else torch.from_numpy(np.array(item))


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """A stored batch as float32 in [0, 1]: uint8 / 255, float as is."""
    return batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()


class ItemDataset(TorchDataset[torch.Tensor]):
    """A map-style torch Dataset of the images `indices` of `source`: item k is image indices[k]
    as stored (uint8 for image files)."""

    def __init__(self, source: ImageSource, indices: torch.Tensor) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.source.load(int(self.indices[k]))


def loader_settings(device: torch.device | str | None) -> tuple[int, bool]:
    """(worker processes, pin memory) for a DataLoader feeding `device`: decoding in workers and
    pinned host memory where the images go to a CUDA device; in-process on the CPU, where the
    workers would compete with the model for the same cores."""
    if device is not None and torch.device(device).type == "cuda":
        return min(8, os.cpu_count() or 1), True
    return 0, False


class LazyImages:
    """A lazily indexed view of images (N, C, H, W) of a source: `len`, `shape`, `dtype`
    (float32, what indexing returns), indexing (an int -> (C, H, W); a slice, a list, an integer
    or boolean tensor -> (M, C, H, W) float32 in [0, 1], decoding only those images), `view`
    (a lazy subset) and `batches` (streaming through a DataLoader).

    Anything else a tensor has (`.mean`, `.to`, torch functions) materialises the whole view
    once, with a log line: correct, but it costs the memory this class exists to save."""

    def __init__(self, source: ImageSource, indices: torch.Tensor | None = None) -> None:
        self.source = source
        self.indices = torch.arange(len(source)) if indices is None else indices.to(torch.int64)
        self._whole: torch.Tensor | None = None
        # the last multi-image read: a stage asks for the same `x[:n]` several times
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- the tensor-like surface the stages use --
    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.source.shape))

    @property
    def ndim(self) -> int:
        return 4

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4

    def numel(self) -> int:
        return int(self.shape.numel())

    def positions(self, key: Any) -> torch.Tensor:
        """The source indices selected by `key` (a slice, a list, an integer or boolean tensor)."""
        if isinstance(key, slice):
            return self.indices[key]
        if isinstance(key, torch.Tensor):
            if key.dtype == torch.bool:
                if key.shape != (len(self),):
                    raise IndexError(f"a boolean mask of shape {tuple(key.shape)} for {len(self)} images")
                return self.indices[key]
            return self.indices[key.to(torch.int64)]
        if isinstance(key, (list, tuple, range, np.ndarray)):
            return self.indices[torch.as_tensor(np.asarray(key), dtype=torch.int64)]
        raise TypeError(f"cannot index lazy images with {type(key).__name__}")

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            k = int(key)
            if not -len(self) <= k < len(self):
                raise IndexError(f"image {k} out of range for {len(self)} images")
            return to_float(self.source.load(int(self.indices[k])))
        if isinstance(key, tuple) and key and isinstance(key[0], (slice, torch.Tensor, list)):
            return self[key[0]][(slice(None), *key[1:])]  # e.g. x[:n, 0]: images first, then the rest
        return self.read(self.positions(key))

    def view(self, key: Any) -> LazyImages:
        """A lazy subset (nothing decoded): the images `key` selects, in that order."""
        return LazyImages(self.source, self.positions(key))

    def read(self, positions: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """Images at source `positions` (M,) -> (M, C, H, W): float32 in [0, 1], or as stored with raw."""
        if positions.numel() == 0:
            return torch.empty((0, *self.source.shape), dtype=torch.uint8 if raw else torch.float32)
        if not raw and self._last is not None and torch.equal(self._last[0], positions):
            return self._last[1]
        out = torch.stack([self.source.load(int(i)) for i in positions])
        if raw:
            return out
        self._last = (positions.clone(), to_float(out))
        return self._last[1]

    def batches(
        self, batch_size: int, device: torch.device | str | None = None, workers: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Consecutive float32 batches (B, C, H, W) in [0, 1], decoded by a DataLoader (worker
        processes and pinned memory where `device` is CUDA, see `loader_settings`)."""
        auto_workers, pin = loader_settings(device)
        n_workers = auto_workers if workers is None else workers
        loader = DataLoader(
            ItemDataset(self.source, self.indices), batch_size=batch_size, shuffle=False,
            num_workers=n_workers, pin_memory=pin, persistent_workers=False,
        )  # fmt: skip
        for batch in loader:
            yield to_float(batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches of up to 256 images (B, C, H, W), not single images: the library's streaming
        functions take "a tensor or an iterable of batches", and a lazy view is the latter."""
        return self.batches(256)

    def materialize(self) -> torch.Tensor:
        """Every image of the view as one float32 tensor (N, C, H, W) (cached)."""
        if self._whole is None:
            log.info("materialising %d lazily read images of shape %s", len(self), self.source.shape)
            self._whole = torch.cat(list(self.batches(256))) if len(self) else self.read(self.indices)
        return self._whole

    def float(self) -> torch.Tensor:
        return self.materialize()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("source", "indices"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        def unwrap(v: Any) -> Any:
            if isinstance(v, LazyImages):
                return v.materialize()
            if isinstance(v, (list, tuple)):
                return type(v)(unwrap(u) for u in v)
            return v

        return func(*unwrap(tuple(args)), **{k: unwrap(v) for k, v in (kwargs or {}).items()})

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} images of {self.source.shape}, {type(self.source).__name__})"


def is_lazy(x: object) -> bool:
    return isinstance(x, LazyImages)
