"""IDX files (MNIST, Fashion-MNIST), plain or gzipped."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import DATASETS, Dataset, split_train_val

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
    """Read one IDX file; a truncated or malformed file raises UserError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} is truncated (header incomplete)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(
            f"{path} is truncated or corrupt: header promises {expected} bytes of data, found {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


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
    from .base import Split

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
