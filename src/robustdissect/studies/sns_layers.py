"""Training studies. E12 (METHODS §5.4, §8.3): SNS with the top-k layers for several k.

For each k the base configuration is trained with objective `sns` and `layers = k` (the top k conv
layers at the hook point; every layer below the lowest of them frozen), into `out/top<k>/`. A k
whose model is already written is loaded, one with only a state.pt is resumed, so an interrupted
study continues where it stopped. Every model is then evaluated on the same test images: clean
accuracy and the listed attacks, each with a 95% Wilson interval; the rows go to
`out/layer_selection.csv` and `out/layer_selection.json`, and accuracy against k (Fig. 16) to
`out/layer_selection.png`. The `training` stage shows a finished study (`training.layer_study`).

Command line (the base is any `robustdissect train` YAML; the Fashion-MNIST preset is
the preset fmnist-smallcnn-sns-layers):

    python -m robustdissect.studies.sns_layers --config fmnist-smallcnn-sns-layers \\
        --ks 1,2,3,4,5,6 --out runs/layer-study [--eval-n 1000]

Under torchrun every rank trains its shard (see `training.distributed`); rank 0 evaluates.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import pick_device
from ..data import Dataset, load_dataset
from ..errors import UserError
from ..evaluation import EvaluateOptions, build_attack, wilson_interval
from ..models.resolve import resolve_model
from ..modelutil import accuracy
from ..report import plots
from ..resources import read_train_config
from ..runs import atomic_write_text, save_png, write_json
from ..stages.compare import read_layer_study
from ..training.distributed import dist_env
from ..training.loop import TrainConfig, train

__all__ = ["layer_selection_study", "main", "read_layer_study"]

log = logging.getLogger(__name__)


def _config_for_k(base: TrainConfig, k: int) -> TrainConfig:
    if not isinstance(k, int) or k < 1:
        raise UserError(f"layer counts must be integers >= 1, got {k!r}")
    args = {**base.objective_args, "layers": k}
    return dataclasses.replace(base, objective="sns", objective_args=args)


def layer_selection_study(
    base_cfg: TrainConfig,
    ks: Sequence[int],
    out: str | Path,
    *,
    attacks: Sequence[str] = ("pgd-linf", "fgsm"),
    eps: float = 0.1,
    pgd_steps: int = 20,
    eval_n: int | None = 1000,
    data: Dataset | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train SNS with the top-k layers for each k in `ks` (resumable per k) and evaluate each.

    Returns one row per k: k, layers (names of S), frozen (number of frozen modules), epochs,
    train_seconds, then for "clean" and every attack `<name>`, `<name>_ci_low`, `<name>_ci_high`
    (accuracies in [0, 1] on the first `eval_n` test images, x (N, C, H, W), y (N,))."""
    out = Path(out)
    if not ks:
        raise UserError("give at least one layer count k")
    opts = EvaluateOptions(attacks=list(attacks), eps=eps, pgd_steps=pgd_steps)
    names = opts.attack_names()
    data = data or load_dataset(base_cfg.dataset, base_cfg.data_dir, seed=base_cfg.seed)
    info = dist_env()
    rows: list[dict[str, Any]] = []
    for k in ks:
        cfg = _config_for_k(base_cfg, k)
        folder = out / f"top{k}"
        model_file = folder / "model.safetensors"
        if model_file.is_file():
            log.info("layer study: top-%d already trained, loading %s", k, model_file)
            model, card = resolve_model(str(model_file))
        else:
            resume = (folder / "state.pt").is_file()
            log.info("layer study: training top-%d%s", k, " (resuming)" if resume else "")
            result = train(cfg, folder, resume=resume, progress=progress, data=data)
            model, card = result.model, result.card
        if not info.is_main:
            continue
        device = pick_device(cfg.device)
        model = model.to(device).eval()
        test = data.test.subset(eval_n, seed=base_cfg.seed)
        x, y = test.x, test.y
        objective = card.get("objective", {})
        row: dict[str, Any] = {
            "k": k,
            "layers": ",".join(objective.get("layers", [])) if isinstance(objective, dict) else "",
            "frozen": len(objective.get("frozen", [])) if isinstance(objective, dict) else 0,
            "epochs": card.get("epochs"),
            "train_seconds": card.get("train_seconds"),
        }
        n = len(y)
        clean = accuracy(model, x, y)
        row["clean"], (row["clean_ci_low"], row["clean_ci_high"]) = clean, wilson_interval(round(clean * n), n)
        for name in names:
            res = build_attack(name, opts, base_cfg.seed)(model, x.to(device), y.to(device))
            c = int(res.correct.sum())
            row[name], (row[f"{name}_ci_low"], row[f"{name}_ci_high"]) = c / n, wilson_interval(c, n)
        rows.append(row)
    if info.is_main:
        _write(out, rows)
    return rows


def _write(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "layer_selection.json", rows)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(out / "layer_selection.csv", buf.getvalue())
    if rows:
        save_png(plots.layer_study_figure(rows), out / "layer_selection.png", dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m robustdissect.studies.sns_layers --config BASE.yaml --ks 1,2,3 --out DIR`."""
    parser = argparse.ArgumentParser(prog="python -m robustdissect.studies.sns_layers", description=__doc__)
    parser.add_argument("--config", required=True, help="base training preset or YAML (as for `robustdissect train`)")
    parser.add_argument("--ks", default="1,2,3,4,5,6", help="comma-separated layer counts")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--eval-n", type=int, default=1000, help="test images evaluated (0 = all)")
    parser.add_argument("--attacks", default="pgd-linf,fgsm")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        base = read_train_config(args.config)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(base) - known)
        if unknown:
            raise UserError(f"unknown training setting(s) in {args.config}: {', '.join(unknown)}")
        ks = [int(k) for k in str(args.ks).split(",") if k.strip()]
        rows = layer_selection_study(
            TrainConfig(**base),
            ks,
            args.out,
            attacks=[a.strip() for a in str(args.attacks).split(",") if a.strip()],
            eval_n=args.eval_n or None,
            progress=True,
        )
    except (UserError, ValueError) as e:
        print(f"error: {e}")
        return 2
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
