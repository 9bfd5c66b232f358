"""Recompute the shipped pushback results (src/robustdissect/results/pushback-fmnist.json).

python -m robustdissect.studies.pushback [--reliance] [--out runs/ship-pushback]

Runs the `pushback` stage on the first 200 test images of fmnist-smallcnn-vanilla (seed 0):
everything (`compute: true`, the --full profile: about half an hour on a loaded 2-core machine),
or with --reliance only the reliance shift (both importances, bootstrap intervals) and the
transition matrices (`compute: reliance`, a few minutes per compared model), keeping the shipped
purification and D_bp results. Rerun it with --reliance after shipping a model of the stage's
`compare` list (the SNS bridge, the models trained on D_bp and D̂_R).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..config import RunConfig
from ..pipeline import run_pipeline
from ..runs import write_json

RESULTS = Path(__file__).resolve().parents[1] / "results" / "pushback-fmnist.json"  # in the package
IMAGES = "the first 200 test images of fmnist-smallcnn-vanilla, seed 0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reliance", action="store_true", help="recompute only the reliance shift and transitions")
    ap.add_argument("--out", type=Path, default=Path("runs/ship-pushback"))
    args = ap.parse_args()
    compute: bool | str = "reliance" if args.reliance else True
    cfg = RunConfig(model="fmnist-smallcnn-vanilla", n=200, seed=0, quick=False,
                    stages={"pushback": {"compute": compute, "feature_n": 200, "bootstrap": 1000}})  # fmt: skip
    shutil.rmtree(args.out, ignore_errors=True)
    run = run_pipeline(cfg, args.out)
    payload = json.loads((run / "results.json").read_text())["stages"]["pushback"]["pushback"]
    how = f"the pushback stage with compute: true (its --full profile) on {IMAGES}"
    if args.reliance:
        old = json.loads(RESULTS.read_text()).get("how", how)
        how = (f"{old.split('; reliance')[0]}; reliance shift and transitions recomputed with compute: reliance "
               f"on {IMAGES}")  # fmt: skip
    payload["how"] = how
    write_json(RESULTS, payload, sort_keys=True)
    for row in payload["reliance"]:
        phi = f"{row['rs_phi']:.3f} [{row['rs_phi_lo']:.3f}, {row['rs_phi_hi']:.3f}]"
        abl = f"{row['rs_ablation']:.3f} [{row['rs_ablation_lo']:.3f}, {row['rs_ablation_hi']:.3f}]"
        print(f"{row['model']}: RS phi {phi}, ablation {abl}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
