"""User datasets from files: class sub-folders of images, and .npz arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import DATASETS, Dataset, Split, split_train_val, validate_images

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _read_folder(directory: Path, size: int | None, grayscale: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{directory} has no class sub-folders (expected DIR/<class>/<image>)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    shape: tuple[int, ...] | None = None
    for label, cls in enumerate(classes):
        for f in sorted((directory / cls).iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as raw:
                    im = raw.convert("L" if grayscale else "RGB")
                    if size is not None:
                        im = im.resize((size, size), Image.Resampling.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"cannot read image {f}: {e}") from None
            if shape is None:
                shape = a.shape
            elif a.shape != shape:
                raise UserError(f"{f} has size {a.shape}, others {shape}; pass --image-size to resize all images")
            images.append(a)
            labels.append(label)
    if not images:
        raise UserError(f"no images found under {directory}")
    x = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64), classes


@DATASETS.register("image-folder", "class sub-folders of images: DIR/train/<class>/*, DIR/test/<class>/*")
def image_folder(
    data_dir: str | None = None, seed: int = 0, image_size: int | None = None, grayscale: bool = False
) -> Dataset:
    if data_dir is None:
        raise UserError("image-folder needs --data-dir")
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data directory {root} does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        xtr, ytr, classes = _read_folder(root / "train", image_size, grayscale)
        xte, yte, test_classes = _read_folder(root / "test", image_size, grayscale)
        if test_classes != classes:
            raise UserError(f"{root}: train and test class folders differ")
    else:  # one folder: hold out a seeded 20% as test
        x, y, classes = _read_folder(root, image_size, grayscale)
        rest, held = split_train_val(x, y, val_size=max(1, len(y) // 5), seed=seed + 1)
        xtr, ytr, xte, yte = rest.x, rest.y, held.x, held.y
    train, val = split_train_val(xtr, ytr, val_size=max(1, len(ytr) // 10), seed=seed)
    return Dataset("image-folder", tuple(classes), train, val, Split(xte, yte), source=str(root))


def _npz_split(arrays: np.lib.npyio.NpzFile, xkey: str, ykey: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.asarray(arrays[xkey])
    y = np.asarray(arrays[ykey])
    if x.dtype == np.uint8:
        xt = torch.from_numpy(x.astype(np.float32) / 255.0)
    elif np.issubdtype(x.dtype, np.floating):
        xt = torch.from_numpy(x.astype(np.float32))
    else:
        raise UserError(f"{path}: '{xkey}' must be uint8 or float, got {x.dtype}")
    if xt.ndim == 3:
        xt = xt.unsqueeze(1)
    elif xt.ndim == 4 and xt.shape[-1] in (1, 3) and xt.shape[1] not in (1, 3):
        xt = xt.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: '{ykey}' must hold integer labels, got {y.dtype}")
    yt = torch.from_numpy(y.astype(np.int64))
    validate_images(xt, yt, f"{path}[{xkey}]")
    return xt, yt


@DATASETS.register("npz", "arrays x (N,C,H,W or N,H,W[,C]) in [0,1] or uint8 and y (N,); optional x_test, y_test")
def npz(data_dir: str | None = None, seed: int = 0) -> Dataset:
    if data_dir is None:
        raise UserError("npz needs --data-dir pointing at a .npz file")
    path = Path(data_dir)
    if not path.is_file():
        raise UserError(f"npz file {path} does not exist")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} as .npz: {e}") from None
    with arrays:
        if "x" not in arrays or "y" not in arrays:
            raise UserError(f"{path} must contain arrays 'x' and 'y', found {sorted(arrays.files)}")
        x, y = _npz_split(arrays, "x", "y", path)
        if "x_test" in arrays and "y_test" in arrays:
            xte, yte = _npz_split(arrays, "x_test", "y_test", path)
        else:
            rest, held = split_train_val(x, y, val_size=max(1, len(y) // 5), seed=seed + 1)
            x, y, xte, yte = rest.x, rest.y, held.x, held.y
    num_classes = int(max(int(y.max()), int(yte.max()))) + 1
    train, val = split_train_val(x, y, val_size=max(1, len(y) // 10), seed=seed)
    classes = tuple(str(i) for i in range(num_classes))
    return Dataset("npz", classes, train, val, Split(xte, yte), source=str(path))
