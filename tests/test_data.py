from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robustdissect.data import augment, load_dataset
from robustdissect.data.base import Split
from robustdissect.data.idx import read_idx
from robustdissect.errors import UserError


def test_fashion_mnist_shapes_and_range(fmnist) -> None:
    assert (len(fmnist.train), len(fmnist.val), len(fmnist.test)) == (55000, 5000, 10000)
    assert fmnist.image_shape == (1, 28, 28)
    assert fmnist.num_classes == 10
    assert fmnist.test.x.dtype == torch.float32
    assert float(fmnist.test.x.min()) >= 0.0 and float(fmnist.test.x.max()) <= 1.0
    assert torch.bincount(fmnist.test.y).tolist() == [1000] * 10
    mean, std = fmnist.channel_stats()
    assert abs(mean[0] - 0.286) < 0.002 and abs(std[0] - 0.353) < 0.002


def test_splits_and_subsets_are_deterministic(fmnist) -> None:
    again = load_dataset("fashion-mnist", seed=0, **{})
    assert torch.equal(again.val.y, fmnist.val.y)
    a, b = fmnist.test.subset(100, seed=3), fmnist.test.subset(100, seed=3)
    c = fmnist.test.subset(100, seed=4)
    assert torch.equal(a.x, b.x) and not torch.equal(a.y, c.y)
    with pytest.raises(UserError):
        fmnist.test.subset(0)


def test_missing_data_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_idx_dir(root: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_mnist_from_idx_files(tmp_path: Path) -> None:
    ds = load_dataset("mnist", str(_fake_idx_dir(tmp_path)))
    assert ds.image_shape == (1, 28, 28) and len(ds.test) == 40


def test_truncated_idx_file(tmp_path: Path) -> None:
    root = _fake_idx_dir(tmp_path)
    path = root / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_dataset("mnist", str(root))
    assert read_idx(root / "train-labels-idx1-ubyte.gz").shape == (40,)


def test_npz_nan_and_range_are_refused(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    y = np.arange(20) % 2
    x_nan = x.copy()
    x_nan[3, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x_nan, y=y)
    with pytest.raises(UserError, match="NaN"):
        load_dataset("npz", str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "big.npz", x=x * 255.0, y=y)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        load_dataset("npz", str(tmp_path / "big.npz"))
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    ds = load_dataset("npz", str(tmp_path / "ok.npz"))
    # no test split in the file: the file as given is the analysed split (nothing held out)
    assert ds.num_classes == 2 and len(ds.test) == 20 and torch.equal(ds.test.x, torch.from_numpy(x).float())


def _cifar_batch(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return pickle.dumps(
        {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(rng.integers(0, 10, n))}
    )


def test_cifar10_batches_and_safe_unpickling(tmp_path: Path) -> None:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for i in range(1, 6):
        (base / f"data_batch_{i}").write_bytes(_cifar_batch(12, i))
    (base / "test_batch").write_bytes(_cifar_batch(10, 9))
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.image_shape == (3, 32, 32) and len(ds.test) == 10

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    (base / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(UserError, match="refusing"):
        load_dataset("cifar10", str(tmp_path), seed=1)


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset("image-folder", str(tmp_path))
    assert ds.classes == ("cat", "dog") and ds.image_shape == (3, 12, 12)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 20


def test_augmentations_keep_shape_and_are_seeded() -> None:
    x = torch.rand(6, 3, 32, 32)
    a = augment(x, "crop-flip", torch.Generator().manual_seed(1))
    b = augment(x, "crop-flip", torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    from robustdissect.data.transforms import random_crop, random_hflip

    assert torch.equal(random_crop(x, 0), x)
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1))


def test_batches_cover_split_once() -> None:
    s = Split(torch.rand(10, 1, 2, 2), torch.arange(10))
    seen = torch.cat([y for _x, y in s.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
