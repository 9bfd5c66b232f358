"""Ship the finished studies inside the package, so that the `metric` and `diagnose` stages show
them in any install (a wheel has no docs/ folder):

    python -m robustdissect.studies.ship

copies docs/results/yu1/yu1.json to src/robustdissect/results/yu1-fmnist.json and
docs/results/ig1/study.json to src/robustdissect/results/ig1-fmnist.json. Run it after rerunning
`python -m robustdissect.studies.yu1` or `... studies.ig1`; a test fails while the
shipped copy differs from the study in docs/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the repository (src/robustdissect/studies/..)
# package file -> the study file it ships
STUDIES = {
    "yu1-fmnist.json": ROOT / "docs" / "results" / "yu1" / "yu1.json",
    "ig1-fmnist.json": ROOT / "docs" / "results" / "ig1" / "study.json",
}
RESULTS = ROOT / "src" / "robustdissect" / "results"


def main() -> None:
    for name, source in STUDIES.items():
        shutil.copyfile(source, RESULTS / name)
        print(f"{source.relative_to(ROOT)} -> {(RESULTS / name).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
