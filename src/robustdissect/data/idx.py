"""IDX files (MNIST, Fashion-MNIST), plain or gzipped."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import DATASETS, Dataset, Split, split_train_val
from .files import check_input_size

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))
_IDX_DTYPES: dict[int, str | type] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file; a truncated, malformed or oversized file raises UserError. The header
    is read first, so a gzip bomb or a header declaring a huge shape is refused before its data
    is inflated or read."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise UserError(f"{path} is not an IDX file (bad magic number)")
            ndim = head[3]
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise UserError(f"{path} is truncated (header incomplete)")
            shape = struct.unpack(f">{ndim}I", dims)
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            count = math.prod(shape)
            expected = count * dtype.itemsize
            # the raw data plus the float32 copy the loader makes of it
            check_input_size(expected + 4 * count, f"{path} (shape {shape}, {dtype})")
            data = f.read(expected + 1)  # one byte more: trailing data is an error too
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    if len(data) != expected:
        raise UserError(
            f"{path} is truncated or corrupt: header promises {expected} bytes of data, found "
            f"{len(data) if len(data) <= expected else 'more'}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise UserError(f"missing {stem}[.gz] in {directory}; expected the four standard IDX files")


def load_idx_dataset(name: str, directory: Path, classes: tuple[str, ...], seed: int = 0) -> Dataset:
    if not directory.is_dir():
        hint = (
            " (install it with: apt-get install dataset-fashion-mnist, or pass --data-dir)"
            if name == "fashion-mnist"
            else " (pass --data-dir with the IDX files)"
        )
        raise UserError(f"data directory {directory} does not exist{hint}")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise UserError(f"{directory}: {split} images {images.shape} do not match labels {labels.shape}")
        if labels.size == 0 or images.shape[1] == 0 or images.shape[2] == 0:
            raise UserError(f"{directory}: the {split} IDX files hold no images")
        if images.dtype != np.uint8 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{directory}: {split} images must be uint8 and labels integers in IDX files")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(labels.astype(np.int64))
        if int(y.max()) >= len(classes) or int(y.min()) < 0:
            raise UserError(f"{directory}: label {int(y.max())} out of range for {len(classes)} classes")
        arrays[split] = (x, y)
    train, val = split_train_val(*arrays["train"], val_size=5000, seed=seed)
    return Dataset(name, classes, train, val, Split(*arrays["test"]), source=str(directory))


@DATASETS.register("fashion-mnist", "Fashion-MNIST, 28x28 grayscale, 10 classes (built in)")
def fashion_mnist(data_dir: str | None = None, seed: int = 0) -> Dataset:
    directory = Path(data_dir or os.environ.get("ROBUSTDISSECT_FMNIST_DIR") or FASHION_MNIST_DIR)
    return load_idx_dataset("fashion-mnist", directory, FASHION_CLASSES, seed)


@DATASETS.register("mnist", "MNIST IDX files from --data-dir")
def mnist(data_dir: str | None = None, seed: int = 0) -> Dataset:
    if data_dir is None:
        raise UserError("mnist needs --data-dir pointing at the four MNIST IDX files")
    return load_idx_dataset("mnist", Path(data_dir), MNIST_CLASSES, seed)
