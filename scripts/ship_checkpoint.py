"""Copy a finished training run into the shipped weights folder under a checkpoint name.

python scripts/ship_checkpoint.py RUN_DIR NAME CONFIG
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from robustdissect.models import WEIGHTS_DIR


def main() -> None:
    run, name, config = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    card = json.loads((run / "model.json").read_text())
    card["name"] = name
    card["retrain"] = f"robustdissect train --config {config} --out runs/train-{name}"
    shutil.copyfile(run / "model.safetensors", WEIGHTS_DIR / f"{name}.safetensors")
    (WEIGHTS_DIR / f"{name}.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    print(f"shipped {name}: test accuracy {card['test_accuracy']}")


if __name__ == "__main__":
    main()
