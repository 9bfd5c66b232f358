"""CIFAR-10 in the standard python-pickle batch format, from a directory or the .tar.gz.

The batches are pickles, so they are read with an unpickler that only admits the few numpy
classes those files use: a malicious file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .base import DATASETS, Dataset, Split, split_train_val
from .files import check_input_size

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
        images, label_list = d[b"data"], d[b"labels"]
        # a pickle can repeat one reference many times: a list of one big array N times would make
        # numpy build N copies, so only the types CIFAR-10 batches hold are accepted
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(f"'data' must be a uint8 array, got {type(images).__name__}")
        if isinstance(label_list, list) and not all(isinstance(v, (int, np.integer)) for v in label_list):
            raise ValueError("'labels' must be a list of integers")
        if not isinstance(label_list, list) and not (
            isinstance(label_list, np.ndarray) and np.issubdtype(label_list.dtype, np.integer)
        ):
            raise ValueError(f"'labels' must be a list of integers, got {type(label_list).__name__}")
        data = images.reshape(-1, 3, 32, 32)
        labels = np.asarray(label_list, dtype=np.int64)
    except Exception as e:  # any malformed batch is the user's file problem
        raise UserError(f"{where} is not a CIFAR-10 python batch: {' '.join(str(e).split())[:200]}") from None
    if labels.ndim != 1 or len(labels) != len(data):
        raise UserError(f"{where}: {len(data)} images but {labels.size} labels")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= len(CIFAR10_CLASSES)):
        raise UserError(
            f"{where}: labels must lie in 0..{len(CIFAR10_CLASSES) - 1}, found {int(labels.min())}..{int(labels.max())}"
        )
    return data, labels


def _read_batches(path: Path) -> dict[str, bytes]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    out: dict[str, bytes] = {}
    if path.is_dir():
        base = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        for n in names:
            if not (base / n).is_file():
                raise UserError(f"missing {n} in {base}; expected the CIFAR-10 python batches")
            try:
                check_input_size((base / n).stat().st_size, f"{base / n}")
                out[n] = (base / n).read_bytes()
            except OSError as e:
                raise UserError(f"cannot read {base / n}: {e.strerror}") from None
    elif path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        try:
            with tarfile.open(path, "r:gz") as tar:
                total = 0
                for member in tar:  # one member at a time; sizes come from the tar headers
                    total += member.size
                    # even skipping a member inflates it: a huge one is refused, not skipped
                    check_input_size(total, f"{path} (up to member {member.name})")
                    stem = Path(member.name).name
                    if stem in names and member.isfile():
                        f = tar.extractfile(member)
                        if f is not None:
                            out[stem] = f.read(member.size)
                    if len(out) == len(names):
                        break
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        missing = [n for n in names if n not in out]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}")
    else:
        raise UserError(f"CIFAR-10 path {path} is neither a directory nor a .tar.gz file")
    return out


@DATASETS.register("cifar10", "CIFAR-10 python batches (directory or .tar.gz) from --data-dir")
def cifar10(data_dir: str | None = None, seed: int = 0) -> Dataset:
    if data_dir is None:
        raise UserError("cifar10 needs --data-dir (cifar-10-python.tar.gz or its extracted folder)")
    raw = _read_batches(Path(data_dir))
    parts = [_load_batch(raw[f"data_batch_{i}"], f"data_batch_{i}") for i in range(1, 6)]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _load_batch(raw["test_batch"], "test_batch")

    def to_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0)

    train, val = split_train_val(to_tensor(xtr), torch.from_numpy(ytr), val_size=5000, seed=seed)
    test = Split(to_tensor(xte), torch.from_numpy(yte))
    return Dataset("cifar10", CIFAR10_CLASSES, train, val, test, source=str(data_dir))
