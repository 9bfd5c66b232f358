"""Load a robust or non-robust dataset built by `robustdissect robust-data` (the builders are in
`training.robust_data`): OUT (safetensors: x (N, C, H, W) float32, y (N,) int64, source (N,)
int64 = index of the source image) with its JSON card OUT.json (kind, settings, seed, source
model hash, dataset). `--data robust-data:OUT` trains on it: the train split is the built set,
val and test are the source dataset's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from safetensors.torch import load_file
from torch import Tensor

from ..errors import UserError
from .base import DATASETS, Dataset, Split


def load_robust_data(path: str | Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """x (N, C, H, W), y (N,) and the card of a built set."""
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_suffix(".safetensors")
    if not p.is_file():
        raise UserError(f"robust dataset {p} does not exist; build it with `robustdissect robust-data`")
    card_path = p.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    t = load_file(str(p))
    return t["x"], t["y"], card


@DATASETS.register("robust-data", "a set built by `robustdissect robust-data` (--data robust-data:PATH); "
                   "val and test are the source dataset's")  # fmt: skip
def robust_data(data_dir: str | None = None, seed: int = 0) -> Dataset:
    if data_dir is None:
        raise UserError("robust-data needs a path: --data robust-data:PATH")
    x, y, card = load_robust_data(data_dir)
    source = str(card.get("dataset", "fashion-mnist"))
    # the source's registered loader (`load_dataset` checks the splits this returns)
    src = cast(Dataset, cast(Any, DATASETS.get(source))(data_dir=card.get("data_dir"), seed=seed))
    return Dataset(f"robust-data:{card.get('settings', {}).get('kind', '?')}", src.classes, Split(x, y), src.val,
                   src.test, source=str(data_dir), extra={"card": json.dumps(card, default=str)})  # fmt: skip
