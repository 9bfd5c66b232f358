"""Lazily read ImageFolder data: the same tensors as the eager loader, tensor-like indexing,
streaming batches, and the evaluation transform (shorter-side resize, centre crop)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustdissect.data import LazyImages, load_dataset
from robustdissect.data.base import Split
from robustdissect.data.lazy import center_crop_box, decode_image, resize_shorter
from robustdissect.errors import UserError


def _folder(root: Path, size: tuple[int, int] = (15, 12), per_class: int = 10, split: bool = False) -> Path:
    """Random RGB images (width, height) = `size` in DIR/<class>/ (or DIR/train|test/<class>/)."""
    rng = np.random.default_rng(0)
    parts = ("train", "test") if split else ("",)
    for part in parts:
        for cls in ("cat", "dog", "emu"):
            d = root / part / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("options", [{}, {"image_size": 10}, {"resize": 8}, {"crop": 9}, {"grayscale": True}])
def test_lazy_split_equals_eager(tmp_path: Path, options: dict[str, object]) -> None:
    root = _folder(tmp_path)
    lazy = load_dataset("image-folder", str(root), seed=3, **options)
    eager = load_dataset("image-folder", str(root), seed=3, lazy=False, **options)
    assert lazy.image_shape == eager.image_shape
    for name in ("train", "val", "test"):
        a, b = lazy.split(name), eager.split(name)
        assert a.is_lazy and not b.is_lazy
        assert isinstance(a.x, LazyImages) and a.x.shape == b.x.shape
        assert torch.equal(a.x[:], b.x) and torch.equal(a.y, b.y)
        assert b.x.dtype == torch.float32 and a.x[:].dtype == torch.float32
    assert lazy.channel_stats() == eager.channel_stats()
    assert torch.equal(lazy.test.subset(3, seed=1).x, eager.test.subset(3, seed=1).x)


def test_lazy_indexing_semantics(tmp_path: Path) -> None:
    root = _folder(tmp_path, split=True, per_class=4)
    lazy = load_dataset("image-folder", str(root), lazy=True)
    eager = load_dataset("image-folder", str(root), lazy=False)
    x, ref = lazy.test.x, eager.test.x
    assert len(x) == 12 and x.shape == ref.shape == (12, 3, 12, 15) and x.ndim == 4
    assert torch.equal(x[:5], ref[:5]) and torch.equal(x[3:11:2], ref[3:11:2]) and torch.equal(x[-2:], ref[-2:])
    idx = torch.tensor([7, 0, 7, 11])
    assert torch.equal(x[idx], ref[idx]) and torch.equal(x[[2, 1]], ref[[2, 1]])
    mask = torch.arange(12) % 3 == 0
    assert torch.equal(x[mask], ref[mask])
    assert torch.equal(x[4], ref[4]) and torch.equal(x[-1], ref[-1])
    assert torch.equal(x[:4, 0], ref[:4, 0])
    with pytest.raises(IndexError):
        x[12]
    assert x[torch.tensor([], dtype=torch.int64)].shape == (0, 3, 12, 15)
    # a view decodes nothing; views compose
    v = x.view(slice(2, 10)).view(torch.tensor([5, 1]))
    assert isinstance(v, LazyImages) and torch.equal(v[:], ref[2:10][[5, 1]])
    # tensor methods and torch functions fall back to the materialised images
    assert torch.allclose(x.mean(0), ref.mean(0)) and torch.equal(torch.cat([x, x]), torch.cat([ref, ref]))
    assert torch.equal(x.to("cpu"), ref)
    # streaming: in order, covering every image once, in-process or in worker processes
    assert torch.equal(torch.cat(list(x.batches(5))), ref)
    assert torch.equal(torch.cat(list(x.batches(5, workers=2))), ref)
    # iterating a view yields batches (the library's "tensor or iterable of batches" inputs)
    assert [b.shape[0] for b in x] == [12] and torch.equal(next(iter(x)), ref)
    split = lazy.test.take(torch.arange(2, 9))
    assert split.is_lazy and torch.equal(split.materialized().x, ref[2:9])
    got = list(lazy.test.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    want = list(eager.test.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want, strict=True))


def test_resize_shorter_and_centre_crop_known_answers(tmp_path: Path) -> None:
    assert resize_shorter(Image.new("RGB", (300, 200)), 100).size == (150, 100)
    assert resize_shorter(Image.new("RGB", (200, 300)), 100).size == (100, 150)
    assert resize_shorter(Image.new("RGB", (201, 100)), 50).size == (100, 50)  # rounded down
    assert center_crop_box(15, 12, 8) == (4, 2, 12, 10)  # margin 7 -> 4 | 3 (round half to even: 3.5 -> 4)
    assert center_crop_box(10, 10, 4) == (3, 3, 7, 7)
    with pytest.raises(UserError, match="centre-crop"):
        center_crop_box(5, 10, 6)
    # pixel (r, c) holds 10 * r + c: the crop is exactly the middle block
    a = (10 * np.arange(6)[:, None] + np.arange(8)[None, :]).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "g.png")
    got = decode_image(tmp_path / "g.png", grayscale=True, crop=4)
    assert got.tolist() == a[1:5, 2:6].tolist()
    # a constant image stays constant through the bilinear resize; a 2:1 image keeps its ratio
    Image.fromarray(np.full((40, 80, 3), 77, np.uint8)).save(tmp_path / "c.png")
    got = decode_image(tmp_path / "c.png", grayscale=False, resize=20, crop=16)
    assert got.shape == (16, 16, 3) and (got == 77).all()
    assert decode_image(tmp_path / "c.png", grayscale=False, resize=20).shape == (20, 40, 3)


def test_image_size_resizes_mixed_sizes_and_refuses_mismatch(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for cls, (w, h) in (("a", (30, 20)), ("b", (24, 24))):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    with pytest.raises(UserError, match="image-size"):
        load_dataset("image-folder", str(tmp_path))
    ds = load_dataset("image-folder", str(tmp_path), image_size=16)
    assert ds.image_shape == (3, 16, 16) and ds.test.x[:].shape[1:] == (3, 16, 16)
    with pytest.raises(UserError, match="centre-crop"):
        load_dataset("image-folder", str(tmp_path), resize=10, crop=12)
    with pytest.raises(UserError, match="image_size must be"):
        load_dataset("image-folder", str(tmp_path), image_size=0)
    with pytest.raises(UserError, match="has no option 'crop'"):
        load_dataset("npz", str(tmp_path / "x.npz"), crop=3)


def test_in_memory_split_is_unchanged() -> None:
    s = Split(torch.rand(10, 1, 2, 2), torch.arange(10))
    assert not s.is_lazy and s.materialized() is s
    t = s.take(torch.tensor([3, 1]))
    assert torch.equal(t.x, s.x[[3, 1]]) and t.y.tolist() == [3, 1]


def test_uint8_npz_is_kept_as_uint8_and_read_lazily(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (30, 8, 6, 3), dtype=np.uint8)  # NHWC
    y = rng.integers(0, 4, 30)
    np.savez(tmp_path / "u8.npz", x=x, y=y)
    ds = load_dataset("npz", str(tmp_path / "u8.npz"))
    assert isinstance(ds.test.x, LazyImages) and ds.image_shape == (3, 8, 6)
    want = torch.from_numpy(x.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    assert torch.equal(ds.test.x[:], want) and ds.test.y.tolist() == y.tolist()
    assert ds.test.x.source.array.dtype == torch.uint8  # type: ignore[attr-defined]
