"""Copy a finished training run into the shipped weights folder under a checkpoint name.

python scripts/ship_checkpoint.py RUN_DIR NAME [PRESET]

PRESET (default: NAME) is the training preset that retrains the checkpoint; it must be one of
src/robustdissect/configs/train/*.yaml. The files are written into this checkout's source tree.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from robustdissect.resources import train_preset

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "src" / "robustdissect" / "weights"


def main() -> None:
    run, name = Path(sys.argv[1]), sys.argv[2]
    preset = sys.argv[3] if len(sys.argv) > 3 else name
    train_preset(preset)  # fails with close matches when the preset does not exist
    card = json.loads((run / "model.json").read_text())
    card["name"] = name
    card["retrain"] = f"robustdissect train --config {preset} --out runs/train-{name}"
    shutil.copyfile(run / "model.safetensors", WEIGHTS_DIR / f"{name}.safetensors")
    (WEIGHTS_DIR / f"{name}.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    print(f"shipped {name}: test accuracy {card['test_accuracy']}")


if __name__ == "__main__":
    main()
