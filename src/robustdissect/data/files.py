"""User datasets from files: class sub-folders of images, and .npz arrays."""

from __future__ import annotations

import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..errors import UserError
from .base import DATASETS, Dataset, Split, split_train_val, validate_images
from .lazy import ArraySource, FileSource, LazyImages, image_header

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


MAX_CLASSES = 100_000


def _listdir(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError as e:
        raise UserError(f"cannot list {directory}: {e.strerror}") from None


def _list_folder(directory: Path) -> tuple[list[Path], list[int], list[str]]:
    """The image files of DIR/<class>/<image> in sorted order, their labels and the classes."""
    classes = [p.name for p in _listdir(directory) if p.is_dir()]
    if not classes:
        raise UserError(f"{directory} has no class sub-folders (expected DIR/<class>/<image>)")
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        for f in _listdir(directory / cls):
            if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(label)
    if not files:
        raise UserError(f"no images found under {directory}")
    return files, labels, classes


@dataclass(frozen=True)
class FolderTransform:
    """The evaluation transform of image files: grayscale or RGB, the shorter side resized to
    `resize`, then a centred `crop` x `crop` square (each optional)."""

    grayscale: bool = False
    resize: int | None = None
    crop: int | None = None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a `width` x `height` image after the transform."""
        if self.resize is not None and min(width, height) != self.resize:
            width, height = (
                (self.resize, max(1, int(self.resize * height / width)))
                if width <= height
                else (max(1, int(self.resize * width / height)), self.resize)
            )
        if self.crop is not None:
            if self.crop > width or self.crop > height:
                raise UserError(f"cannot centre-crop {self.crop}x{self.crop} from a {width}x{height} image; "
                                "give a resize of at least the crop")  # fmt: skip
            return self.crop, self.crop
        return width, height


def _folder_source(directory: Path, tf: FolderTransform) -> tuple[FileSource, torch.Tensor, list[str]]:
    """The folder's images as a lazily decoded source, after reading every file's header (so a
    bomb, an unreadable file or a size mismatch is refused before any work)."""
    files, labels, classes = _list_folder(directory)
    size: tuple[int, int] | None = None
    first: Path | None = None
    for f in files:
        out = tf.output_size(*image_header(f))
        if size is None:
            size, first = out, f
        elif out != size:
            raise UserError(
                f"{f} has size {out[0]}x{out[1]}, {first} {size[0]}x{size[1]}; pass --image-size to resize all images"
            )
    assert size is not None
    shape = (1 if tf.grayscale else 3, size[1], size[0])
    source = FileSource(files, shape, tf.grayscale, tf.resize, tf.crop)
    return source, torch.tensor(labels, dtype=torch.int64), classes


def _read_folder(directory: Path, tf: FolderTransform, lazy: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    source, y, classes = _folder_source(directory, tf)
    images = LazyImages(source)
    return (cast(torch.Tensor, images) if lazy else images.read(images.indices)), y, classes


def _size_option(name: str, value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096):
        raise UserError(f"{name} must be an integer in [1, 4096], got {value!r}")
    return value


@DATASETS.register(
    "image-folder", "class sub-folders of images: DIR/train/<class>/*, DIR/test/<class>/* (read lazily; "
    "image_size S: shorter side to S and a centred SxS crop, or resize / crop separately)"
)
def image_folder(
    data_dir: str | None = None, seed: int = 0, image_size: int | None = None, grayscale: bool = False,
    resize: int | None = None, crop: int | None = None, lazy: bool = True,
) -> Dataset:
    """Images are decoded per batch (uint8 until then) unless `lazy` is False."""
    if data_dir is None:
        raise UserError("image-folder needs --data-dir")
    image_size = _size_option("image_size", image_size)
    resize, crop = _size_option("resize", resize), _size_option("crop", crop)
    if image_size is not None:
        resize, crop = resize or image_size, crop or image_size
    tf = FolderTransform(bool(grayscale), resize, crop)
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data directory {root} does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        xtr, ytr, classes = _read_folder(root / "train", tf, lazy)
        xte, yte, test_classes = _read_folder(root / "test", tf, lazy)
        if test_classes != classes:
            raise UserError(f"{root}: train and test class folders differ")
        if tuple(xte.shape[1:]) != tuple(xtr.shape[1:]):
            raise UserError(f"{root}: test images are {tuple(xte.shape[1:])}, train images {tuple(xtr.shape[1:])}; "
                            "pass --image-size to resize all images")  # fmt: skip
    else:  # one folder: hold out a seeded 20% as test
        x, y, classes = _read_folder(root, tf, lazy)
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


# -- archives: every member is size-checked from its headers before a byte of data is inflated --
DEFAULT_MAX_INPUT_BYTES = 4 * 2**30
MAX_INPUT_ENV = "ROBUSTDISSECT_MAX_INPUT_BYTES"
# Image arrays compress a few times (zeros ~1000x); a large member that inflates more than this
# is refused as a likely zip bomb. Small members (labels, masks) may compress as they like.
MAX_COMPRESSION_RATIO = 100
RATIO_CHECK_ABOVE = 64 * 2**20
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def max_input_bytes() -> int:
    """The most memory one input file may need once loaded: DEFAULT_MAX_INPUT_BYTES (4 GiB), or
    the environment variable ROBUSTDISSECT_MAX_INPUT_BYTES (bytes, or with a K/M/G/T suffix)."""
    text = os.environ.get(MAX_INPUT_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_INPUT_BYTES
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise UserError(f"{MAX_INPUT_ENV}={text!r}: expected a positive number of bytes, e.g. 4294967296 or 4G")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_input_size(needed: int, what: str) -> None:
    """Refuse an input that would need more than `max_input_bytes()` of memory."""
    limit = max_input_bytes()
    if needed > limit:
        raise UserError(
            f"{what} would need {human_bytes(needed)} of memory, over the input limit of {human_bytes(limit)} "
            f"(raise it with {MAX_INPUT_ENV}=BYTES if the file is trusted)"
        )


@dataclass(frozen=True)
class _Member:
    """One .npy member of an archive, as its zip entry and its .npy header declare it."""

    key: str
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


class NpzArchive:
    """An .npz file read without numpy's loader: members are listed from the zip directory, each
    one's .npy header is read first, and a member is inflated only once its declared shape,
    dtype and compression ratio are within bounds. Never unpickles."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                head = f.read(6)
            is_zip = zipfile.is_zipfile(path)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        if not is_zip:
            if head == b"\x93NUMPY":
                raise UserError(f"{path} is a single .npy array, not an .npz archive with arrays 'x' and 'y'")
            raise UserError(f"{path} is not an .npz archive (a zip of .npy arrays, as numpy.savez writes)")
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
            raise UserError(f"{path} is not a readable .npz archive: {_short(e)}") from None
        self._names = {(n[:-4] if n.endswith(".npy") else n): n for n in self._zip.namelist()}

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zip.close()

    @property
    def files(self) -> list[str]:
        return sorted(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def header(self, key: str) -> _Member:
        """The member's declared shape and dtype, checked against the zip entry's sizes."""
        name = self._names[key]
        info = self._zip.getinfo(name)
        where = f"{self.path}: '{key}'"
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):  # what numpy.savez writes
            raise UserError(f"{where} uses zip compression method {info.compress_type}; save with numpy.savez")
        try:
            with self._zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:  # 2.0 and 3.0 share the layout (3.0 allows UTF-8 field names)
                    shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
                offset = f.tell()
        except Exception as e:  # not .npy data, a damaged header, a bad zip entry: the user's file
            raise UserError(f"{where} is not a readable .npy array: {_short(e)}") from None
        if dtype.hasobject:
            raise UserError(f"{where} is an object array; it would need unpickling, save numbers")
        if any(s < 0 for s in shape):
            raise UserError(f"{where} declares a negative dimension in shape {shape}")
        member = _Member(key, name, tuple(int(s) for s in shape), dtype)
        check_input_size(member.nbytes, f"{where} (shape {member.shape}, {dtype})")
        if info.file_size > RATIO_CHECK_ABOVE and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
            raise UserError(
                f"{where} inflates {info.file_size / max(info.compress_size, 1):.0f}x "
                f"({human_bytes(info.compress_size)} -> {human_bytes(info.file_size)}); refusing a likely zip bomb"
            )
        if info.file_size < offset + member.nbytes:
            raise UserError(
                f"{where} is truncated: its header declares shape {member.shape} of {dtype} "
                f"({human_bytes(member.nbytes)}), the archive holds {human_bytes(max(info.file_size - offset, 0))}"
            )
        return member

    def read(self, member: _Member) -> np.ndarray:
        """Inflate one member (after `header` checked it)."""
        try:
            with self._zip.open(member.name) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except MemoryError:
            raise UserError(f"{self.path}: '{member.key}' is too large to load into memory") from None
        except Exception as e:  # a corrupt member (bad CRC, truncated stream) is the user's file problem
            raise UserError(f"{self.path}: cannot read '{member.key}': {_short(e)}") from None


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _npz_split(x: np.ndarray, y: np.ndarray, xkey: str, ykey: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim not in (3, 4):
        raise UserError(f"{path}: '{xkey}' must have shape (N, C, H, W), (N, H, W, C) or (N, H, W), got {x.shape}")
    if x.dtype == np.uint8:  # kept as uint8, converted per batch (a quarter of the memory)
        xt = torch.from_numpy(np.ascontiguousarray(x))
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
    if xt.dtype == torch.uint8:
        if xt.ndim != 4:
            raise UserError(f"{path}: '{xkey}' must have shape (N, C, H, W), got {tuple(xt.shape)}")
        xt = cast(torch.Tensor, LazyImages(ArraySource(xt)))
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
    with NpzArchive(path) as arrays:
        if "x" not in arrays or "y" not in arrays:
            raise UserError(f"{path} must contain arrays 'x' and 'y', found {arrays.files}")
        keys = ["x", "y", *(["x_test", "y_test"] if "x_test" in arrays and "y_test" in arrays else [])]
        members = [arrays.header(k) for k in keys]
        # the raw arrays, plus the float32 images and int64 labels made from them
        needed = sum(m.nbytes + m.count * (4 if m.key.startswith("x") else 8) for m in members)
        check_input_size(needed, f"{path} (arrays {', '.join(f'{m.key} {m.shape} {m.dtype}' for m in members)})")
        loaded = {m.key: arrays.read(m) for m in members}
    x, y = _npz_split(loaded["x"], loaded["y"], "x", "y", path)
    if "x_test" in loaded:  # else no test split in the file: analyse it as given (train on it only if you mean to)
        xte, yte = _npz_split(loaded["x_test"], loaded["y_test"], "x_test", "y_test", path)
        if xte.shape[1:] != x.shape[1:]:
            raise UserError(f"{path}: x_test images are {tuple(xte.shape[1:])}, x images {tuple(x.shape[1:])}")
    else:
        xte, yte = x, y
    num_classes = int(max(int(y.max()), int(yte.max()))) + 1
    train, val = split_train_val(x, y, val_size=max(1, len(y) // 10), seed=seed)
    classes = tuple(str(i) for i in range(num_classes))
    return Dataset("npz", classes, train, val, Split(xte, yte), source=str(path))
