"""User datasets from files: class sub-folders of images, and .npz arrays."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import DATASETS, Dataset, Split, split_train_val, validate_images

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


MAX_CLASSES = 100_000


def _open_image(f: Path, size: int | None, grayscale: bool) -> np.ndarray:
    """Decode one image file to uint8 (H, W) or (H, W, 3); Pillow's decompression-bomb limit
    (a warning above MAX_IMAGE_PIXELS, an error above twice that) is a UserError."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as raw:
                im = raw.convert("L" if grayscale else "RGB")
                if size is not None:
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                return np.asarray(im, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(
            f"{f} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels); resize it first"
        ) from None
    except Exception as e:  # any undecodable file is the user's data problem
        raise UserError(f"cannot read image {f}: {' '.join(str(e).split())[:200]}") from None


def _listdir(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError as e:
        raise UserError(f"cannot list {directory}: {e.strerror}") from None


def _read_folder(directory: Path, size: int | None, grayscale: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    classes = [p.name for p in _listdir(directory) if p.is_dir()]
    if not classes:
        raise UserError(f"{directory} has no class sub-folders (expected DIR/<class>/<image>)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    shape: tuple[int, ...] | None = None
    for label, cls in enumerate(classes):
        for f in _listdir(directory / cls):
            if f.suffix.lower() not in _IMAGE_SUFFIXES or not f.is_file():
                continue
            a = _open_image(f, size, grayscale)
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
    if image_size is not None and (not isinstance(image_size, int) or not 1 <= image_size <= 4096):
        raise UserError(f"image_size must be an integer in [1, 4096], got {image_size!r}")
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
        xtr, ytr, xte, yte = _hold_out(x, y, seed, str(root))
    train, val = split_train_val(xtr, ytr, val_size=max(1, len(ytr) // 10), seed=seed)
    return Dataset("image-folder", tuple(classes), train, val, Split(xte, yte), source=str(root))


def _hold_out(
    x: torch.Tensor, y: torch.Tensor, seed: int, where: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hold out a seeded 20% of (x, y) as the test split; needs enough images for both."""
    if len(y) < MIN_IMAGES:
        raise UserError(
            f"{where}: {len(y)} images are too few to hold out a test split (need {MIN_IMAGES}); "
            "add images or give a separate test set"
        )
    rest, held = split_train_val(x, y, val_size=max(1, len(y) // 5), seed=seed + 1)
    return rest.x, rest.y, held.x, held.y


MIN_IMAGES = 10


def _npz_array(arrays: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """One array of an .npz, refusing object (pickled) arrays and unreadable members."""
    try:
        return np.asarray(arrays[key])
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(f"{path}: '{key}' is an object array; it would need unpickling, save numbers") from None
        raise UserError(f"{path}: cannot read '{key}': {e}") from None
    except MemoryError:
        raise UserError(f"{path}: '{key}' is too large to load into memory") from None
    except Exception as e:  # a corrupt member is the user's file problem
        raise UserError(f"{path}: cannot read '{key}': {' '.join(str(e).split())[:200]}") from None


def _npz_split(arrays: np.lib.npyio.NpzFile, xkey: str, ykey: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    x = _npz_array(arrays, xkey, path)
    y = _npz_array(arrays, ykey, path)
    if x.ndim not in (3, 4):
        raise UserError(f"{path}: '{xkey}' must have shape (N, C, H, W), (N, H, W, C) or (N, H, W), got {x.shape}")
    if x.dtype == np.uint8:
        xt = torch.from_numpy(x.astype(np.float32) / 255.0)
    elif np.issubdtype(x.dtype, np.floating):
        with np.errstate(over="ignore", invalid="ignore"):
            xt = torch.from_numpy(x.astype(np.float32))
    else:
        raise UserError(f"{path}: '{xkey}' must be uint8 or float, got {x.dtype}")
    if xt.ndim == 3:
        xt = xt.unsqueeze(1)
    elif xt.ndim == 4 and xt.shape[-1] in (1, 3) and xt.shape[1] not in (1, 3):
        xt = xt.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    if xt.shape[0] == 0 or xt[0].numel() == 0:
        raise UserError(f"{path}: '{xkey}' holds no images (shape {x.shape})")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: '{ykey}' must hold integer labels, got {y.dtype}")
    if y.ndim == 1 and y.size and (int(y.max()) >= MAX_CLASSES or int(y.min()) < 0):
        raise UserError(f"{path}: labels in '{ykey}' must lie in [0, {MAX_CLASSES}), found [{y.min()}, {y.max()}]")
    yt = torch.from_numpy(y.astype(np.int64))
    validate_images(xt, yt, f"{path}[{xkey}]")
    return xt, yt


@DATASETS.register(
    "npz", "arrays x (N,C,H,W or N,H,W[,C]) in [0,1] or uint8 and y (N,); optional x_test, y_test (else x, y are the "
    "analysed test split as given)"
)
def npz(data_dir: str | None = None, seed: int = 0) -> Dataset:
    if data_dir is None:
        raise UserError("npz needs --data-dir pointing at a .npz file")
    path = Path(data_dir)
    if not path.is_file():
        raise UserError(f"npz file {path} does not exist")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as e:  # empty, truncated, or not a zip archive: the user's file problem
        raise UserError(f"cannot read {path} as .npz: {' '.join(str(e).split())[:200] or type(e).__name__}") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise UserError(f"{path} is a single .npy array, not an .npz archive with arrays 'x' and 'y'")
    with arrays:
        if "x" not in arrays or "y" not in arrays:
            raise UserError(f"{path} must contain arrays 'x' and 'y', found {sorted(arrays.files)}")
        x, y = _npz_split(arrays, "x", "y", path)
        if "x_test" in arrays and "y_test" in arrays:
            xte, yte = _npz_split(arrays, "x_test", "y_test", path)
            if xte.shape[1:] != x.shape[1:]:
                raise UserError(f"{path}: x_test images are {tuple(xte.shape[1:])}, x images {tuple(x.shape[1:])}")
        else:  # no test split in the file: analyse the file as given (train on it only if you mean to)
            xte, yte = x, y
    num_classes = int(max(int(y.max()), int(yte.max()))) + 1
    train, val = split_train_val(x, y, val_size=max(1, len(y) // 10), seed=seed)
    classes = tuple(str(i) for i in range(num_classes))
    return Dataset("npz", classes, train, val, Split(xte, yte), source=str(path))
